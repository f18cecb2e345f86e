"""Every initialiser against its formula: shapes, dtypes, bounds, and the variance of a
large draw (fan_in = shape[0], fan_out = shape[1] for a [in, out] weight).

The draws are (FAN_IN, FAN_OUT) = (600, 150): 90,000 values estimate a variance to
about 0.5%, and using the wrong fan changes it by 25% or more, so the 4% tolerances
below tell the formulas apart.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import initializers as inits

FAN_IN, FAN_OUT = 600, 150
SHAPE = (FAN_IN, FAN_OUT)
VAR_RTOL = 0.04


def _draw(init, key, shape=SHAPE, dtype=jnp.float32):
    w = init(key, shape, dtype)
    assert w.shape == tuple(shape) and w.dtype == dtype
    return np.asarray(w.astype(jnp.float32), np.float64)


def _check_var(w, want_var):
    assert abs(w.mean()) < 4 * math.sqrt(want_var / w.size)  # centred
    np.testing.assert_allclose(w.var(), want_var, rtol=VAR_RTOL)


def test_fans_tell_the_formulas_apart():
    # the tolerance is meaningful: every wrong-fan variance lies well outside it
    glorot = 2 / (FAN_IN + FAN_OUT)
    for wrong in (2 / (2 * FAN_IN), 2 / (2 * FAN_OUT), 2 / FAN_IN, 1 / FAN_IN):
        assert abs(wrong / glorot - 1) > 4 * VAR_RTOL
    lecun = 1 / FAN_IN
    for wrong in (1 / FAN_OUT, 1 / (FAN_IN + FAN_OUT), 2 / (FAN_IN + FAN_OUT)):
        assert abs(wrong / lecun - 1) > 4 * VAR_RTOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_glorot_normal(key, dtype):
    w = _draw(inits.glorot_normal(), key, dtype=dtype)
    _check_var(w, 2.0 / (FAN_IN + FAN_OUT))
    # normal, not uniform: the tails go well past the uniform bound sqrt(3) * std
    std = math.sqrt(2.0 / (FAN_IN + FAN_OUT))
    assert np.abs(w).max() > 3.5 * std
    np.testing.assert_allclose((np.abs(w) > std).mean(), 0.3173, atol=0.01)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_glorot_uniform(key, dtype):
    w = _draw(inits.glorot_uniform(), key, dtype=dtype)
    lim = math.sqrt(6.0 / (FAN_IN + FAN_OUT))
    assert np.abs(w).max() <= lim * (1 + 1e-2 if dtype == jnp.bfloat16 else 1)
    assert np.abs(w).max() > 0.99 * lim  # reaches its bound
    _check_var(w, lim**2 / 3)  # = 2 / (fan_in + fan_out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lecun_normal(key, dtype):
    w = _draw(inits.lecun_normal(), key, dtype=dtype)
    _check_var(w, 1.0 / FAN_IN)
    assert np.abs(w).max() > 3.5 * math.sqrt(1.0 / FAN_IN)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lecun_uniform(key, dtype):
    w = _draw(inits.lecun_uniform(), key, dtype=dtype)
    lim = math.sqrt(3.0 / FAN_IN)
    assert np.abs(w).max() <= lim * (1 + 1e-2 if dtype == jnp.bfloat16 else 1)
    assert np.abs(w).max() > 0.99 * lim
    _check_var(w, 1.0 / FAN_IN)


@pytest.mark.parametrize("c", [0.5, 1.5, 3.0])
def test_scaled_normal(key, c):
    w = _draw(inits.scaled_normal(c), key)
    _check_var(w, c / FAN_IN)
    with pytest.raises(ValueError, match="c: expected > 0"):
        inits.scaled_normal(0.0)


def test_lecun_normal_is_scaled_normal_one(key):
    np.testing.assert_array_equal(
        inits.lecun_normal()(key, (7, 5)), inits.scaled_normal(1.0)(key, (7, 5))
    )


def test_uniform_normal_and_pytorch_uniform(key):
    w = _draw(inits.uniform(0.3), key)
    assert np.abs(w).max() <= 0.3 and np.abs(w).max() > 0.299
    _check_var(w, 0.3**2 / 3)
    w = _draw(inits.normal(0.05), key)
    _check_var(w, 0.05**2)
    # PyTorch: U(+-1/sqrt(H)) with H = shape[-1], the fan-out here
    w = _draw(inits.pytorch_uniform(), key)
    lim = 1.0 / math.sqrt(FAN_OUT)
    assert np.abs(w).max() <= lim and np.abs(w).max() > 0.99 * lim
    _check_var(w, lim**2 / 3)
    b = _draw(inits.pytorch_uniform(), key, shape=(64,))
    assert np.abs(b).max() <= 1 / 8
    with pytest.raises(ValueError, match="scale: expected >= 0"):
        inits.uniform(-1.0)
    with pytest.raises(ValueError, match="stddev: expected >= 0"):
        inits.normal(-1.0)


def test_one_dimensional_shape_uses_its_length_as_both_fans(key):
    w = _draw(inits.glorot_normal(), key, shape=(40000,))
    _check_var(w, 2.0 / (2 * 40000))
    w = _draw(inits.lecun_uniform(), key, shape=(40000,))
    _check_var(w, 1.0 / 40000)


def test_same_key_same_draw_other_key_other_draw(key):
    for init in (
        inits.glorot_normal(),
        inits.glorot_uniform(),
        inits.lecun_normal(),
        inits.lecun_uniform(),
        inits.orthogonal(),
        inits.pytorch_uniform(),
    ):
        a, b = init(key, (6, 6)), init(key, (6, 6))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, init(jax.random.key(1), (6, 6)))


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9), (2, 3, 8)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_orthogonal(key, shape, scale):
    q = np.asarray(inits.orthogonal(scale)(key, shape), np.float64)
    assert q.shape == shape
    m = q.reshape(-1, shape[-1])
    rows, cols = m.shape
    if rows >= cols:  # orthonormal columns
        np.testing.assert_allclose(m.T @ m, scale**2 * np.eye(cols), atol=1e-5)
    else:  # orthonormal rows
        np.testing.assert_allclose(m @ m.T, scale**2 * np.eye(rows), atol=1e-5)
    sv = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(sv, scale, atol=1e-5)
    assert inits.orthogonal()(key, shape, jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="orthogonal needs rank >= 2"):
        inits.orthogonal()(key, (5,))


def test_identity_constant_zeros_ones_exactly(key):
    np.testing.assert_array_equal(inits.identity()(key, (4, 4)), np.eye(4))
    np.testing.assert_array_equal(inits.identity(0.5)(key, (3, 5)), 0.5 * np.eye(3, 5))
    ib = inits.identity(2.0)(key, (3, 3), jnp.bfloat16)
    assert ib.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ib, np.float32), 2.0 * np.eye(3))
    with pytest.raises(ValueError, match="identity needs a 2-D shape"):
        inits.identity()(key, (2, 2, 2))
    np.testing.assert_array_equal(inits.zeros()(key, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(inits.ones()(key, (3,)), np.ones(3))
    c = inits.constant(-1.25)(key, (2, 2), jnp.bfloat16)
    assert c.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(c, np.float32), np.full((2, 2), -1.25))
    with pytest.raises(TypeError, match="shape: expected a tuple of ints"):
        inits.zeros()(key, 3)
    with pytest.raises(ValueError, match="shape: expected non-negative dims"):
        inits.ones()(key, (2, -1))


def test_lstm_forget_gate_bias_exactly(key):
    h = 5
    b = np.asarray(js.LSTM(h).init(key, 3).b)
    want = np.zeros(4 * h)
    want[h : 2 * h] = 1.0  # gates i, f, g, o: only f gets the default forget bias 1
    np.testing.assert_array_equal(b, want)
    cell = js.LSTM(h, forget_bias=2.5, bias_init=inits.constant(0.5))
    b = np.asarray(cell.init(key, 3).b)
    want = np.full(4 * h, 0.5)
    want[h : 2 * h] = 3.0
    np.testing.assert_array_equal(b, want)
    np.testing.assert_array_equal(np.asarray(js.LSTM(h, forget_bias=0.0).init(key, 3).b), 0.0)


def test_cells_apply_initialisers_per_gate_block(key):
    h, d = 4, 3
    cell = js.GRU(h, kernel_init=inits.constant(0.5), recurrent_init=inits.identity(2.0))
    p = cell.init(key, d)
    np.testing.assert_array_equal(p.w_ih, np.full((d, 3 * h), 0.5))
    np.testing.assert_array_equal(p.w_hh, np.tile(2.0 * np.eye(h), (1, 3)))
    np.testing.assert_array_equal(p.b_hn, np.zeros(h))
    # dense layers default to LeCun normal on [D, O]
    w = np.asarray(js.nn.Dense(FAN_OUT).init(key, FAN_IN).w, np.float64)
    _check_var(w, 1.0 / FAN_IN)
