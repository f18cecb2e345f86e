import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import initializers as inits

CELLS = {
    "rnn_tanh": lambda h, **kw: js.RNN(h, **kw),
    "rnn_relu": lambda h, **kw: js.RNN(h, activation="relu", **kw),
    "lstm": lambda h, **kw: js.LSTM(h, **kw),
    "gru": lambda h, **kw: js.GRU(h, **kw),
}
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


@pytest.fixture(params=sorted(CELLS))
def name(request):
    return request.param


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_step(name, p, carry, x):
    """Independent NumPy implementation of one step, for known-value checks."""
    p = {k: np.asarray(v, np.float64) for k, v in p._asdict().items()}
    h = np.asarray(carry.h, np.float64)
    x = np.asarray(x, np.float64)
    if name.startswith("rnn"):
        z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        h = np.tanh(z) if name == "rnn_tanh" else np.maximum(z, 0)
        return (h,), h
    if name == "lstm":
        c = np.asarray(carry.c, np.float64)
        z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        i, f, g, o = np.split(z, 4, axis=-1)
        c = _np_sigmoid(f) * c + _np_sigmoid(i) * np.tanh(g)
        h = _np_sigmoid(o) * np.tanh(c)
        return (h, c), h
    xr, xz, xn = np.split(x @ p["w_ih"] + p["b"], 3, axis=-1)
    hr, hz, hn = np.split(h @ p["w_hh"], 3, axis=-1)
    r = _np_sigmoid(xr + hr)
    z = _np_sigmoid(xz + hz)
    n = np.tanh(xn + r * (hn + p["b_hn"]))
    h = (1 - z) * n + z * h
    return (h,), h


def _random_params(cell, key, d):
    """Params with non-trivial biases so every term is exercised."""
    p = cell.init(key, d)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def test_shapes_and_dtypes(name, key):
    h, d = 6, 5
    cell = CELLS[name](h)
    p = cell.init(key, d)
    g = GATES[name]
    assert p.w_ih.shape == (d, g * h) and p.w_hh.shape == (h, g * h) and p.b.shape == (g * h,)
    for batch in [(), (3,), (2, 4)]:
        carry = cell.initial_carry(batch)
        assert carry.h.shape == batch + (h,) and carry.h.dtype == jnp.float32
        assert not np.any(np.asarray(carry.h))
        x = jax.random.normal(key, batch + (d,))
        new, y = cell.step(p, carry, x)
        assert y.shape == batch + (h,) and y.dtype == jnp.float32
        assert type(new) is type(carry)
        np.testing.assert_array_equal(y, new.h)
    assert cell.input_size(p) == d
    assert cell.output_size == h


def test_step_matches_numpy(name, key):
    cell = CELLS[name](7)
    p = _random_params(cell, key, 4)
    x = jax.random.normal(jax.random.key(3), (3, 4))
    carry = jax.tree_util.tree_map(
        lambda z: jax.random.normal(jax.random.key(4), z.shape), cell.initial_carry((3,))
    )
    new, y = cell.step(p, carry, x)
    ref_carry, ref_y = _np_step(name, p, carry, x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    for a, b in zip(new, ref_carry):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_project_then_recur_equals_step(name, key):
    cell = CELLS[name](5)
    p = _random_params(cell, key, 3)
    xs = jax.random.normal(key, (4, 2, 3))
    xp = cell.project(p, xs)
    assert xp.shape == (4, 2, GATES[name] * 5) and xp.dtype == jnp.float32
    carry = cell.initial_carry((2,))
    c1, y1 = cell.recur(p, carry, xp[0])
    c2, y2 = cell.step(p, carry, xs[0])
    np.testing.assert_allclose(y1, y2, rtol=1e-6)


def test_vmap_equals_explicit_batch(name, key):
    cell = CELLS[name](5)
    p = _random_params(cell, key, 3)
    x = jax.random.normal(key, (6, 3))
    batched = cell.step(p, cell.initial_carry((6,)), x)
    per_ex = jax.vmap(lambda xi: cell.step(p, cell.initial_carry(()), xi))(x)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), batched, per_ex
    )


def test_jit_equals_nojit(name, key):
    cell = CELLS[name](5)
    p = _random_params(cell, key, 3)
    x = jax.random.normal(key, (2, 3))
    c = cell.initial_carry((2,))
    a = cell.step(p, c, x)
    b = jax.jit(cell.step)(p, c, x)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)


def test_bfloat16_inputs_accumulate_in_float32(name, key):
    cell = CELLS[name](8)
    p = cell.init(key, 4)
    x = jax.random.normal(key, (3, 4))
    carry, y = cell.step(p, cell.initial_carry((3,)), x.astype(jnp.bfloat16))
    assert y.dtype == jnp.float32
    _, y32 = cell.step(p, cell.initial_carry((3,)), x)
    np.testing.assert_allclose(y, y32, atol=3e-2)
    # bf16 params and carry: the carry keeps its dtype, the math runs in float32.
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
    c16 = cell.initial_carry((3,), dtype=jnp.bfloat16)
    new, y16 = cell.step(p16, c16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and new.h.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=5e-2)


