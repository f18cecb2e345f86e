"""js.training.evaluate: means over the real examples (example_mask), any metric form,
one compilation per batch shape, errors that name the argument."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import data

evaluate = js.training.evaluate


def _batches(rng, sizes, with_mask=True):
    """Dict batches with exactly representable values (multiples of 1/8), counts and masks."""
    out = []
    for b in sizes:
        batch = {
            "v": (rng.integers(-50, 50, size=b) / 8).astype(np.float32),
            "n": rng.integers(0, 5, size=b).astype(np.int32),
            "hit": rng.integers(0, 5, size=b).astype(np.int32),
        }
        if with_mask:
            batch["example_mask"] = rng.random(b) < 0.7
        out.append(batch)
    return out


def _reference(batches):
    """NumPy float64: the mean of v and sum(hit)/sum(n) over the examples whose mask is True."""
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    keep = cat.get("example_mask", np.ones(len(cat["v"]), bool))
    v, n, hit = (cat[k][keep].astype(np.float64) for k in ("v", "n", "hit"))
    return {"mean_v": v.sum() / len(v), "ratio": hit.sum() / n.sum()}


def _apply(params, batch):
    return batch["v"] * params, batch


METRICS = {
    "mean_v": lambda out, batch: out[0],
    "ratio": lambda out, batch: (batch["hit"], batch["n"]),
}


def _metrics_fn(out, batch):
    return {name: fn(out, batch) for name, fn in METRICS.items()}


def _apply_returning_metrics(params, batch):
    return _metrics_fn(_apply(params, batch), batch)


@pytest.mark.parametrize("form", ["dict", "function", "none"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_evaluate_weights_by_example_mask_exactly_as_numpy(form, with_mask):
    rng = np.random.default_rng(0)
    batches = _batches(rng, [5, 5, 5, 3], with_mask)
    if form == "dict":
        got = evaluate(_apply, jnp.float32(1.0), batches, METRICS)
    elif form == "function":
        got = evaluate(_apply, jnp.float32(1.0), batches, _metrics_fn)
    else:
        got = evaluate(_apply_returning_metrics, jnp.float32(1.0), batches)
    want = _reference(batches)
    assert set(got) == {"mean_v", "ratio"}
    assert all(isinstance(x, float) for x in got.values())
    assert got == want  # exact: every partial sum is exact in float32


def test_evaluate_ignores_values_of_masked_examples_even_nan():
    batch = {
        "v": np.array([1.0, np.nan, 3.0, np.inf], np.float32),
        "example_mask": np.array([True, False, True, False]),
    }
    got = evaluate(lambda p, b: {"v": b["v"]}, None, [batch])
    assert got == {"v": 2.0}
    # a metric counting nothing is NaN, not an error or 0
    none = {"v": np.zeros(2, np.float32), "example_mask": np.zeros(2, bool)}
    assert np.isnan(evaluate(lambda p, b: {"v": b["v"]}, None, [none])["v"])


@pytest.mark.parametrize("num_buckets,shuffle", [(1, False), (3, True)])
def test_evaluate_over_a_padded_batcher_counts_every_example_once(num_buckets, shuffle):
    rng = np.random.default_rng(1)
    n = 23  # batches of 4: duplicates fill the last batch of every bucket
    lengths = rng.integers(1, 9, size=n)
    value = (rng.integers(-40, 40, size=n) / 4).astype(np.float32)
    bt = data.PaddedBatcher(
        {"tokens": [np.ones(t, np.int32) for t in lengths], "value": value},
        4, num_buckets=num_buckets, shuffle=shuffle, seed=2,
    )  # fmt: skip
    assert sum((~b["example_mask"]).sum() for b in bt) > 0  # there are duplicates

    def apply_fn(params, batch):  # per-example: the value, and the tokens it holds
        tokens = jnp.sum(jnp.where(batch["tokens"] > 0, 1, 0), axis=0)
        return {"value": batch["value"], "tokens": (tokens, jnp.ones_like(tokens))}

    got = evaluate(apply_fn, None, bt)
    assert got["value"] == float(value.astype(np.float64).mean())
    assert got["tokens"] == float(lengths.mean())


def test_evaluate_compiles_once_per_batch_shape():
    @chex.assert_max_traces(n=3)  # one trace per batch shape, none for new params
    def apply_fn(params, batch):
        return jnp.sum(batch["tokens"], axis=0) * params

    metrics = {"s": lambda out, batch: out}
    rng = np.random.default_rng(3)
    tokens = [rng.integers(0, 5, size=t) for t in rng.integers(1, 12, size=40)]
    bt = data.PaddedBatcher({"tokens": tokens}, 4, num_buckets=3, shuffle=False)
    shapes = {b["tokens"].shape for b in bt}
    first = evaluate(apply_fn, jnp.float32(2.0), bt, metrics)
    again = evaluate(apply_fn, jnp.float32(3.0), bt, metrics)  # new params: no new trace
    assert len(shapes) == 3
    assert again["s"] == pytest.approx(1.5 * first["s"])


def test_evaluate_errors_name_the_argument():
    batch = {"v": np.zeros(4, np.float32), "example_mask": np.ones(4, bool)}
    ok = {"v": lambda out, b: b["v"]}
    with pytest.raises(ValueError, match=r"metrics\['m'\]: expected per-example values \[B=4\]"):
        evaluate(lambda p, b: b, None, [batch], {"m": lambda out, b: jnp.mean(b["v"])})
    with pytest.raises(ValueError, match=r"expected \(total, count\) of one shape \[4\]"):
        evaluate(lambda p, b: b, None, [batch], {"m": lambda out, b: (b["v"], b["v"][:2])})
    with pytest.raises(TypeError, match="batches: expected an iterable of batches .* got one"):
        evaluate(lambda p, b: b, None, batch, ok)
    with pytest.raises(TypeError, match="batches: expected an iterable of batches"):
        evaluate(lambda p, b: b, None, 3, ok)
    with pytest.raises(ValueError, match="batches: expected at least one batch, got none"):
        evaluate(lambda p, b: b, None, [], ok)
    with pytest.raises(TypeError, match="metrics: expected a non-empty dict"):
        evaluate(lambda p, b: b, None, [batch], ["v"])
    with pytest.raises(TypeError, match=r"apply_fn \(metrics=None\): expected a non-empty dict"):
        evaluate(lambda p, b: b["v"], None, [batch])
    bad_mask = dict(batch, example_mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"example_mask: expected shape \[B\]"):
        evaluate(lambda p, b: b, None, [bad_mask], ok)
