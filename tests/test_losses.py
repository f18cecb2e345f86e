import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import losses


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
    mask = losses.lengths_to_mask(lengths, 6)
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
