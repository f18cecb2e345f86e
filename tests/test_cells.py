import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

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


KIND = {"rnn_tanh": "tanh", "rnn_relu": "relu", "lstm": "lstm", "gru": "gru"}


def _ref_step(name, p, carry, x, dtype=np.float64):
    """The independent NumPy reference step on the same values, upcast to ``dtype``."""
    arrays = ref.as_arrays(
        jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), p), dtype=dtype
    )
    carry = tuple(np.asarray(np.asarray(c, np.float32), dtype) for c in carry)
    x = np.asarray(np.asarray(x, np.float32), dtype)
    return ref.step(KIND[name], arrays, carry, x)


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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_matches_reference(name, key, dtype):
    """One step from a random carry, every carry leaf (the LSTM's c included) and the
    output, against the NumPy float64 reference."""
    cell = CELLS[name](7)
    p = _random_params(cell, key, 4)
    x = jax.random.normal(jax.random.key(3), (3, 4))
    carry = jax.tree_util.tree_map(
        lambda z: jax.random.normal(jax.random.key(4), z.shape), cell.initial_carry((3,))
    )
    with jax.enable_x64(dtype == "float64"):
        args = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), (p, carry, x))
        new, y = jax.jit(cell.step)(*args)
        assert y.dtype == jnp.dtype(dtype) and all(c.dtype == jnp.dtype(dtype) for c in new)
        got = (tuple(np.asarray(c) for c in new), np.asarray(y))
    ref.assert_close(got, _ref_step(name, p, carry, x), ref.TOL[dtype], name)
    np.testing.assert_array_equal(got[1], got[0][0])  # y is h


def test_project_then_recur_matches_reference(name, key):
    cell = CELLS[name](5)
    p = _random_params(cell, key, 3)
    xs = jax.random.normal(key, (4, 2, 3))
    xp = cell.project(p, xs)
    assert xp.shape == (4, 2, GATES[name] * 5) and xp.dtype == jnp.float32
    arrays = ref.as_arrays(p)
    want_xp = np.asarray(xs, np.float64) @ arrays["w_ih"] + arrays["b"]
    ref.assert_close(xp, want_xp, ref.TOL["float32"], "project")
    carry = jax.tree_util.tree_map(
        lambda z: jax.random.normal(jax.random.key(4), z.shape), cell.initial_carry((2,))
    )
    new, y = cell.recur(p, carry, xp[0])
    got = (tuple(new), y)
    ref.assert_close(got, _ref_step(name, p, carry, xs[0]), ref.TOL["float32"], "recur")


def test_vmap_equals_explicit_batch(name, key):
    cell = CELLS[name](5)
    p = _random_params(cell, key, 3)
    x = jax.random.normal(key, (6, 3))
    batched = cell.step(p, cell.initial_carry((6,)), x)
    per_ex = jax.vmap(lambda xi: cell.step(p, cell.initial_carry(()), xi))(x)
    chex.assert_trees_all_close(batched, per_ex, rtol=1e-6)


class StepVariants(chex.TestCase):
    """``cell.step`` jitted and not, on device arrays and on NumPy inputs (chex's
    variants), equals the NumPy float64 reference step, every carry leaf and the output."""

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    @parameterized.parameters(*sorted(CELLS))
    def test_step_equals_the_reference(self, name):
        key = jax.random.key(5)
        cell = CELLS[name](5)
        p = _random_params(cell, key, 3)
        x = jax.random.normal(key, (2, 3))
        c = jax.tree_util.tree_map(
            lambda z: jax.random.normal(jax.random.key(6), z.shape), cell.initial_carry((2,))
        )
        new, y = self.variant(cell.step)(p, c, x)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, c)
        got = (tuple(np.asarray(leaf) for leaf in new), np.asarray(y))
        ref.assert_close(got, _ref_step(name, p, c, x), ref.TOL["float32"], name)


def _bf16(a):
    return jnp.asarray(a, jnp.bfloat16)