def test_init_is_deterministic_and_gate_blocks(key):
    cell = js.LSTM(4, forget_bias=2.5)
    p1, p2 = cell.init(key, 3), cell.init(key, 3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
    np.testing.assert_array_equal(p1.b, np.r_[np.zeros(4), 2.5 * np.ones(4), np.zeros(8)])
    # Default recurrent init: each [H, H] gate block is orthogonal.
    for blk in np.split(np.asarray(p1.w_hh), 4, axis=1):
        np.testing.assert_allclose(blk.T @ blk, np.eye(4), atol=1e-5)


def test_zero_weights_give_zero_state_rnn(key):
    cell = js.RNN(5, kernel_init=inits.zeros(), recurrent_init=inits.zeros())
    p = cell.init(key, 3)
    xs = jax.random.normal(key, (10, 2, 3))
    carry, ys = js.rollout(cell, p, xs)
    np.testing.assert_array_equal(ys, 0.0)
    np.testing.assert_array_equal(carry.h, 0.0)


def test_irnn_identity_relu_keeps_h_constant(key):
    cell = js.RNN(6, activation="relu", recurrent_init=inits.identity(), bias_init=inits.zeros())
    p = cell.init(key, 3)
    np.testing.assert_array_equal(p.w_hh, np.eye(6))
    h0 = jnp.abs(jax.random.normal(key, (2, 6)))
    carry, ys = js.rollout(cell, p, jnp.zeros((50, 2, 3)), js.RNNCarry(h0))
    np.testing.assert_array_equal(carry.h, h0)
    np.testing.assert_array_equal(ys, jnp.broadcast_to(h0, (50, 2, 6)))


def test_lstm_huge_forget_bias_keeps_c(key):
    # Forget gate saturated open, input gate saturated shut: c is carried unchanged.
    cell = js.LSTM(4, forget_bias=1e4)
    p = cell.init(key, 3)
    p = p._replace(b=p.b.at[:4].set(-1e4))
    c0 = jax.random.normal(key, (2, 4))
    h0 = jax.random.normal(jax.random.key(9), (2, 4))
    carry, _ = js.rollout(cell, p, jnp.zeros((30, 2, 3)), js.LSTMCarry(h0, c0))
    np.testing.assert_array_equal(carry.c, c0)


def test_gru_update_gate_closed_keeps_h(key):
    cell = js.GRU(4)
    p = cell.init(key, 3)
    p = p._replace(b=p.b.at[4:8].set(1e4))  # z = 1: h_t = h_{t-1}
    h0 = jax.random.normal(key, (2, 4))
    carry, _ = js.rollout(cell, p, jax.random.normal(key, (20, 2, 3)), js.RNNCarry(h0))
    np.testing.assert_array_equal(carry.h, h0)


def test_initializers_shapes_and_statistics(key):
    w = inits.scaled_normal(3.0)(key, (400, 300))
    assert abs(float(jnp.var(w)) - 3.0 / 400) < 0.1 * 3.0 / 400
    w = inits.pytorch_uniform()(key, (50, 64))
    assert float(jnp.max(jnp.abs(w))) <= 1 / 8 and float(jnp.max(jnp.abs(w))) > 0.1
    q = inits.orthogonal(2.0)(key, (5, 3))
    np.testing.assert_allclose(q.T @ q, 4.0 * np.eye(3), atol=1e-5)
    q = inits.orthogonal()(key, (3, 5))
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-5)
    np.testing.assert_array_equal(inits.identity(0.5)(key, (3, 3)), 0.5 * np.eye(3))
    g = inits.glorot_uniform()(key, (10, 30))
    assert float(jnp.max(jnp.abs(g))) <= np.sqrt(6 / 40)
    assert inits.lecun_normal()(key, (4, 4), jnp.bfloat16).dtype == jnp.bfloat16


def test_scaled_normal_course_demo_spectral_radius(key):
    # N(0, c/n) recurrent matrices have spectral radius close to sqrt(c).
    for c in (1.5, 3.0):
        w = np.asarray(inits.scaled_normal(c)(key, (400, 400)))
        rho = np.max(np.abs(np.linalg.eigvals(w)))
        assert abs(rho - np.sqrt(c)) < 0.15 * np.sqrt(c)


# -- bad input ----------------------------------------------------------------------------


def test_bad_config():
    with pytest.raises(ValueError, match="hidden_size: expected a positive int, got 0"):
        js.LSTM(0)
    with pytest.raises(ValueError, match="activation: expected one of"):
        js.RNN(4, activation="sigmoid")
    with pytest.raises(TypeError, match="kernel_init"):
        js.GRU(4, kernel_init=3)


def test_bad_init_args(key):
    with pytest.raises(ValueError, match="input_size: expected a positive int"):
        js.LSTM(4).init(key, 0)
    with pytest.raises(TypeError, match="key: expected a jax.random key"):
        js.LSTM(4).init(123, 3)


def test_bad_step_inputs(name, key):
    cell = CELLS[name](4)
    p = cell.init(key, 3)
    c = cell.initial_carry((2,))
    with pytest.raises(ValueError, match=r"x: expected last dim D=3 .* got float32\[2, 5\]"):
        cell.step(p, c, jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match=r"x: expected a floating dtype, got int32\[2, 3\]"):
        cell.step(p, c, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"carry.h: expected shape \[3, 4\].*got float32\[2, 4\]"):
        cell.step(p, c, jnp.zeros((3, 3)))
    with pytest.raises(TypeError, match="params: expected"):
        cell.step(js.DenseParams(p.w_ih, p.b), c, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"params.w_hh: expected shape"):
        cell.step(p._replace(w_hh=p.w_hh[:3]), c, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="x: expected rank >= 1"):
        cell.step(p, cell.initial_carry(()), jnp.float32(1.0))


def test_wrong_carry_type(key):
    cell = js.LSTM(4)
    p = cell.init(key, 3)
    with pytest.raises(TypeError, match=r"carry: expected LSTMCarry\('h', 'c'\)"):
        cell.step(p, js.RNNCarry(jnp.zeros((2, 4))), jnp.zeros((2, 3)))
