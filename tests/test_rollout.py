import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxseq as js

CELLS = {
    "rnn_tanh": js.RNN(5),
    "rnn_relu": js.RNN(5, activation="relu"),
    "lstm": js.LSTM(5),
    "gru": js.GRU(5),
}
T, B, D = 7, 3, 4


def _params(cell, key):
    p = cell.init(key, D)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _data(key, t=T, batch=(B,)):
    kx, kc, kr = jax.random.split(key, 3)
    xs = jax.random.normal(kx, (t, *batch, D))
    lengths = jnp.asarray(np.resize([t, 2, 0, 5, 1], batch).astype(np.int32))
    reset = jax.random.bernoulli(kr, 0.3, (t, *batch))
    return xs, lengths, reset


def _loss(fn, cell, kw):
    r = jax.random.normal(jax.random.key(42), (T, B, cell.hidden_size))

    def loss(params, xs, carry):
        c, ys = fn(cell, params, xs, carry, **kw)
        return jnp.sum(ys * r) + sum(jnp.sum(jnp.sin(leaf)) for leaf in c)

    return loss


OPTIONS = {
    "plain": {},
    "lengths": {"lengths": True},
    "reset": {"reset": True},
    "reverse": {"reverse": True},
    "all": {"lengths": True, "reset": True, "reverse": True},
}


@pytest.mark.parametrize("cell_name", sorted(CELLS))
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_scan_equals_unrolled_values_and_grads(cell_name, option, key):
    cell = CELLS[cell_name]
    p = _params(cell, key)
    xs, lengths, reset = _data(key)
    carry = jax.tree_util.tree_map(
        lambda z: 0.5 * jax.random.normal(jax.random.key(5), z.shape), cell.initial_carry((B,))
    )
    opts = OPTIONS[option]
    kw = {
        "lengths": lengths if opts.get("lengths") else None,
        "reset": reset if opts.get("reset") else None,
        "reverse": bool(opts.get("reverse")),
    }
    # Cycle the unroll factor through {1, 3, T} across cases.
    unroll = [1, 3, T][(sorted(CELLS).index(cell_name) + sorted(OPTIONS).index(option)) % 3]
    c1, y1 = js.rollout(cell, p, xs, carry, unroll=unroll, **kw)
    c2, y2 = js.rollout_unrolled(cell, p, xs, carry, **kw)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), c1, c2
    )
    g1 = jax.grad(_loss(lambda *a, **k: js.rollout(*a, unroll=unroll, **k), cell, kw), (0, 1, 2))(
        p, xs, carry
    )
    g2 = jax.grad(_loss(js.rollout_unrolled, cell, kw), (0, 1, 2))(p, xs, carry)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g1, g2
    )


@pytest.mark.parametrize("unroll", [1, 3, T, True, "auto"])
def test_unroll_options_agree(unroll, key):
    cell = CELLS["lstm"]
    p = _params(cell, key)
    xs, lengths, reset = _data(key)
    ref = js.rollout_unrolled(cell, p, xs, lengths=lengths, reset=reset, reverse=True)
    out = js.rollout(cell, p, xs, lengths=lengths, reset=reset, reverse=True, unroll=unroll)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref
    )


def _np_run(cell, p, xs, carry, reverse=False):
    """Step-by-step loop over one unpadded sequence."""
    order = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    ys = [None] * xs.shape[0]
    for t in order:
        carry, ys[t] = cell.step(p, carry, xs[t])
    return carry, (jnp.stack(ys) if ys else None)


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_padding_invariance(cell_name, reverse, key):
    """A padded batch with lengths equals each sequence run alone."""
    cell = CELLS[cell_name]
    p = _params(cell, key)
    xs, lengths, _ = _data(key, batch=(4,))
    xs = xs.at[:, 1, :].set(jnp.where(jnp.arange(T)[:, None] >= 2, 99.0, xs[:, 1, :]))  # junk pad
    carry, ys = js.rollout(cell, p, xs, lengths=lengths, reverse=reverse)
    for b in range(4):
        n = int(lengths[b])
        c_b, y_b = _np_run(cell, p, xs[:n, b], cell.initial_carry(()), reverse)
        jax.tree_util.tree_map(
            lambda a, r, b=b: np.testing.assert_allclose(a[b], r, rtol=1e-5, atol=1e-6), carry, c_b
        )
        if n:
            np.testing.assert_allclose(ys[:n, b], y_b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ys[n:, b], 0.0)