def test_bfloat16_operands_compute_in_float32(name, key):
    """bfloat16 inputs and params with a float32 carry: the matmuls accumulate and the
    gate math runs in float32, so the result equals the float64 reference on the same
    bfloat16 values to float32 round-off. Rounding any matmul, the pre-activations or
    the gates to bfloat16 is off by ~1e-3 to 1e-2, hundreds of times the tolerance."""
    cell = CELLS[name](16)
    d = 24  # long enough sums that a bfloat16 accumulation shows
    p = jax.tree_util.tree_map(_bf16, _random_params(cell, key, d))
    x = _bf16(jax.random.normal(jax.random.key(3), (3, d)))
    # A float32 carry with values that bfloat16 cannot hold.
    carry = jax.tree_util.tree_map(
        lambda z: 0.7 * jax.random.normal(jax.random.key(4), z.shape), cell.initial_carry((3,))
    )
    new, y = cell.step(p, carry, x)
    assert y.dtype == jnp.float32 and all(c.dtype == jnp.float32 for c in new)
    want = _ref_step(name, p, carry, x)
    ref.assert_close((tuple(new), y), want, ref.TOL["float32"], "bf16 x and params")
    xp = cell.project(p, x)
    assert xp.dtype == jnp.float32
    arrays = ref.as_arrays(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), p))
    want_xp = np.asarray(np.asarray(x, np.float32), np.float64) @ arrays["w_ih"] + arrays["b"]
    ref.assert_close(xp, want_xp, ref.TOL["float32"], "project")
    # bf16 inputs with float32 params: the same.
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p)
    new, y = cell.step(p32, carry, x)
    assert y.dtype == jnp.float32
    ref.assert_close((tuple(new), y), want, ref.TOL["float32"], "bf16 x")


def test_bfloat16_carry_keeps_its_dtype(name, key):
    """A bfloat16 carry stays bfloat16: the float32 result rounded once, to within one
    bfloat16 rounding of the reference."""
    cell = CELLS[name](8)
    p = jax.tree_util.tree_map(_bf16, _random_params(cell, key, 4))
    x = _bf16(jax.random.normal(key, (3, 4)))
    c16 = jax.tree_util.tree_map(
        lambda z: _bf16(0.7 * jax.random.normal(jax.random.key(4), z.shape)),
        cell.initial_carry((3,)),
    )
    new, y16 = cell.step(p, c16, x)
    assert y16.dtype == jnp.bfloat16 and all(c.dtype == jnp.bfloat16 for c in new)
    want = _ref_step(name, p, c16, x)
    got = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), (tuple(new), y16))
    ref.assert_close(got, want, 2.0**-8, "bf16 carry")


def test_init_is_deterministic_and_gate_blocks(key):
    cell = js.LSTM(4, forget_bias=2.5)
    p1, p2 = cell.init(key, 3), cell.init(key, 3)
    chex.assert_trees_all_equal(p1, p2)
    np.testing.assert_array_equal(p1.b, np.r_[np.zeros(4), 2.5 * np.ones(4), np.zeros(8)])
    # Default recurrent init: each [H, H] gate block is orthogonal.
    for blk in np.split(np.asarray(p1.w_hh), 4, axis=1):
        np.testing.assert_allclose(blk.T @ blk, np.eye(4), atol=1e-5)
    # Each gate block of the input weights is drawn on its own.
    blocks = np.split(np.asarray(p1.w_ih), 4, axis=1)
    assert all(np.all(blocks[i] != blocks[j]) for i in range(4) for j in range(i))


