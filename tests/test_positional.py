import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq.attention import positional as pos


def test_sinusoidal_known_values():
    pe = pos.sinusoidal(50, 8)
    assert pe.shape == (50, 8) and pe.dtype == jnp.float32
    # position 0: sin 0 = 0 in even columns, cos 0 = 1 in odd columns
    np.testing.assert_array_equal(pe[0], [0, 1, 0, 1, 0, 1, 0, 1])
    # PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(...)
    t, i = 7, 1
    ang = t / 10000 ** (2 * i / 8)
    np.testing.assert_allclose(pe[t, 2 * i], np.sin(ang), rtol=1e-5)
    np.testing.assert_allclose(pe[t, 2 * i + 1], np.cos(ang), rtol=1e-5)
    np.testing.assert_allclose(pe[1, 0], np.sin(1.0), rtol=1e-6)
    # odd D drops the last cosine; explicit positions match the default
    assert pos.sinusoidal(4, 5).shape == (4, 5)
    np.testing.assert_allclose(pos.sinusoidal(3, 8, positions=jnp.arange(3)), pe[:3], atol=1e-6)
    np.testing.assert_allclose(
        pos.sinusoidal(2, 8, positions=jnp.array([10, 20])), pe[jnp.array([10, 20])], atol=1e-5
    )
    assert pos.sinusoidal(3, 4, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_sinusoidal_relative_shift_is_linear():
    """PE[t + k] is a fixed rotation of PE[t] in each (sin, cos) pair (Vaswani et al.)."""
    pe = np.asarray(pos.sinusoidal(20, 4), np.float64)
    k = 3
    for i in range(2):
        w = 1.0 / 10000 ** (2 * i / 4)
        c, s = np.cos(k * w), np.sin(k * w)
        rot = np.array([[c, -s], [s, c]])
        np.testing.assert_allclose(
            pe[k:, 2 * i : 2 * i + 2], pe[:-k, 2 * i : 2 * i + 2] @ rot, atol=1e-5
        )


def test_learned(key):
    table = pos.LearnedPositions(16).init(key, 4)
    assert table.shape == (16, 4)
    assert 0.005 < float(jnp.std(table)) < 0.05
    np.testing.assert_array_equal(pos.learned(table, 5), table[:5])
    np.testing.assert_array_equal(
        pos.learned(table, positions=jnp.array([3, 0])), table[jnp.array([3, 0])]
    )
    g = jax.grad(lambda t: pos.learned(t, 3).sum())(table)
    np.testing.assert_array_equal(g[:3], 1.0)
    np.testing.assert_array_equal(g[3:], 0.0)
    with pytest.raises(
        ValueError, match=r"length: expected at most T_max=16 \(table rows\), got 17"
    ):
        pos.learned(table, 17)
    with pytest.raises(ValueError, match=r"table: expected rank 2"):
        pos.learned(table[0], 1)


def test_rotary_known_values_and_norms(key):
    x = jax.random.normal(key, (12, 8))
    y = pos.rotary(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y[0], x[0], atol=1e-6)  # position 0 is the identity
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # pair 0 = (x[0], x[4]) rotated by angle t at position t
    t = 3
    c, s = np.cos(t), np.sin(t)
    np.testing.assert_allclose(y[t, 0], x[t, 0] * c - x[t, 4] * s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[t, 4], x[t, 4] * c + x[t, 0] * s, rtol=1e-5, atol=1e-6)
    # per-head layout [T, K, D] rotates each head the same way
    xh = jnp.stack([x, 2 * x], axis=1)
    np.testing.assert_allclose(pos.rotary(xh)[:, 1], 2 * y, rtol=1e-5, atol=1e-6)
    cos, sin = pos.rotary_angles(12, 8)
    assert cos.shape == (12, 4)


def test_rotary_scores_depend_only_on_relative_position(key):
    q, k = jax.random.normal(key, (2, 16))

    def score(m, n):
        qm = pos.rotary(q[None], positions=jnp.array([m]))[0]
        kn = pos.rotary(k[None], positions=jnp.array([n]))[0]
        return float(qm @ kn)

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
    np.testing.assert_allclose(score(0, 7), score(20, 27), rtol=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_rotary_errors():
    with pytest.raises(
        ValueError, match=r"x: rotary encodings need an even last dim D, got float32\[3, 5\]"
    ):
        pos.rotary(jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"positions: expected shape \[T=3\], got int32\[4\]"):
        pos.rotary(jnp.zeros((3, 4)), positions=jnp.arange(4))
    with pytest.raises(ValueError, match=r"x: expected shape \[T, D\] or \[T, K, D\]"):
        pos.rotary(jnp.zeros((4,)))


def test_public_names():
    assert js.attention.positional.sinusoidal is pos.sinusoidal