def test_length_zero_returns_initial_carry_and_zero_outputs(key):
    cell = CELLS["lstm"]
    p = _params(cell, key)
    xs = jax.random.normal(key, (T, 2, D))
    c0 = js.LSTMCarry(jnp.ones((2, 5)), 2 * jnp.ones((2, 5)))
    for reverse in (False, True):
        carry, ys = js.rollout(cell, p, xs, c0, lengths=jnp.array([0, 0]), reverse=reverse)
        np.testing.assert_array_equal(ys, 0.0)
        jax.tree_util.tree_map(np.testing.assert_array_equal, carry, c0)
    # An empty sequence (T = 0) is valid too.
    carry, ys = js.rollout(cell, p, jnp.zeros((0, 2, D)), c0)
    assert ys.shape == (0, 2, 5)
    carry_u, ys_u = js.rollout_unrolled(cell, p, jnp.zeros((0, 2, D)), c0)
    assert ys_u.shape == (0, 2, 5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, carry, c0)


def test_reset_equals_fresh_start(key):
    """A reset at step s gives exactly the rollout of xs[s:] from zeros, forward and reverse."""
    cell = CELLS["gru"]
    p = _params(cell, key)
    xs = jax.random.normal(key, (T, 1, D))
    c0 = js.RNNCarry(jnp.ones((1, 5)))
    s = 3
    reset = jnp.zeros((T, 1), bool).at[s, 0].set(True)
    carry, ys = js.rollout(cell, p, xs, c0, reset=reset)
    _, y_tail = js.rollout(cell, p, xs[s:])
    _, y_head = js.rollout(cell, p, xs[:s], c0)
    np.testing.assert_allclose(ys[s:], y_tail, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ys[:s], y_head, rtol=1e-6, atol=1e-7)
    # Reverse: the two episodes [0, s) and [s, T) are processed independently.
    carry, ys = js.rollout(cell, p, xs, reset=reset, reverse=True)
    _, y_tail = js.rollout(cell, p, xs[s:], reverse=True)
    c_head, y_head = js.rollout(cell, p, xs[:s], reverse=True)
    np.testing.assert_allclose(ys[s:], y_tail, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ys[:s], y_head, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(carry.h, c_head.h, rtol=1e-6, atol=1e-7)


def test_reset_flags_on_padding_are_ignored(key):
    cell = CELLS["lstm"]
    p = _params(cell, key)
    xs = jax.random.normal(key, (T, 2, D))
    lengths = jnp.array([3, 3])
    c0 = js.LSTMCarry(jnp.ones((2, 5)), jnp.ones((2, 5)))
    a = js.rollout(cell, p, xs, c0, lengths=lengths)
    b = js.rollout(cell, p, xs, c0, lengths=lengths, reset=jnp.zeros((T, 2), bool).at[3:].set(True))
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)


def test_jit_equals_nojit_with_traced_lengths(key):
    cell = CELLS["lstm"]
    p = _params(cell, key)
    xs, lengths, reset = _data(key)
    f = lambda p, xs, lengths, reset: js.rollout(cell, p, xs, lengths=lengths, reset=reset)
    a = f(p, xs, lengths, reset)
    b = jax.jit(f)(p, xs, lengths, reset)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)


@pytest.mark.parametrize("cell_name", ["rnn_tanh", "gru"])
def test_vmap_equals_explicit_batch(cell_name, key):
    cell = CELLS[cell_name]
    p = _params(cell, key)
    xs, lengths, reset = _data(key)
    batched = js.rollout(cell, p, xs, lengths=lengths, reset=reset, reverse=True)
    per_ex = jax.vmap(
        lambda x, n, r: js.rollout(cell, p, x, lengths=n, reset=r, reverse=True),
        in_axes=(1, 0, 1),
        out_axes=(0, 1),
    )(xs, lengths, reset)
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), batched, per_ex
    )


def test_several_batch_dims(key):
    cell = CELLS["lstm"]
    p = _params(cell, key)
    xs, lengths, reset = _data(key, batch=(2, 3))
    carry, ys = js.rollout(cell, p, xs, lengths=lengths, reset=reset)
    assert ys.shape == (T, 2, 3, 5) and carry.c.shape == (2, 3, 5)
    flat = js.rollout(
        cell, p, xs.reshape(T, 6, D), lengths=lengths.reshape(6), reset=reset.reshape(T, 6)
    )
    np.testing.assert_allclose(ys.reshape(T, 6, 5), flat[1], rtol=1e-6)


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_check_grads(cell_name, key):
    # float64 operands take the scan path (the fused kernel's gradients are checked
    # against autodiff of the reference in test_kernels.py).
    cell = CELLS[cell_name]
    _, lengths, reset = _data(key, t=4, batch=(2,))
    lengths = jnp.array([4, 2])
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(a, jnp.float64)
        p = jax.tree_util.tree_map(to64, _params(cell, key))
        xs = to64(jax.random.normal(key, (4, 2, D)))
        c0 = jax.tree_util.tree_map(to64, cell.initial_carry((2,)))

        def f(p, xs):
            c, ys = js.rollout(cell, p, xs, c0, lengths=lengths, reset=reset, reverse=True)
            return jnp.sum(ys**2) + jnp.sum(c.h)

        assert f(p, xs).dtype == jnp.float64
        check_grads(f, (p, xs), order=1, modes=["rev"], eps=1e-4)