def test_init_biases_exact(key):
    """The default forget bias is 1 on the f block only (order i, f, g, o); bias_init
    fills every block and the forget bias adds to it; the GRU's b_hn comes from
    bias_init too; identity() gives one identity per gate block."""
    c = inits.constant(0.5)
    eye = inits.identity()

    def np32(a):
        return np.asarray(a, np.float32)

    p = js.LSTM(3).init(key, 2)
    np.testing.assert_array_equal(p.b, np.r_[np.zeros(3), np.ones(3), np.zeros(6)])
    p = js.LSTM(3, forget_bias=-2.0, bias_init=c).init(key, 2)
    np.testing.assert_array_equal(p.b, np.r_[[0.5] * 3, [-1.5] * 3, [0.5] * 6])
    p = js.LSTM(3, bias_init=c, recurrent_init=eye).init(key, 2, jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in p)
    np.testing.assert_array_equal(np32(p.b), np.r_[[0.5] * 3, [1.5] * 3, [0.5] * 6])
    np.testing.assert_array_equal(np32(p.w_hh), np.tile(np.eye(3), (1, 4)))
    p = js.GRU(3).init(key, 2)
    np.testing.assert_array_equal(p.b, np.zeros(9))
    np.testing.assert_array_equal(p.b_hn, np.zeros(3))
    p = js.GRU(3, bias_init=c, recurrent_init=eye).init(key, 2)
    np.testing.assert_array_equal(p.b, 0.5 * np.ones(9))
    np.testing.assert_array_equal(p.b_hn, 0.5 * np.ones(3))
    np.testing.assert_array_equal(p.w_hh, np.tile(np.eye(3), (1, 3)))
    for act in ("tanh", "relu"):
        p = js.RNN(3, activation=act, bias_init=c).init(key, 2)
        np.testing.assert_array_equal(p.b, 0.5 * np.ones(3))
        assert p.w_ih.shape == (2, 3) and p.w_hh.shape == (3, 3)


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
    carry, ys = js.rollout(cell, p, jnp.zeros((50, 2, 3)), js.recurrent.RNNCarry(h0))
    np.testing.assert_array_equal(carry.h, h0)
    np.testing.assert_array_equal(ys, jnp.broadcast_to(h0, (50, 2, 6)))


def test_lstm_huge_forget_bias_keeps_c(key):
    # Forget gate saturated open, input gate saturated shut: c is carried unchanged.
    cell = js.LSTM(4, forget_bias=1e4)
    p = cell.init(key, 3)
    p = p._replace(b=p.b.at[:4].set(-1e4))
    c0 = jax.random.normal(key, (2, 4))
    h0 = jax.random.normal(jax.random.key(9), (2, 4))
    carry, _ = js.rollout(cell, p, jnp.zeros((30, 2, 3)), js.recurrent.LSTMCarry(h0, c0))
    np.testing.assert_array_equal(carry.c, c0)


def test_gru_update_gate_closed_keeps_h(key):
    cell = js.GRU(4)
    p = cell.init(key, 3)
    p = p._replace(b=p.b.at[4:8].set(1e4))  # z = 1: h_t = h_{t-1}
    h0 = jax.random.normal(key, (2, 4))
    carry, _ = js.rollout(cell, p, jax.random.normal(key, (20, 2, 3)), js.recurrent.RNNCarry(h0))
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
        cell.step(js.nn.DenseParams(p.w_ih, p.b), c, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"params.w_hh: expected shape"):
        cell.step(p._replace(w_hh=p.w_hh[:3]), c, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="x: expected rank >= 1"):
        cell.step(p, cell.initial_carry(()), jnp.float32(1.0))


def test_wrong_carry_type(key):
    cell = js.LSTM(4)
    p = cell.init(key, 3)
    with pytest.raises(TypeError, match=r"carry: expected LSTMCarry\('h', 'c'\)"):
        cell.step(p, js.recurrent.RNNCarry(jnp.zeros((2, 4))), jnp.zeros((2, 3)))


def test_check_projected(name, key):
    """``check_projected`` accepts ``xp: [*B, G*H]`` with a matching carry and names
    the argument when the last dim or the carry is wrong."""
    cell = CELLS[name](4)
    p = cell.init(key, 3)
    c = cell.initial_carry((2,))
    gh = cell.num_gates * 4
    xp = cell.project(p, jnp.zeros((2, 3)))
    assert xp.shape == (2, gh)
    cell.check_projected(p, xp, c)  # no error
    cell.check_projected(p, xp[0], cell.initial_carry(()))
    with pytest.raises(ValueError, match=rf"xp: expected last dim G\*H={gh}, got float32\[2, 5\]"):
        cell.check_projected(p, jnp.zeros((2, 5)), c)
    with pytest.raises(ValueError, match=r"proj: expected last dim"):
        cell.check_projected(p, jnp.zeros((2, 5)), c, name="proj")
    with pytest.raises(ValueError, match=r"carry.h: expected shape \[3, 4\]"):
        cell.check_projected(p, jnp.zeros((3, gh)), c)


def test_rank_error_names_the_expected_layout(key):
    """A scalar input is refused with the layout the step expects."""
    cell = js.GRU(4)
    p = cell.init(key, 3)
    with pytest.raises(ValueError, match=r"x: expected rank >= 1 \[\.\.\., D\], got rank 0"):
        cell.step(p, cell.initial_carry(()), jnp.float32(1.0))
