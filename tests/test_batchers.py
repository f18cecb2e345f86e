"""SeriesBatcher and PaddedBatcher: coverage, padding, bucketing, resumable order, one layout
whatever the lengths, iteration, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxseq import data

# -- SeriesBatcher ---------------------------------------------------------------------------


def _pairs(bt):
    """Every valid (input, target) pair of one epoch, as tuples of the first feature."""
    out = []
    for i in range(bt.num_chunks):
        ch = bt.chunk(i)
        out += list(zip(ch.inputs[..., 0][ch.mask].tolist(), ch.targets[..., 0][ch.mask].tolist()))
    return out


@pytest.mark.parametrize("horizon", [1, 3])
def test_series_batcher_covers_every_pair_once_with_a_masked_tail(horizon):
    n, b, k = 3 * 12 + 2, 3, 4  # L = 12 per stream, 2 steps dropped
    series = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float64)
    bt = data.SeriesBatcher(series, b, k, horizon=horizon)
    steps = 12 - horizon
    assert bt.num_chunks == -(-steps // k)
    want = [(t, t + horizon) for s in range(b) for t in range(s * 12, s * 12 + steps)]
    assert sorted(_pairs(bt)) == sorted(want)
    ch = bt.chunk(0)
    assert ch.inputs.shape == (k, b, 2) and ch.inputs.dtype == np.float32
    np.testing.assert_array_equal(ch.targets[..., 1], -ch.targets[..., 0])  # features kept
    last = bt.chunk(bt.num_chunks - 1)
    valid = steps - (bt.num_chunks - 1) * k
    assert last.mask[:valid].all() and not last.mask[valid:].any()
    assert not last.inputs[valid:].any() and not last.targets[valid:].any()  # zero padding
    assert ch.reset[0].all() and not ch.reset[1:].any() and not bt.chunk(1).reset.any()


def test_series_batcher_positions_stacking_and_resets():
    bt = data.SeriesBatcher(np.linspace(0, 1, 40), 2, 5)  # [N] series: F = 1
    assert bt.num_chunks == 4 and bt.at_step(0).inputs.shape == (5, 2, 1)
    assert bt.position(9) == (2, 1)
    np.testing.assert_array_equal(bt.at_step(9).inputs, bt.chunk(1).inputs)
    st = bt.stacked(3, 2)  # steps 3 and 4: chunk 3, then chunk 0 of the next epoch
    assert st.inputs.shape == (2, 5, 2, 1)
    np.testing.assert_array_equal(st.targets[1], bt.chunk(0).targets)
    again = data.SeriesBatcher(np.linspace(0, 1, 40), 2, 5, reset_every_chunk=True)
    assert all(again.chunk(i).reset[0].all() for i in range(again.num_chunks))


def test_series_batcher_boundaries_reset_the_carry_and_mask_crossing_targets():
    n = 24  # 2 streams of 12
    bnd = np.zeros(n, bool)
    bnd[5] = True  # stream 0, step 5
    bt = data.SeriesBatcher(np.arange(n, dtype=np.float32), 2, 4, horizon=2, boundaries=bnd)
    c1 = bt.chunk(1)  # steps 4..7 of each stream
    assert c1.reset[1, 0] and c1.reset.sum() == 1
    # targets two steps ahead that lie at or past step 5 of stream 0: from steps 3 and 4
    assert not bt.chunk(0).mask[3, 0] and not c1.mask[0, 0]
    assert c1.mask[1:, 0].all() and bt.chunk(0).mask[:3, 0].all() and bt.chunk(0).mask[:, 1].all()


def test_series_batcher_errors_name_the_argument():
    with pytest.raises(TypeError, match="series: expected a floating"):
        data.SeriesBatcher(np.arange(40), 2, 4)
    with pytest.raises(ValueError, match=r"series: expected shape \[N, F\] or \[N\]"):
        data.SeriesBatcher(np.zeros((4, 10, 2)), 2, 2)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        data.SeriesBatcher(np.zeros(20), 2, 9, horizon=2)
    with pytest.raises(ValueError, match=r"boundaries: expected shape \[20\]"):
        data.SeriesBatcher(np.zeros(20), 2, 4, boundaries=np.zeros(19, bool))
    with pytest.raises(ValueError, match="horizon: expected a positive int"):
        data.SeriesBatcher(np.zeros(20), 2, 4, horizon=0)
    with pytest.raises(IndexError, match=r"i: expected a chunk index in \[0, 3\)"):
        data.SeriesBatcher(np.zeros(20), 2, 4).chunk(3)


# -- PaddedBatcher ---------------------------------------------------------------------------


def _examples(n=23, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 15, size=n)
    tokens = [rng.integers(1, 9, size=t) for t in lengths]
    feats = [rng.normal(size=(t, 2)) for t in lengths]
    return tokens, feats, lengths


def _epoch(bt, epoch):
    return [bt.at_step(epoch * bt.num_batches + i) for i in range(bt.num_batches)]


@pytest.mark.parametrize("num_buckets", [1, 3])
def test_padded_batcher_pads_buckets_and_keeps_examples_aligned(num_buckets):
    tokens, feats, lengths = _examples()
    n, b = len(tokens), 4
    bt = data.PaddedBatcher(
        {"tokens": tokens, "feats": feats, "id": np.arange(n)},
        b, num_buckets=num_buckets, seed=3, pad_value=-1,
    )  # fmt: skip
    assert bt.sequence_fields == ["tokens", "feats"]
    seen, first = [], []
    shapes = set()
    for batch in _epoch(bt, 0):
        assert batch["tokens"].shape[1] == b and batch["id"].shape == (b,)
        assert batch["tokens"].dtype == np.int32 and batch["feats"].dtype == np.float32
        assert batch["tokens_lengths"].dtype == np.int32
        t = batch["tokens"].shape[0]
        shapes.add(t)
        assert batch["feats"].shape == (t, b, 2)
        for j, i in enumerate(batch["id"]):
            ln = lengths[i]
            assert batch["tokens_lengths"][j] == ln and batch["feats_lengths"][j] == ln
            np.testing.assert_array_equal(batch["tokens"][:ln, j], tokens[i])
            np.testing.assert_allclose(batch["feats"][:ln, j], feats[i], rtol=1e-6)
            assert (batch["tokens"][ln:, j] == -1).all() and (batch["feats"][ln:, j] == -1).all()
        seen += batch["id"].tolist()
        first += batch["id"][batch["example_mask"]].tolist()
    assert sorted(first) == list(range(n))  # every example exactly once among the masked
    assert set(seen) == set(range(n))
    assert len(shapes) <= num_buckets and shapes == set(bt.bucket_lengths)
    assert bt.bucket_lengths[-1] == lengths.max()
    # a bucket's length is the longest of its examples: no batch is padded past its bucket
    for members, t in zip(bt.buckets, bt.bucket_lengths):
        assert lengths[members].max() == t
    if num_buckets == 3:  # sorted by length: the buckets do not overlap
        assert lengths[bt.buckets[0]].max() <= lengths[bt.buckets[1]].min()


def test_padded_batcher_order_is_a_function_of_seed_and_epoch():
    tokens, _, _ = _examples()
    fields = {"tokens": tokens, "id": np.arange(len(tokens))}
    a = data.PaddedBatcher(fields, 4, num_buckets=2, seed=1)
    b = data.PaddedBatcher(fields, 4, num_buckets=2, seed=1)
    c = data.PaddedBatcher(fields, 4, num_buckets=2, seed=2)
    steps = [7, 0, 13, 2, 7]  # any order of access, epochs 0..2
    for s in steps:
        np.testing.assert_array_equal(a.at_step(s)["id"], b.at_step(s)["id"])
    ids = lambda bt, e: [x["id"].tolist() for x in _epoch(bt, e)]
    assert ids(a, 0) != ids(a, 1)  # reshuffled each epoch
    assert ids(a, 0) != ids(c, 0)
    assert a.position(2 * a.num_batches + 1) == (2, 1)
    plain = data.PaddedBatcher(fields, 5, shuffle=False)
    assert [x["id"].tolist() for x in _epoch(plain, 0)][0] == [0, 1, 2, 3, 4]
    assert plain.num_batches == 5 and plain.at_step(4)["example_mask"].tolist() == [
        True, True, True, False, False,
    ]  # fmt: skip


def test_padded_batcher_sequence_fields_stacking_axes_and_errors():
    same = [np.arange(3)] * 4  # equal lengths: still a sequence field, time-major with lengths
    bt = data.PaddedBatcher({"x": same, "y": [0, 1, 2, 3]}, 2)
    assert bt.sequence_fields == ["x"]
    assert bt.at_step(0)["x"].shape == (3, 2) and bt.batch_axes == {
        "x": 1, "y": 0, "x_lengths": 0, "example_mask": 0,
    }  # fmt: skip
    assert bt.stacked(0, 2)["x"].shape == (2, 3, 2)
    # a fixed-shape array field, stacked batch-major when the sequence fields are named
    feats = [np.full(3, i, np.float32) for i in range(4)]
    bt = data.PaddedBatcher({"x": same, "f": feats}, 2, sequence_fields=["x"], shuffle=False)
    batch = bt.at_step(0)
    assert batch["f"].shape == (2, 3) and batch["x"].shape == (3, 2)
    assert "f_lengths" not in batch and bt.batch_axes["f"] == 0
    tokens, _, _ = _examples()
    two = data.PaddedBatcher({"t": tokens}, 4, num_buckets=2, shuffle=False)
    with pytest.raises(ValueError, match="buckets of different lengths"):
        two.stacked(two._batches_per_bucket[0] - 1, 2)
    with pytest.raises(ValueError, match=r"fields\['y'\]: expected 4 examples"):
        data.PaddedBatcher({"x": same, "y": [1, 2]}, 2)
    with pytest.raises(ValueError, match="clashes"):
        data.PaddedBatcher({"t": tokens, "t_lengths": list(range(len(tokens)))}, 2)
    with pytest.raises(ValueError, match="num_buckets: expected at most N=4"):
        data.PaddedBatcher({"x": same}, 2, num_buckets=5, sequence_fields=["x"])
    with pytest.raises(ValueError, match="num_buckets: 2 buckets need a sequence field"):
        data.PaddedBatcher({"y": [0, 1, 2]}, 2, num_buckets=2)
    with pytest.raises(ValueError, match=r"fields\['f'\]\[1\]: expected shape \[2\]"):
        data.PaddedBatcher({"f": [np.zeros(2), np.zeros((2, 2))]}, 2, sequence_fields=[])
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        data.PaddedBatcher({"y": [0, 1]}, 0)
    with pytest.raises(TypeError, match="fields: expected a non-empty mapping"):
        data.PaddedBatcher([[0, 1]], 2)
    with pytest.raises(
        ValueError, match=r"fields\['m'\]\[1\]: expected a scalar .* got shape \[2\]"
    ):
        data.PaddedBatcher({"m": [0, np.zeros(2)]}, 2)
    with pytest.raises(ValueError, match="sequence_fields: 'z' is not a field"):
        data.PaddedBatcher({"x": same}, 2, sequence_fields=["z"])
    with pytest.raises(TypeError, match="sequence_fields: expected a list of field names"):
        data.PaddedBatcher({"x": same}, 2, sequence_fields="x")
    with pytest.raises(ValueError, match=r"fields\['y'\]\[0\]: expected a sequence"):
        data.PaddedBatcher({"y": [0, 1]}, 2, sequence_fields=["y"])


def test_padded_batcher_layout_does_not_depend_on_whether_lengths_agree():
    # issue 27 item 1: equal lengths gave batch-major [B, T] without lengths, mixed [T, B]
    equal = data.PaddedBatcher({"tokens": [np.arange(4)] * 8, "label": [0] * 8}, batch_size=2)
    mixed = data.PaddedBatcher(
        {"tokens": [np.arange(n) for n in (3, 4) * 4], "label": [0] * 8}, batch_size=2
    )
    a, b = equal.at_step(0), mixed.at_step(0)
    assert a["tokens"].shape == b["tokens"].shape == (4, 2)
    assert sorted(a) == sorted(b) == ["example_mask", "label", "tokens", "tokens_lengths"]
    assert a["tokens_lengths"].tolist() == [4, 4]
    assert equal.batch_axes == mixed.batch_axes
    # B == T: the classifier must not read transposed data
    square = data.PaddedBatcher({"t": [np.arange(3) + 10 * i for i in range(6)]}, 3, shuffle=False)
    np.testing.assert_array_equal(square.at_step(0)["t"][:, 1], np.arange(3) + 10)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    lengths=st.one_of(
        st.lists(st.integers(0, 6), min_size=1, max_size=17),  # mixed
        st.tuples(st.integers(0, 6), st.integers(1, 17)).map(lambda t: [t[0]] * t[1]),  # equal
    ),
    batch_size=st.integers(1, 5),
    num_buckets=st.integers(1, 3),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
)
def test_padded_batcher_any_lengths_one_layout_every_example_once(
    lengths, batch_size, num_buckets, shuffle, seed
):
    n = len(lengths)
    num_buckets = min(num_buckets, n)
    tokens = [np.arange(t, dtype=np.int64) + 100 * i for i, t in enumerate(lengths)]
    feats = [np.full((t, 2), i, np.float64) for i, t in enumerate(lengths)]
    bt = data.PaddedBatcher(
        {"tokens": tokens, "feats": feats, "id": np.arange(n)},
        batch_size, num_buckets=num_buckets, shuffle=shuffle, seed=seed, pad_value=-7,
    )  # fmt: skip
    assert bt.sequence_fields == ["tokens", "feats"]
    assert bt.batch_axes == {
        "tokens": 1, "feats": 1, "id": 0, "tokens_lengths": 0, "feats_lengths": 0,
        "example_mask": 0,
    }  # fmt: skip
    want_batches = sum(-(-len(b) // batch_size) for b in bt.buckets)
    batches = list(bt)
    assert len(bt) == bt.num_batches == len(batches) == want_batches
    real, dup = [], []
    for batch in batches:
        assert sorted(batch) == sorted(bt.batch_axes)
        t = batch["tokens"].shape[0]
        assert batch["tokens"].shape == (t, batch_size) and batch["tokens"].dtype == np.int32
        assert batch["feats"].shape == (t, batch_size, 2) and batch["feats"].dtype == np.float32
        assert batch["id"].shape == batch["example_mask"].shape == (batch_size,)
        assert batch["tokens_lengths"].dtype == np.int32
        for j, i in enumerate(batch["id"]):
            ln = lengths[i]
            assert batch["tokens_lengths"][j] == batch["feats_lengths"][j] == ln
            np.testing.assert_array_equal(batch["tokens"][:ln, j], tokens[i])
            assert (batch["tokens"][ln:, j] == -7).all() and (batch["feats"][ln:, j] == -7).all()
        real += batch["id"][batch["example_mask"]].tolist()
        dup += batch["id"][~batch["example_mask"]].tolist()
    assert sorted(real) == list(range(n))  # every example exactly once per epoch
    assert len(dup) == len(batches) * batch_size - n  # the rest are marked duplicates
    for batch in batches:  # the duplicates fill the end of a batch: True..., then False...
        assert (np.diff(batch["example_mask"].astype(int)) <= 0).all()
    # iteration is epoch 0 in order, the same batches at_step gives
    for i, batch in enumerate(bt):
        np.testing.assert_array_equal(batch["id"], bt.at_step(i)["id"])
    second = [b["id"].tolist() for b in bt.epoch(1)]
    assert second == [bt.at_step(len(bt) + i)["id"].tolist() for i in range(len(bt))]


def test_stream_and_series_batchers_are_iterable_and_sized():
    st_bt = data.StreamBatcher(np.arange(33) % 5, num_streams=3, chunk_len=4)
    chunks = list(st_bt)
    assert len(st_bt) == st_bt.num_chunks == len(chunks) == 3
    for i, ch in enumerate(chunks):
        np.testing.assert_array_equal(ch.inputs, st_bt.chunk(i).inputs)
    se_bt = data.SeriesBatcher(np.linspace(0, 1, 40), 2, 5)
    assert len(se_bt) == 4 and [c.mask.sum() for c in se_bt] == [
        c.mask.sum() for c in (se_bt.chunk(i) for i in range(4))
    ]
