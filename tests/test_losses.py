import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import masks
from jaxseq.training import losses


def _np_xent(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_cross_entropy_matches_numpy_with_mask(key):
    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (5, 3, 7)) * 3
    targets = jax.random.randint(k2, (5, 3), 0, 7)
    mask = jax.random.bernoulli(k3, 0.6, (5, 3)).at[0, 0].set(True)
    per = _np_xent(np.asarray(logits, np.float64), np.asarray(targets))
    want = (per * np.asarray(mask)).sum() / np.asarray(mask).sum()
    got = losses.cross_entropy(logits, targets, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(losses.cross_entropy(logits, targets), per.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        losses.token_cross_entropy(logits, targets), per, rtol=1e-5, atol=1e-6
    )


def test_lengths_equal_mask(key):
    logits = jax.random.normal(key, (6, 4, 5))
    targets = jnp.zeros((6, 4), jnp.int32)
    lengths = jnp.array([6, 0, 3, 1])
    mask = masks.lengths_to_mask(lengths, 6)
    assert mask.shape == (6, 4) and bool(mask[2, 2]) and not bool(mask[3, 2])
    np.testing.assert_allclose(
        losses.cross_entropy(logits, targets, lengths=lengths),
        losses.cross_entropy(logits, targets, mask),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.accuracy(logits, targets, lengths=lengths), losses.accuracy(logits, targets, mask)
    )


def test_all_masked_is_zero_not_nan():
    logits = jnp.ones((3, 2, 4))
    targets = jnp.zeros((3, 2), jnp.int32)
    out = losses.cross_entropy(logits, targets, jnp.zeros((3, 2), bool))
    assert float(out) == 0.0
    g = jax.grad(lambda lg: losses.cross_entropy(lg, targets, jnp.zeros((3, 2), bool)))(logits)
    assert np.all(np.isfinite(g))


def test_stable_for_huge_logits_and_bf16():
    logits = jnp.array([[1e4, -1e4, 0.0]])
    assert np.isfinite(float(losses.cross_entropy(logits, jnp.array([1]))))
    np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([0])), 0.0, atol=1e-6)
    lb = jnp.array([[2.0, 1.0, 0.5]], jnp.bfloat16)
    out = losses.cross_entropy(lb, jnp.array([2]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, _np_xent(np.array([[2.0, 1.0, 0.5]]), np.array([2]))[0], rtol=1e-2
    )


def test_accuracy_bits_and_uniform_loss():
    logits = jnp.array([[0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    targets = jnp.array([1, 1, 1])
    np.testing.assert_allclose(losses.accuracy(logits, targets), 2 / 3, rtol=1e-6)
    v = 8
    uni = losses.cross_entropy(jnp.zeros((4, v)), jnp.arange(4))
    np.testing.assert_allclose(uni, math.log(v), rtol=1e-6)
    np.testing.assert_allclose(
        losses.bits_per_token(jnp.zeros((4, v)), jnp.arange(4)), 3.0, rtol=1e-6
    )
    np.testing.assert_allclose(losses.nats_to_bits(math.log(2.0)), 1.0)


def test_mse_masks_positions():
    p = jnp.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
    t = jnp.array([[1.0, 0.0], [3.0, 1.0], [9.0, 9.0]])
    mask = jnp.array([True, True, False])
    np.testing.assert_allclose(losses.mse(p, t, mask), (4 + 16) / 4, rtol=1e-6)
    np.testing.assert_allclose(losses.mse(p, t), (4 + 16 + 162) / 6, rtol=1e-6)


def test_bad_inputs_name_the_argument():
    logits = jnp.zeros((4, 3, 5))
    with pytest.raises(ValueError, match=r"targets: expected shape \[4, 3\]"):
        losses.cross_entropy(logits, jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(TypeError, match="targets: expected an integer dtype"):
        losses.cross_entropy(logits, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="mask: expected shape"):
        losses.cross_entropy(logits, jnp.zeros((4, 3), jnp.int32), jnp.ones((3, 4), bool))
    with pytest.raises(ValueError, match="lengths: expected shape"):
        losses.cross_entropy(
            logits, jnp.zeros((4, 3), jnp.int32), lengths=jnp.ones((4,), jnp.int32)
        )
    with pytest.raises(ValueError, match="at most one"):
        losses.cross_entropy(
            logits, jnp.zeros((4, 3), jnp.int32), jnp.ones((4, 3), bool), lengths=jnp.ones(3, int)
        )
    with pytest.raises(ValueError, match="targets: expected shape"):
        losses.mse(jnp.zeros((3, 2)), jnp.zeros((3, 3)))
    # a value that is no array at all: the TypeError names the argument
    with pytest.raises(TypeError, match="targets: expected an array"):
        losses.mse(jnp.zeros((3, 2)), "not an array")
    with pytest.raises(TypeError, match="predictions: expected an array"):
        losses.mse("not an array", jnp.zeros((3, 2)))


# -- float64 references on bfloat16 inputs ------------------------------------------------
#
# Logits of large magnitude with many distinct values: a log-softmax evaluated in
# bfloat16 (8 significant bits) is off by ~1e-1 here, one in float32 by ~1e-5. The
# references below take the same bf16-rounded values, upcast to float64.


def _bf16_logits(seed, shape, scale=30.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def _ref_token_xent(x64, targets):
    m = x64.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(x64 - m).sum(-1))
    return lse - np.take_along_axis(x64, targets[..., None], -1)[..., 0]


def _ref_logp(x64):
    m = x64.max(-1, keepdims=True)
    return x64 - m - np.log(np.exp(x64 - m).sum(-1, keepdims=True))


def test_bf16_logits_token_cross_entropy_is_float32_accurate():
    x, x64 = _bf16_logits(0, (7, 4, 50))
    targets = np.random.default_rng(1).integers(0, 50, size=(7, 4))
    want = _ref_token_xent(x64, targets)
    assert np.abs(want).max() > 10  # large losses: bf16 rounding would show
    got = losses.token_cross_entropy(x, jnp.asarray(targets, jnp.int32))
    assert got.dtype == jnp.float32 and got.shape == (7, 4)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=2e-5)
    # the same values given as float32 give the same per-token losses
    got32 = losses.token_cross_entropy(x.astype(jnp.float32), jnp.asarray(targets, jnp.int32))
    np.testing.assert_allclose(got, got32, rtol=1e-6, atol=1e-5)


def test_bf16_cross_entropy_mask_lengths_and_none_against_float64():
    t, b, v = 9, 5, 64
    x, x64 = _bf16_logits(2, (t, b, v))
    targets = np.random.default_rng(3).integers(0, v, size=(t, b))
    per = _ref_token_xent(x64, targets)
    tg = jnp.asarray(targets, jnp.int32)
    # no mask: mean over every token
    got = losses.cross_entropy(x, tg)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), per.mean(), rtol=2e-6)
    # explicit mask with holes: only the True entries count
    mask = np.random.default_rng(4).random((t, b)) < 0.5
    mask[0, 0] = True
    np.testing.assert_allclose(
        float(losses.cross_entropy(x, tg, jnp.asarray(mask))), per[mask].mean(), rtol=2e-6
    )
    # lengths: step s of sequence j counts when s < lengths[j]; a length of 0 counts nothing
    lengths = np.array([9, 0, 4, 1, 7])
    lmask = np.arange(t)[:, None] < lengths[None, :]
    want = per[lmask].mean()
    np.testing.assert_allclose(
        float(losses.cross_entropy(x, tg, lengths=jnp.asarray(lengths))), want, rtol=2e-6
    )
    np.testing.assert_allclose(
        float(losses.bits_per_token(x, tg, lengths=jnp.asarray(lengths))),
        want / np.log(2.0),
        rtol=2e-6,
    )
    # the mean is a mean: masking out positions changes the answer (not a sum)
    assert abs(per[lmask].sum() - want) > 1.0
    # a mask that masks out everything is 0
    assert float(losses.cross_entropy(x, tg, jnp.zeros((t, b), bool))) == 0.0


def test_bf16_cross_entropy_gradient_against_float64():
    t, b, v = 4, 3, 40
    x, x64 = _bf16_logits(5, (t, b, v), scale=8.0)
    targets = np.random.default_rng(6).integers(0, v, size=(t, b))
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]], bool)
    # d mean_{mask}(lse - x[target]) / dx = mask * (softmax - onehot) / count
    p = np.exp(_ref_logp(x64))
    onehot = np.eye(v)[targets]
    want = (p - onehot) * mask[..., None] / mask.sum()
    xf = x.astype(jnp.float32)
    g = jax.grad(losses.cross_entropy)(xf, jnp.asarray(targets, jnp.int32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-5, atol=1e-7)


def test_accuracy_and_mse_against_numpy_with_mask_and_lengths():
    t, b, v = 6, 4, 11
    x, x64 = _bf16_logits(7, (t, b, v))
    targets = np.argmax(x64, -1)
    targets[::2, 1] = (targets[::2, 1] + 1) % v  # some misses
    hit = np.argmax(x64, -1) == targets
    mask = np.random.default_rng(8).random((t, b)) < 0.6
    mask[0, 1] = True
    tg = jnp.asarray(targets, jnp.int32)
    np.testing.assert_allclose(float(losses.accuracy(x, tg)), hit.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        float(losses.accuracy(x, tg, jnp.asarray(mask))), hit[mask].mean(), rtol=1e-6
    )
    lengths = np.array([6, 3, 1, 0])
    lmask = np.arange(t)[:, None] < lengths[None, :]
    np.testing.assert_allclose(
        float(losses.accuracy(x, tg, lengths=jnp.asarray(lengths))), hit[lmask].mean(), rtol=1e-6
    )
    # mse: per-position mean over features, then a mean over valid positions
    rng = np.random.default_rng(9)
    pred = jnp.asarray(rng.normal(size=(t, b, 3)) * 10, jnp.bfloat16)
    tgt = jnp.asarray(rng.normal(size=(t, b, 3)), jnp.float32)
    p64 = np.asarray(pred.astype(jnp.float32), np.float64)
    err = ((p64 - np.asarray(tgt, np.float64)) ** 2).mean(-1)
    np.testing.assert_allclose(float(losses.mse(pred, tgt)), err.mean(), rtol=2e-6)
    np.testing.assert_allclose(
        float(losses.mse(pred, tgt, jnp.asarray(mask))), err[mask].mean(), rtol=2e-6
    )
    np.testing.assert_allclose(
        float(losses.mse(pred, tgt, lengths=jnp.asarray(lengths))), err[lmask].mean(), rtol=2e-6
    )


def test_bits_per_token_honours_a_positional_mask():
    logits = jnp.asarray(np.random.default_rng(10).normal(size=(4, 3, 6)) * 3, jnp.float32)
    targets = jnp.asarray(np.random.default_rng(11).integers(0, 6, size=(4, 3)), jnp.int32)
    mask = jnp.asarray(np.random.default_rng(12).random((4, 3)) < 0.5).at[0, 0].set(True)
    per = _np_xent(np.asarray(logits, np.float64), np.asarray(targets))
    want = per[np.asarray(mask)].mean() / np.log(2.0)
    assert abs(want - per.mean() / np.log(2.0)) > 1e-3  # the mask changes the answer
    np.testing.assert_allclose(float(losses.bits_per_token(logits, targets, mask)), want, rtol=1e-5)


def test_lengths_to_mask_under_x64_and_strict_dtype_promotion():
    # int32 steps against int32 lengths: no implicit int32/int64 promotion, which
    # strict promotion forbids, even when x64 makes the default integer int64
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        lengths = jnp.asarray([2, 0, 3], jnp.int32)
        mask = masks.lengths_to_mask(lengths, 4)
        assert mask.dtype == jnp.bool_ and mask.shape == (4, 3)
        want = np.arange(4)[:, None] < np.array([2, 0, 3])[None, :]
        np.testing.assert_array_equal(np.asarray(mask), want)
        logits = jnp.zeros((4, 3, 5), jnp.float32)
        got = losses.cross_entropy(logits, jnp.zeros((4, 3), jnp.int32), lengths=lengths)
        np.testing.assert_allclose(float(got), math.log(5.0), rtol=1e-6)


def test_non_array_arguments_are_named_and_a_numeric_mask_counts_as_bool():
    logits = jnp.zeros((4, 3, 5))
    tg = jnp.zeros((4, 3), jnp.int32)
    for args, kwargs, name in [
        (("not an array", tg), {}, "logits"),
        ((logits, "not an array"), {}, "targets"),
        ((logits, tg, "not an array"), {}, "mask"),
        ((logits, tg), {"lengths": "not an array"}, "lengths"),
    ]:
        with pytest.raises(TypeError, match=rf"^{name}: expected an array"):
            losses.cross_entropy(*args, **kwargs)
    with pytest.raises(TypeError, match=r"^targets: expected an integer dtype"):
        losses.token_cross_entropy(logits, jnp.zeros((4, 3)))
    # a mask of non-zero integers is a mask of True (a weight of 1, not of the value)
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 5, size=(4, 3)), jnp.int32)
    bmask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]], bool)
    imask = jnp.asarray(bmask * np.array([[3], [1], [5], [2]]), jnp.int32)
    want = float(losses.cross_entropy(x, t, jnp.asarray(bmask)))
    np.testing.assert_allclose(float(losses.cross_entropy(x, t, imask)), want, rtol=1e-6)
