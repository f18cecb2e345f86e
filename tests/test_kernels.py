"""The fused rollout kernels (jaxseq/kernels.py) against plain autodiff of the reference.

The reference is ``js.rollout_unrolled`` (a Python loop over ``cell.step``)
differentiated by ordinary JAX autodiff; the fused kernel must match its
values and gradients to 1e-5 (relative to the largest entry of each leaf).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import kernels

T, D, H = 5, 3, 4

CELLS = {
    "tanh": js.RNN(H),
    "relu": js.RNN(H, activation="relu"),
    "lstm": js.LSTM(H),
    "gru": js.GRU(H),
}


def _max_rel(got, want):
    worst = 0.0
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(np.max(np.abs(w)), 1e-30)
        worst = max(worst, float(np.max(np.abs(g - w))) / scale)
    return worst


def _problem(key, cell, batch=(2, 3), dtype=jnp.float32, carry_dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = cell.init(k1, D)
    if isinstance(cell, js.GRU):
        params = params._replace(b_hn=0.3 * jax.random.normal(k4, params.b_hn.shape))
    xs = jax.random.normal(k2, (T, *batch, D)).astype(dtype)
    carry = jax.tree_util.tree_map(
        lambda z: (0.5 * jax.random.normal(k3, z.shape)).astype(carry_dtype),
        cell.initial_carry(batch),
    )
    return params, xs, carry


def _loss(rollout_fn, cell, **kw):
    """A loss touching every output and the final carry, so all cotangents are non-trivial."""

    def loss(params, xs, carry):
        c, ys = rollout_fn(cell, params, xs, carry, **kw)
        w = jnp.linspace(0.5, 1.5, ys.shape[-1], dtype=jnp.float32)
        w = w.reshape((1,) * (ys.ndim - 1) + w.shape)
        out = jnp.sum(ys.astype(jnp.float32) ** 2 * w) + jnp.sum(jnp.sin(ys.astype(jnp.float32)))
        return out + sum(jnp.sum(jnp.cos(leaf.astype(jnp.float32))) for leaf in c)

    return loss


def _grads(rollout_fn, cell, params, xs, carry, jit=True, **kw):
    f = jax.value_and_grad(_loss(rollout_fn, cell, **kw), argnums=(0, 1, 2))
    return (jax.jit(f) if jit else f)(params, xs, carry)


def _masks(key, batch=(2, 3)):
    n = int(np.prod(batch))
    lengths = jnp.array([5, 3, 0, 4, 5, 1][:n], jnp.int32).reshape(batch)
    reset = jax.random.bernoulli(key, 0.3, (T, *batch))
    return lengths, reset


_REFERENCE_CACHE = {}


def _reference(key, name, case, batch=(2, 3)):
    """Value and gradients of plain autodiff of ``rollout_unrolled`` (computed once per case)."""
    cache_key = (name, case, batch)
    if cache_key not in _REFERENCE_CACHE:
        cell = CELLS[name]
        params, xs, carry = _problem(key, cell, batch)
        _REFERENCE_CACHE[cache_key] = _grads(
            js.rollout_unrolled, cell, params, xs, carry, **_case_kwargs(key, case, batch)
        )
    return _REFERENCE_CACHE[cache_key]


def _case_kwargs(key, case, batch=(2, 3)):
    if case == "plain":
        return {}
    lengths, reset = _masks(jax.random.fold_in(key, 1), batch)
    return {
        "masked": dict(lengths=lengths, reset=reset),
        "masked_reverse": dict(lengths=lengths, reset=reset, reverse=True),
        "lengths": dict(lengths=lengths),
        "reset_reverse": dict(reset=reset, reverse=True),
    }[case]


def _check_case(key, name, case, batch=(2, 3), **fused_kw):
    cell = CELLS[name]
    params, xs, carry = _problem(key, cell, batch)
    kw = _case_kwargs(key, case, batch)
    got = _grads(js.rollout, cell, params, xs, carry, **kw, **fused_kw)
    err = _max_rel(got, _reference(key, name, case, batch))
    assert err < 1e-5, (name, case, fused_kw, err)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("case", ["plain", "masked", "masked_reverse"])
def test_fused_matches_reference(key, name, case):
    """lengths + reset (+ reverse), several batch dims and a random initial carry."""
    _check_case(key, name, case, kernel="fused", unroll=1)


def test_lstm_whole_row_backward_matches_reference(key):
    """Rows * hidden at the threshold: the LSTM backward step takes its whole-row form."""
    batch = (kernels._WHOLE_ROW_MIN // H,)
    cell = CELLS["lstm"]
    params, xs, carry = _problem(key, cell, batch)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 2))
    lengths = jax.random.randint(k1, batch, 0, T + 1)
    reset = jax.random.bernoulli(k2, 0.3, (T, *batch))
    for kw in ({}, dict(lengths=lengths, reset=reset, reverse=True)):
        want = _grads(js.rollout_unrolled, cell, params, xs, carry, **kw)
        for unroll in (1, 2):  # 1: the one-buffer (in-place) backward; 2: the stacked one
            got = _grads(js.rollout, cell, params, xs, carry, kernel="fused", unroll=unroll, **kw)
            assert _max_rel(got, want) < 1e-5, (kw, unroll)


def test_lstm_training_step_keeps_one_gate_buffer(key):
    """The projection, gate activations and gate cotangents share one [T, N, 4H] buffer.

    With separate buffers (and a shifted copy of the cell states) the step's XLA
    temporaries were about 14 [T, N, H] units; sharing brings them near 8.
    """
    t, n, h = 40, 32, 64
    cell = js.LSTM(h)
    params = cell.init(key, h)
    xs = jnp.ones((t, n, h))

    def loss(p, x):
        return jnp.sum(js.rollout(cell, p, x, kernel="fused", unroll=1)[1] ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without memory statistics
        pytest.skip("no memory analysis on this backend")
    unit = t * n * h * 4
    assert stats.temp_size_in_bytes < 10 * unit, stats.temp_size_in_bytes / unit


@pytest.mark.parametrize("name", ["lstm", "gru"])
@pytest.mark.parametrize("case", ["lengths", "reset_reverse"])
def test_lengths_only_and_reset_only(key, name, case):
    _check_case(key, name, case, batch=(3,), unroll=2)


@pytest.mark.parametrize(
    ("name", "case", "every"),
    [
        # 2 and 3 do not divide T=5; 1 is one step per segment; 50 means no segments.
        ("lstm", "plain", 2),
        ("lstm", "masked_reverse", 3),
        ("lstm", "masked", 1),
        ("lstm", "masked", 50),
        ("gru", "masked_reverse", 2),
        ("gru", "plain", 3),
        ("tanh", "masked", 3),
        ("relu", "masked_reverse", 2),
    ],
)
def test_checkpoint_every_matches_reference(key, name, case, every):
    _check_case(key, name, case, kernel="fused", unroll=1, checkpoint_every=every)


def test_checkpoint_every_on_scan_path(key):
    cell = CELLS["gru"]
    params, xs, carry = _problem(key, cell, batch=(2,))
    lengths = jnp.array([5, 4])
    kw = dict(lengths=lengths, reverse=True, kernel="scan", unroll=1)
    want = _grads(js.rollout, cell, params, xs, carry, **kw)
    got = _grads(js.rollout, cell, params, xs, carry, checkpoint_every=3, **kw)
    assert _max_rel(got, want) < 1e-5


def test_checkpoint_every_is_rematerialised(key):
    """With checkpoint_every the saved residuals no longer grow with G*H per step."""
    cell = js.LSTM(16)
    params = cell.init(key, 8)
    xs = jnp.ones((48, 4, 8))

    def residual_bytes(every):
        rollout = lambda p: js.rollout(cell, p, xs, checkpoint_every=every, unroll=1)
        _, f_vjp = jax.vjp(rollout, params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(f_vjp))

    assert residual_bytes(4) * 2 < residual_bytes(None)


def test_vmap_per_example_matches_batch(key):
    cell = CELLS["lstm"]
    params, xs, carry = _problem(key, cell, batch=(3,))
    lengths = jnp.array([5, 2, 4])
    reset = jax.random.bernoulli(jax.random.fold_in(key, 4), 0.3, (T, 3))

    def one(xs_e, carry_e, len_e, reset_e):
        loss = _loss(js.rollout, cell, lengths=len_e, reset=reset_e, unroll=1)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, xs_e, carry_e)

    v, (g_p, g_x, g_c) = jax.jit(jax.vmap(one, in_axes=(1, 0, 0, 1)))(xs, carry, lengths, reset)
    w, (w_p, w_x, w_c) = _grads(
        js.rollout, cell, params, xs, carry, lengths=lengths, reset=reset, unroll=1
    )
    summed = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), (v, g_p))
    assert _max_rel(summed, (w, w_p)) < 1e-5
    assert _max_rel((jnp.moveaxis(g_x, 0, 1), g_c), (w_x, w_c)) < 1e-5


def test_no_batch_dims(key):
    cell = CELLS["lstm"]
    params, xs, carry = _problem(key, cell, batch=())
    want = _grads(js.rollout_unrolled, cell, params, xs, carry, reverse=True)
    got = _grads(js.rollout, cell, params, xs, carry, reverse=True, unroll=1)
    assert _max_rel(got, want) < 1e-5


def test_eager_equals_jit(key):
    cell = CELLS["tanh"]
    params, xs, carry = _problem(key, cell, batch=(2,))
    a = _grads(js.rollout, cell, params, xs, carry, jit=False, kernel="fused", unroll=1)
    b = _grads(js.rollout, cell, params, xs, carry, jit=True, kernel="fused", unroll=1)
    assert _max_rel(a, b) < 1e-6


@pytest.mark.parametrize("name", ["lstm"])
def test_bfloat16_inputs(key, name):
    cell = CELLS[name]
    params, xs, carry = _problem(key, cell, dtype=jnp.bfloat16)
    lengths, reset = _masks(jax.random.fold_in(key, 5))
    kw = dict(lengths=lengths, reset=reset)
    (v_want, (p_want, x_want, c_want)) = _grads(js.rollout_unrolled, cell, params, xs, carry, **kw)
    (v_got, (p_got, x_got, c_got)) = _grads(js.rollout, cell, params, xs, carry, unroll=1, **kw)
    assert x_got.dtype == jnp.bfloat16
    assert _max_rel((v_got, p_got, c_got), (v_want, p_want, c_want)) < 1e-5
    assert _max_rel(x_got, x_want) < 1e-2  # both rounded to bfloat16 at the end


def test_forward_matches_reference_and_scan(key):
    cell = CELLS["lstm"]
    params, xs, carry = _problem(key, cell)
    lengths, reset = _masks(jax.random.fold_in(key, 6))
    kw = dict(lengths=lengths, reset=reset, reverse=True)
    want = jax.jit(lambda p, x, c: js.rollout_unrolled(cell, p, x, c, **kw))(params, xs, carry)
    got = jax.jit(lambda p, x, c: js.rollout(cell, p, x, c, unroll=1, **kw))(params, xs, carry)
    assert _max_rel(got, want) < 1e-6
    c, ys = js.rollout(cell, params, xs, carry, lengths=lengths)
    assert np.all(np.asarray(ys)[:, 0, 2] == 0)  # length 0: all-zero outputs
    np.testing.assert_array_equal(np.asarray(c.h)[0, 2], np.asarray(carry.h)[0, 2])


def test_empty_sequence(key):
    cell = CELLS["lstm"]
    params = cell.init(key, D)
    xs = jnp.zeros((0, 2, D))
    c, ys = js.rollout(cell, params, xs, kernel="fused")
    assert ys.shape == (0, 2, H)
    np.testing.assert_array_equal(np.asarray(c.h), 0.0)


def _has_custom_vjp(f, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(f)(*args))


def test_auto_uses_fused_and_scan_forces_fallback(key):
    cell = CELLS["lstm"]
    params, xs, carry = _problem(key, cell, batch=(2,))
    for kernel, expected in (("auto", True), ("fused", True), ("scan", False)):
        f = lambda p, kernel=kernel: js.rollout(cell, p, xs, carry, kernel=kernel)[1]
        assert _has_custom_vjp(f, params) is expected, kernel


def test_weight_gradients_are_formed_outside_the_loop(key):
    """The backward scan carries only dh and dc, never a [H, G*H] weight accumulator."""
    cell = js.LSTM(5)
    params = cell.init(key, 3)
    xs = jnp.ones((6, 2, 3))
    loss = _loss(js.rollout, cell)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, xs, cell.initial_carry((2,)))

    def scans(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from scans(sub)

    found = list(scans(jaxpr.jaxpr))
    assert found
    for eqn in found:
        n_carry = eqn.params["num_carry"]
        carry_shapes = [v.aval.shape for v in eqn.outvars[:n_carry]]
        assert (5, 20) not in carry_shapes, carry_shapes


def test_jvp_falls_back_to_scan(key):
    cell = CELLS["gru"]
    params, xs, carry = _problem(key, cell, batch=(2,))
    lengths = jnp.array([5, 3])
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    f = lambda p: js.rollout(cell, p, xs, carry, lengths=lengths, unroll=1)[1]
    g = lambda p: js.rollout_unrolled(cell, p, xs, carry, lengths=lengths)[1]
    # forward mode, and forward-over-reverse (a Hessian-vector product), under an outer jit
    both = lambda fn: (
        jax.jvp(fn, (params,), (tangent,)),
        jax.jvp(jax.grad(lambda p: jnp.sum(fn(p) ** 2)), (params,), (tangent,))[1],
    )
    got, want = jax.jit(lambda: both(f))(), jax.jit(lambda: both(g))()
    assert _max_rel(got[0], want[0]) < 1e-5
    assert _max_rel(got[1], want[1]) < 1e-4
    with pytest.raises(TypeError):
        jax.jvp(lambda p: js.rollout(cell, p, xs, carry, kernel="fused")[1], (params,), (tangent,))


@dataclasses.dataclass(frozen=True)
class _LeakyCell:
    """A user cell with only init/initial_carry/step: h' = 0.5 h + tanh(x W)."""

    hidden_size: int = H

    def init(self, key, input_size, dtype=jnp.float32):
        return {"w": jax.random.normal(key, (input_size, self.hidden_size), dtype)}

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(tuple(batch_shape) + (self.hidden_size,), dtype)

    def step(self, params, carry, x):
        h = 0.5 * carry + jnp.tanh(x @ params["w"])
        return h, h