def test_bfloat16_inputs(key):
    cell = CELLS["lstm"]
    p = _params(cell, key)
    xs, lengths, _ = _data(key)
    c16, y16 = js.rollout(cell, p, xs.astype(jnp.bfloat16), lengths=lengths)
    c32, y32 = js.rollout(cell, p, xs, lengths=lengths)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=3e-2)
    g = jax.grad(lambda x: jnp.sum(js.rollout(cell, p, x)[1]))(xs.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_custom_cell_without_projection(key):
    """Any object with init/initial_carry/step works with rollout (no hoisting)."""

    class Leaky:
        hidden_size = 3

        def init(self, key, input_size):
            return {"w": jax.random.normal(key, (input_size, 3))}

        def initial_carry(self, batch_shape=(), dtype=jnp.float32):
            return jnp.zeros((*batch_shape, 3), dtype)

        def step(self, params, carry, x):
            h = 0.5 * carry + jnp.tanh(x @ params["w"])
            return h, 2.0 * h

    cell = Leaky()
    p = cell.init(key, D)
    xs, lengths, reset = _data(key)
    a = js.rollout(cell, p, xs, lengths=lengths, reset=reset, reverse=True)
    b = js.rollout_unrolled(cell, p, xs, lengths=lengths, reset=reset, reverse=True)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)
    with pytest.raises(ValueError, match="carry"):
        js.rollout(cell, p, xs, jnp.zeros((B, 4)))


# -- bad input ----------------------------------------------------------------------------


def test_bad_inputs(key):
    cell = CELLS["lstm"]
    p = cell.init(key, D)
    xs = jnp.zeros((T, B, D))
    with pytest.raises(ValueError, match=r"xs: expected last dim D=4 .*got float32\[7, 3, 6\]"):
        js.rollout(cell, p, jnp.zeros((T, B, 6)))
    with pytest.raises(ValueError, match=r"xs: expected rank >= 2 \[T, \*B, D\], got rank 1"):
        js.rollout(cell, p, jnp.zeros((D,)))
    with pytest.raises(TypeError, match=r"xs: expected a floating dtype, got int32"):
        js.rollout(cell, p, jnp.zeros((T, B, D), jnp.int32))
    with pytest.raises(ValueError, match=r"lengths: expected shape \[3\] .*got int32\[2\]"):
        js.rollout(cell, p, xs, lengths=jnp.array([1, 2]))
    with pytest.raises(TypeError, match=r"lengths: expected an integer dtype, got float32\[3\]"):
        js.rollout(cell, p, xs, lengths=jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(
        ValueError, match=r"lengths: expected values in \[0, T=7\], got min 1 max 8"
    ):
        js.rollout(cell, p, xs, lengths=jnp.array([1, 8, 3]))
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, T=7\], got min -1"):
        js.rollout_unrolled(cell, p, xs, lengths=jnp.array([-1, 2, 3]))
    with pytest.raises(ValueError, match=r"reset: expected shape \[7, 3\] .*got bool\[7\]"):
        js.rollout(cell, p, xs, reset=jnp.zeros((T,), bool))
    with pytest.raises(TypeError, match=r"reset: expected dtype bool, got int32\[7, 3\]"):
        js.rollout(cell, p, xs, reset=jnp.zeros((T, B), jnp.int32))
    with pytest.raises(ValueError, match=r"carry.c: expected shape \[3, 5\].*got float32\[3, 4\]"):
        js.rollout(cell, p, xs, js.LSTMCarry(jnp.zeros((B, 5)), jnp.zeros((B, 4))))
    with pytest.raises(TypeError, match=r"carry: expected LSTMCarry"):
        js.rollout(cell, p, xs, (jnp.zeros((B, 5)), jnp.zeros((B, 5))))
    with pytest.raises(ValueError, match="unroll: expected a positive int, True or 'auto', got 0"):
        js.rollout(cell, p, xs, unroll=0)
    with pytest.raises(TypeError, match="cell: expected a cell"):
        js.rollout(object(), p, xs)


def test_errors_raise_at_trace_time_under_jit(key):
    cell = CELLS["gru"]
    p = cell.init(key, D)
    f = jax.jit(lambda xs: js.rollout(cell, p, xs))
    with pytest.raises(ValueError, match="xs: expected last dim D=4"):
        f(jnp.zeros((T, B, 2)))
