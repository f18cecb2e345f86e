import hashlib

import numpy as np
import pytest

from jaxseq import data


def test_char_vocab_roundtrip_and_unknown():
    v = data.CharVocab.from_text("hello world")
    assert v.size == len(set("hello world")) and v.chars == "".join(sorted(set("hello world")))
    ids = v.encode("hold")
    assert ids.dtype == np.int32 and v.decode(ids) == "hold"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        v.encode("zz")
    with pytest.raises(ValueError, match="ids: expected values"):
        v.decode([v.size])


def test_split_text():
    a, b = data.split_text("abcdefghij", 0.9)
    assert (a, b) == ("abcdefghi", "j")


def test_make_streams_is_contiguous_time_major():
    ids = np.arange(23)
    s, _ = data.make_streams(ids, 4)
    assert s.shape == (5, 4) and s.dtype == np.int32
    for b in range(4):
        np.testing.assert_array_equal(s[:, b], ids[b * 5 : (b + 1) * 5])


def test_batcher_covers_every_pair_once_with_masked_partial_tail():
    ids = np.arange(3 * 11)  # B=3 streams of L=11 -> 10 (input, target) steps
    bt = data.StreamBatcher(ids, 3, 4)
    assert bt.num_chunks == 3  # 4 + 4 + 2
    pairs = []
    for i in range(bt.num_chunks):
        c = bt.chunk(i)
        assert c.inputs.shape == (4, 3) and c.mask.dtype == bool
        pairs += list(zip(c.inputs[c.mask].tolist(), c.targets[c.mask].tolist()))
    assert sorted(pairs) == sorted((t, t + 1) for b in range(3) for t in range(b * 11, b * 11 + 10))
    last = bt.chunk(2)
    assert last.mask[:2].all() and not last.mask[2:].any()
    assert bt.chunk(0).reset[0].all() and not bt.chunk(0).reset[1:].any()
    assert not bt.chunk(1).reset.any()
    assert bt.position(7) == (2, 1)
    np.testing.assert_array_equal(bt.at_step(4).inputs, bt.chunk(1).inputs)
    st = bt.stacked(2, 3)
    assert st.inputs.shape == (3, 4, 3)
    np.testing.assert_array_equal(st.inputs[1], bt.chunk(0).inputs)  # step 3 wraps to chunk 0


def test_batcher_resets_every_chunk_and_at_boundaries():
    ids = np.arange(40)
    bnd = np.zeros(40, bool)
    bnd[[6, 25]] = True  # stream 0 at t=6, stream 1 at t=5
    bt = data.StreamBatcher(ids, 2, 4, boundaries=bnd)
    c1 = bt.chunk(1)
    assert c1.reset[2, 0] and c1.reset[1, 1] and c1.reset.sum() == 2
    bt2 = data.StreamBatcher(ids, 2, 4, reset_every_chunk=True)
    assert all(bt2.chunk(i).reset[0].all() for i in range(bt2.num_chunks))


def test_batcher_errors_name_the_problem():
    with pytest.raises(ValueError, match="chunk_len: K=20 is larger than the data"):
        data.StreamBatcher(np.arange(10), 1, 20)
    with pytest.raises(ValueError, match="shorter than one chunk"):
        data.StreamBatcher(np.arange(40), 8, 8)
    with pytest.raises(ValueError, match="vocab_size=5"):
        data.StreamBatcher(np.arange(40), 2, 4, vocab_size=5)
    with pytest.raises(ValueError, match="chunk_len: expected a positive int"):
        data.StreamBatcher(np.arange(40), 2, 0)
    with pytest.raises(ValueError, match="ids: expected a rank-1"):
        data.StreamBatcher(np.zeros((4, 10), int), 2, 2)


def test_pad_sequences():
    out, lengths = data.pad_sequences([[1, 2, 3], [4], []], pad_value=-1)
    np.testing.assert_array_equal(lengths, [3, 1, 0])
    np.testing.assert_array_equal(out, [[1, 4, -1], [2, -1, -1], [3, -1, -1]])


def test_download_caches_checks_sha_and_fails_clearly(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("to be or not to be")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = data.download(src.as_uri(), sha, cache_dir=str(cache))
    assert open(path).read() == "to be or not to be"
    src.unlink()  # the cached copy is reused
    assert data.download(src.as_uri(), sha, cache_dir=str(cache)) == path
    with pytest.raises(RuntimeError, match="could not fetch"):
        data.download(src.as_uri(), "0" * 64, cache_dir=str(cache), filename="other.txt")
    src.write_text("changed")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        data.download(src.as_uri(), "0" * 64, cache_dir=str(cache), filename="other.txt")
    assert not (cache / "other.txt").exists()