@dataclasses.dataclass(frozen=True)
class _MyLSTM(js.LSTM):
    """A subclass that changes the step: the fused kernel must not be used for it."""

    def recur(self, params, carry, xp):
        c, h = super().recur(params, carry, xp)
        return c, 2.0 * h


def test_custom_cells_use_the_scan_path(key):
    xs = jax.random.normal(key, (T, 2, D))
    user = _LeakyCell()
    p = user.init(key, D)
    got = jax.grad(lambda p: jnp.sum(js.rollout(user, p, xs, checkpoint_every=3)[1] ** 2))(p)
    want = jax.grad(lambda p: jnp.sum(js.rollout_unrolled(user, p, xs)[1] ** 2))(p)
    assert _max_rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="kernel"):
        js.rollout(user, p, xs, kernel="fused")

    sub = _MyLSTM(H)
    ps = sub.init(key, D)
    c, ys = js.rollout(sub, ps, xs)
    _, ys_ref = js.rollout_unrolled(sub, ps, xs)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_ref), rtol=1e-6, atol=1e-6)
    assert not _has_custom_vjp(lambda p: js.rollout(sub, p, xs)[1], ps)


def test_bad_arguments(key):
    cell = CELLS["lstm"]
    params = cell.init(key, D)
    xs = jnp.zeros((T, 2, D))
    with pytest.raises(ValueError, match="kernel"):
        js.rollout(cell, params, xs, kernel="cuda")
    with pytest.raises(ValueError, match="checkpoint_every"):
        js.rollout(cell, params, xs, checkpoint_every=0)
    with pytest.raises(ValueError, match="unroll"):
        js.rollout(cell, params, xs, unroll="fast")


def test_unroll_values_agree(key):
    cell = CELLS["gru"]
    params, xs, carry = _problem(key, cell, batch=(2,))
    base = _grads(js.rollout, cell, params, xs, carry, unroll=1, reverse=True)
    for unroll in (3, "auto"):
        got = _grads(js.rollout, cell, params, xs, carry, unroll=unroll, reverse=True)
        assert _max_rel(got, base) < 1e-6, unroll


def test_auto_unroll_rule():
    assert kernels.auto_unroll(1000, 1 * 128 * 512, "cpu") == 4
    assert kernels.auto_unroll(1000, 64 * 512 * 2048, "cpu") == 1
    assert kernels.auto_unroll(100, 16 * 128 * 512, "cpu") == 1  # scan_vs_unrolled default
    assert kernels.auto_unroll(3, 10, "cpu") == 3  # never more than T
    assert kernels.auto_unroll(0, 10, "cpu") == 1
    assert kernels.auto_unroll(100, 10, "gpu") == 4
    for t in (1, 7, 100):
        for work in (None, 1, 2**21, 2**30):
            assert 1 <= kernels.auto_unroll(t, work, "cpu") <= max(t, 1)
