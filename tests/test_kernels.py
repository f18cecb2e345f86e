"""The rollout kernels (jaxseq/recurrent/kernels.py and the ``lax.scan`` path) against the
independent reference of ``_reference.py``.

Every equivalence test runs ``kernel="fused"`` and ``kernel="scan"`` in float32
and float64 and compares the outputs, every leaf of the final carry and the
gradients with respect to the parameters, the inputs and the initial carry with
the NumPy float64 reference (gradients: ``jax.vjp`` of the reference's own
loops), to float32 round-off (3e-6 of each leaf's largest entry) or float64
round-off (1e-13). The kernels are never compared with each other or with
``js.rollout_unrolled``, which shares the lengths/reset handling with the scan path.
"""

import dataclasses

import _cells
import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq.recurrent import dispatch, rules

T, D, H = 5, 3, 4
BATCH = (2, 3)
KINDS = ("tanh", "relu", "lstm", "gru")
KERNELS = ("fused", "scan")
DTYPES = ("float32", "float64")
TOL = ref.TOL


def make_cell(kind, hidden=H):
    return _cells.make_cell(kind, hidden)


# Batch (2, 3) with lengths covering T, 0 and in between; reset flags at step 0,
# inside the sequences and at padded steps (among them t == lengths).
LENGTHS = np.array([[5, 3, 0], [4, 5, 1]], np.int32)
RESET = np.zeros((T, *BATCH), bool)
RESET[[0, 2], 0, 0] = True
RESET[[1, 3], 0, 1] = True
RESET[[0, 2], 0, 2] = True
RESET[[3, 4], 1, 0] = True
RESET[[2], 1, 1] = True
RESET[[1, 4], 1, 2] = True
OPTIONS = {
    "plain": {},
    "masked": {"lengths": LENGTHS, "reset": RESET},
    "masked_reverse": {"lengths": LENGTHS, "reset": RESET, "reverse": True},
    "reverse": {"reverse": True},
}

_PROBLEMS, _REFERENCES = {}, {}


def problem(kind, batch=BATCH, hidden=H, seed=0):
    key = (kind, batch, hidden, seed)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = ref.random_problem(kind, T, batch, D, hidden, seed=seed)
    return _PROBLEMS[key]


def reference(kind, option, batch=BATCH, hidden=H, seed=0, opts=None):
    """Reference values and gradients (computed once per case)."""
    key = (kind, option, batch, hidden, seed)
    if key not in _REFERENCES:
        params, xs, carry, cts = problem(kind, batch, hidden, seed)
        opts = OPTIONS[option] if opts is None else opts
        _REFERENCES[key] = ref.rollout_vjp(kind, params, xs, carry, cts, **opts)
    return _REFERENCES[key]


def run(cell, prob, dtype, cases):
    return ref.run_vjp(js.rollout, cell, prob, dtype, cases)


# (name, option, checkpoint_every): 2 and 3 do not divide T=5; 1 is one step per
# segment; 50 means no segments (k >= T). The last two only for the LSTM.
CHECKPOINT_CASES = (
    ("k2_masked_reverse", "masked_reverse", 2),
    ("k3_masked", "masked", 3),
    ("k1_reverse", "reverse", 1),
    ("k50_plain", "plain", 50),
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["lstm", "gru", "tanh"])
def test_checkpoint_every_matches_reference(kind, kernel, dtype):
    """checkpoint_every on both kernels, several batch dims, lengths + reset (+ reverse)."""
    cell = make_cell(kind)
    prob = problem(kind)
    chosen = CHECKPOINT_CASES if kind == "lstm" else CHECKPOINT_CASES[:2]
    cases = {
        name: dict(kernel=kernel, unroll=1, checkpoint_every=k, **OPTIONS[option])
        for name, option, k in chosen
    }
    got = run(cell, prob, dtype, cases)
    wants = {name: reference(kind, option) for name, option, _ in chosen}
    options = {name: OPTIONS[option] for name, option, _ in chosen}
    ref.check_cases(got, wants, dtype, prob[2], options, f"{kind}/{kernel}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_lstm_whole_row_backward_matches_reference(kernel, dtype):
    """Rows * hidden at the threshold: the LSTM backward step takes its whole-row
    form, on the one-buffer (unroll 1) and the stacked (unroll 2) fused backward."""
    hidden = 64
    batch = (rules._WHOLE_ROW_MIN // hidden,)
    assert batch[0] * hidden >= rules._WHOLE_ROW_MIN
    rng = np.random.default_rng(3)
    opts = {
        "lengths": rng.integers(0, T + 1, batch).astype(np.int32),
        "reset": rng.random((T, *batch)) < 0.3,
        "reverse": True,
    }
    prob = problem("lstm", batch, hidden)
    unrolls = (1, 2) if kernel == "fused" else (1,)
    cases = {f"unroll{u}": dict(kernel=kernel, unroll=u, **opts) for u in unrolls}
    got = run(make_cell("lstm", hidden), prob, dtype, cases)
    want = reference("lstm", "whole_row", batch, hidden, opts=opts)
    for name in cases:
        ref.check(got[name], want, dtype, prob[2], opts["lengths"], name)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_vmap_per_example_matches_reference(kernel, dtype):
    """Values and gradients of per-example rollouts under vmap (no batch dims inside):
    the per-example parameter gradients sum to the reference's batch gradient."""
    kind, batch = "lstm", (3,)
    cell = make_cell(kind)
    prob = problem(kind, batch)
    opts = {"lengths": LENGTHS[1], "reset": RESET[:, 1]}
    want = reference(kind, "vmap", batch, opts=opts)
    with jax.enable_x64(dtype == "float64"):
        params, xs, carry, (dcarry, dys) = ref.to_jax(cell, prob, jnp.dtype(dtype))

        def one(xs_e, carry_e, len_e, reset_e, dcarry_e, dys_e):
            f = lambda p, x, c: js.rollout(
                cell, p, x, c, lengths=len_e, reset=reset_e, kernel=kernel, unroll=1
            )
            values, pullback = jax.vjp(f, params, xs_e, carry_e)
            return values, pullback((dcarry_e, dys_e))

        in_axes = (1, 0, 0, 1, 0, 1)
        args = (xs, carry, opts["lengths"], opts["reset"], dcarry, dys)
        out_axes = ((0, 1), (0, 1, 0))  # the example axis: first in carries, second in ys, dxs
        (c, ys), (dp, dx, dc) = jax.jit(jax.vmap(one, in_axes, out_axes))(*args)
        dp = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), dp)
        got = ref.as_numpy(((c, ys), (dp, dx, dc)))
    ref.check(got, want, dtype, prob[2], opts["lengths"], "vmap")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_no_batch_dims(kernel, dtype):
    """xs [T, D], carry [H], scalar lengths, reset [T]."""
    kind = "lstm"
    prob = problem(kind, ())
    opts = {"lengths": np.int32(4), "reset": np.array([0, 0, 1, 0, 1], bool), "reverse": True}
    got = run(make_cell(kind), prob, dtype, {"all": dict(kernel=kernel, unroll=1, **opts)})
    want = reference(kind, "no_batch_all", (), opts=opts)
    ref.check(got["all"], want, dtype, prob[2], opts["lengths"], "all")


@pytest.mark.parametrize("kernel", KERNELS)
def test_eager_and_jit_match_reference(kernel):
    """The kernels run op by op (no outer jit) and under jit."""
    kind = "tanh"
    cell = make_cell(kind)
    prob = problem(kind, (2,))
    params, xs, carry, cts = ref.to_jax(cell, prob, jnp.float32)

    def f(params, xs, carry, cts):
        roll = lambda p, x, c: js.rollout(cell, p, x, c, kernel=kernel, unroll=1)
        values, pullback = jax.vjp(roll, params, xs, carry)
        return values, pullback(cts)

    want = reference(kind, "plain", (2,))
    for fn in (f, jax.jit(f)):
        ref.check(ref.as_numpy(fn(params, xs, carry, cts)), want, "float32", what=str(fn))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["gru", "tanh"])
def test_bfloat16_inputs_compute_in_float32(kind, kernel):
    """bfloat16 xs with float32 params and carry: float32 results equal to the
    reference on the bfloat16-rounded inputs to float32 round-off (a bfloat16
    matmul or gate math would be off by ~1e-2); the input gradient is bfloat16."""
    cell = make_cell(kind)
    params, xs, carry, cts = problem(kind)
    xs16 = jnp.asarray(xs, jnp.bfloat16)
    xs_rounded = np.asarray(xs16.astype(jnp.float32), np.float64)
    opts = OPTIONS["masked_reverse"]
    want = ref.rollout_vjp(kind, params, xs_rounded, carry, cts, **opts)
    p, _, c0, cts32 = ref.to_jax(cell, (params, xs, carry, cts), jnp.float32)

    @jax.jit
    def f(p, x, c):
        roll = lambda p, x, c: js.rollout(cell, p, x, c, kernel=kernel, unroll=1, **opts)
        values, pullback = jax.vjp(roll, p, x, c)
        return values, pullback(cts32)

    (c, ys), (dp, dx, dc) = f(p, xs16, c0)
    assert ys.dtype == jnp.float32 and c.h.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
    got = ref.as_numpy(((c, ys), (dp, dx.astype(jnp.float32), dc)))
    ref.assert_close(got[0], want[0], TOL["float32"], "values")
    ref.assert_close((got[1][0], got[1][2]), (want[1][0], want[1][2]), TOL["float32"], "grads")
    ref.assert_close(got[1][1], want[1][1], 1e-2, "dxs (rounded to bfloat16)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_only_matches_reference(kernel, dtype):
    """Inference (no VJP: the fused kernel's primal, which saves nothing) for every
    cell, with lengths + reset + reverse and with checkpoint_every."""
    probs = {kind: problem(kind) for kind in KINDS}
    opts = OPTIONS["masked_reverse"]
    with jax.enable_x64(dtype == "float64"):
        args = {
            kind: ref.to_jax(make_cell(kind), probs[kind], jnp.dtype(dtype))[:3] for kind in KINDS
        }

        @jax.jit
        def f(args):
            out = {}
            for kind, (p, xs, c) in args.items():
                cell = make_cell(kind)
                kw = dict(kernel=kernel, unroll=1)
                out[kind, "plain"] = js.rollout(cell, p, xs, c, **kw)
                out[kind, "masked_reverse"] = js.rollout(cell, p, xs, c, **kw, **opts)
                out[kind, "k2"] = js.rollout(cell, p, xs, c, checkpoint_every=2, **kw, **opts)
            return out

        out = f(args)
    failures = []
    for (kind, name), (carry, ys) in out.items():
        want = reference(kind, "plain" if name == "plain" else "masked_reverse")[:1]
        got = ((tuple(np.asarray(c) for c in carry), np.asarray(ys)),)
        assert ys.dtype == jnp.dtype(dtype)
        try:
            lengths = None if name == "plain" else LENGTHS
            ref.check(got, want, dtype, probs[kind][2], lengths, f"{kind}/{name}")
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kernel", KERNELS)
def test_unroll_values_agree_with_reference(kernel):
    kind = "gru"
    cases = {str(u): dict(kernel=kernel, unroll=u, reverse=True) for u in (3, "auto")}
    got = run(make_cell(kind), problem(kind), "float32", cases)
    for name in cases:
        ref.check(got[name], reference(kind, "reverse"), "float32", what=f"unroll={name}")


def test_empty_sequence(key):
    cell = make_cell("lstm")
    params = cell.init(key, D)
    xs = jnp.zeros((0, 2, D))
    for kernel in KERNELS:
        c, ys = js.rollout(cell, params, xs, kernel=kernel)
        assert ys.shape == (0, 2, H)
        np.testing.assert_array_equal(np.asarray(c.h), 0.0)


def _has_custom_vjp(f, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(f)(*args))


def test_auto_uses_fused_and_scan_forces_fallback():
    cell = make_cell("lstm")
    params, xs, carry, _ = ref.to_jax(cell, problem("lstm", (2,)), jnp.float32)
    for kernel, expected in (("auto", True), ("fused", True), ("scan", False)):
        f = lambda p, kernel=kernel: js.rollout(cell, p, xs, carry, kernel=kernel)[1]
        assert _has_custom_vjp(f, params) is expected, kernel


def test_float64_auto_takes_the_fused_kernel_in_float64():
    """float64 operands go through the fused kernel under kernel="auto", which then
    accumulates in float64: the result equals the float64 reference to 1e-13 (a
    float32 accumulation would be off by ~1e-7)."""
    kind = "gru"
    cell = make_cell(kind)
    prob = problem(kind)
    with jax.enable_x64(True):
        params, xs, carry, _ = ref.to_jax(cell, prob, jnp.float64)
        f = lambda p: js.rollout(cell, p, xs, carry, **OPTIONS["masked_reverse"])
        assert _has_custom_vjp(lambda p: f(p)[1], params)
        got = run(cell, prob, "float64", {"auto": dict(OPTIONS["masked_reverse"])})
    want = reference(kind, "masked_reverse")
    ref.check(got["auto"], want, "float64", prob[2], LENGTHS, "auto, float64")


def test_weight_gradients_are_formed_outside_the_loop(key):
    """The backward scan carries only dh and dc, never a [H, G*H] weight accumulator."""
    cell = js.LSTM(5)
    params = cell.init(key, 3)
    xs = jnp.ones((6, 2, 3))

    def loss(params, xs, carry):
        return jnp.sum(js.rollout(cell, params, xs, carry)[1] ** 2)

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


def test_jvp_falls_back_to_scan():
    """Forward mode and forward-over-reverse (a Hessian-vector product) under an outer
    jit take the scan path and match the same derivatives of the reference."""
    kind, batch = "gru", (2,)
    cell = make_cell(kind)
    prob = problem(kind, batch)
    lengths = np.array([5, 3], np.int32)
    params, xs, carry, _ = ref.to_jax(cell, prob, jnp.float32)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    f = lambda p: js.rollout(cell, p, xs, carry, lengths=lengths, unroll=1)[1]
    hvp = lambda fn, p, t: jax.jvp(jax.grad(lambda p: jnp.sum(fn(p) ** 2)), (p,), (t,))[1]
    (ys, dys), d2 = jax.jit(lambda: (jax.jvp(f, (params,), (tangent,)), hvp(f, params, tangent)))()

    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v) for k, v in prob[0].items()}
        x64, c64 = jnp.asarray(prob[1]), tuple(jnp.asarray(c) for c in prob[2])
        g = lambda p: ref.rollout(kind, p, x64, c64, lengths, xnp=jnp)[1]
        t64 = jax.tree_util.tree_map(jnp.ones_like, p64)
        want_ys, want_dys = jax.jvp(g, (p64,), (t64,))
        want_d2 = hvp(g, p64, t64)
        want = jax.tree_util.tree_map(np.asarray, (want_ys, want_dys, want_d2))
    ref.assert_close((ys, dys), want[:2], TOL["float32"], "jvp")
    ref.assert_close(d2, want[2], TOL["float32"], "hvp")
    with pytest.raises(TypeError):
        jax.jvp(lambda p: js.rollout(cell, p, xs, carry, kernel="fused")[1], (params,), (tangent,))


def _leaky_step(p, carry, x, xnp):
    h = 0.5 * carry[0] + xnp.tanh(x @ p["w"])
    return (h,), h


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
    kind = "lstm"
    params, xs_np, carry_np, cts = problem(kind, (2,))
    xs = jnp.asarray(xs_np, jnp.float32)
    user = _LeakyCell()
    p = user.init(key, D)
    w = np.asarray(p["w"], np.float64)
    dys = cts[1]
    want = ref.rollout_vjp(_leaky_step, {"w": w}, xs_np, (np.zeros((2, H)),), ((0 * dys[0],), dys))
    got = jax.jit(
        jax.grad(lambda p: jnp.sum(js.rollout(user, p, xs, checkpoint_every=3)[1] * dys))
    )(p)
    ref.assert_close(got, want[1][0], TOL["float32"], "user cell, dW")
    with pytest.raises(ValueError, match="kernel"):
        js.rollout(user, p, xs, kernel="fused")

    sub = _MyLSTM(H)
    ps, _, c0, _ = ref.to_jax(sub, problem(kind, (2,)), jnp.float32)
    c, ys = jax.jit(lambda p: js.rollout(sub, p, xs, c0, reverse=True))(ps)
    (want_c, want_ys), _ = reference(kind, "reverse", (2,))
    ref.assert_close(((tuple(c)), ys), (want_c, 2.0 * want_ys), TOL["float32"], "subclass")
    assert not _has_custom_vjp(lambda p: js.rollout(sub, p, xs)[1], ps)


def test_bad_arguments(key):
    cell = make_cell("lstm")
    params = cell.init(key, D)
    xs = jnp.zeros((T, 2, D))
    with pytest.raises(ValueError, match="kernel"):
        js.rollout(cell, params, xs, kernel="cuda")
    with pytest.raises(ValueError, match="checkpoint_every"):
        js.rollout(cell, params, xs, checkpoint_every=0)
    with pytest.raises(ValueError, match="unroll"):
        js.rollout(cell, params, xs, unroll="fast")


def test_auto_unroll_rule():
    assert dispatch.auto_unroll(1000, 1 * 128 * 512, "cpu") == 4
    assert dispatch.auto_unroll(1000, 64 * 512 * 2048, "cpu") == 1
    assert dispatch.auto_unroll(100, 16 * 128 * 512, "cpu") == 1  # scan_vs_unrolled default
    assert dispatch.auto_unroll(3, 10, "cpu") == 3  # never more than T
    assert dispatch.auto_unroll(0, 10, "cpu") == 1
    assert dispatch.auto_unroll(100, 10, "gpu") == 4
    for t in (1, 7, 100):
        for work in (None, 1, 2**21, 2**30):
            assert 1 <= dispatch.auto_unroll(t, work, "cpu") <= max(t, 1)


def test_auto_unroll_rule_for_inference():
    lstm_32x256, gru_32x256 = 32 * 256 * 4 * 256, 32 * 256 * 3 * 256
    assert dispatch.auto_unroll(100, lstm_32x256, "cpu", inference=True, gates=4) == 2
    assert dispatch.auto_unroll(100, lstm_32x256, "cpu") == 1  # training
    assert dispatch.auto_unroll(100, gru_32x256, "cpu", inference=True, gates=3) == 1
    assert dispatch.auto_unroll(100, 2**10, "cpu", inference=True, gates=4) == 4
    assert dispatch.auto_unroll(1, lstm_32x256, "cpu", inference=True, gates=4) == 1


def _scan_unrolls(jx):
    for eqn in jx.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["unroll"]
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _scan_unrolls(sub)


def test_forward_only_calls_take_the_inference_unroll(key):
    """unroll="auto": a forward-only fused LSTM call at (B, H) = (32, 256) runs its loop
    unrolled by 2, its differentiated call by 1 (the training rule), with equal values."""
    cell = js.LSTM(256)
    params = cell.init(key, 8)
    xs = jax.random.normal(key, (5, 32, 8))
    carry = cell.initial_carry((32,))
    fwd = lambda p: js.rollout(cell, p, xs, carry)[1]
    assert set(_scan_unrolls(jax.make_jaxpr(fwd)(params).jaxpr)) == {2}
    loss = lambda p: jnp.sum(fwd(p) ** 2)
    assert set(_scan_unrolls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)) == {1}
    explicit = lambda p: js.rollout(cell, p, xs, carry, unroll=3)[1]  # an int applies to both
    assert set(_scan_unrolls(jax.make_jaxpr(explicit)(params).jaxpr)) == {3}
    value, _ = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(loss(params)), float(value), rtol=1e-6)
    np.testing.assert_allclose(
        fwd(params), js.rollout_unrolled(cell, params, xs, carry)[1], atol=1e-5
    )


def test_auto_unroll_default_backend_is_the_current_one():
    """``backend=None`` means ``jax.default_backend()``."""
    backend = jax.default_backend()
    for t, work in ((1000, 64 * 512 * 2048), (1000, 10), (3, None)):
        assert dispatch.auto_unroll(t, work) == dispatch.auto_unroll(t, work, backend)


def test_jvp_with_respect_to_the_carry_alone_takes_the_scan_path(key):
    """Forward mode through the initial carry only (params and xs constant) works
    under kernel="auto" and equals the scan path's derivative."""
    cell = make_cell("lstm")
    params, xs, carry, _ = ref.to_jax(cell, problem("lstm"), jnp.float32)
    tangent = jax.tree_util.tree_map(jnp.ones_like, carry)

    def f(kernel):
        return jax.jvp(
            lambda c: js.rollout(cell, params, xs, c, kernel=kernel)[1], (carry,), (tangent,)
        )

    got, want = jax.jit(lambda: (f("auto"), f("scan")))()
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want
    )


@pytest.mark.parametrize("kind", ["tanh", "relu"])
def test_fused_gradients_with_a_bfloat16_carry(kind, key):
    """A bfloat16 model (params, inputs and carry): the fused backward keeps the float32
    activations (the bfloat16 outputs are not precise enough) and its gradients equal
    those of the scan path (ordinary autodiff of the same steps)."""
    cell = make_cell(kind)
    params, xs, carry, _ = ref.to_jax(cell, problem(kind), jnp.float32)
    params, xs, c16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), (params, xs, carry))
    dys = jax.random.normal(key, (T, *BATCH, H))

    def grads(kernel):
        def loss(p, x, c):
            _, ys = js.rollout(cell, p, x, c, kernel=kernel, **OPTIONS["masked_reverse"])
            return jnp.sum(ys.astype(jnp.float32) * dys)

        return jax.grad(loss, argnums=(0, 1, 2))(params, xs, c16)

    got, want = jax.jit(lambda: (grads("fused"), grads("scan")))()
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(b).max())


# -- dispatch: the registry of fused rules, forward mode ------------------------------


class _PlainLSTM(js.LSTM):
    """A subclass with the parent's step: no rule of its own unless registered."""


def test_a_subclass_of_a_builtin_cell_falls_back_to_scan_and_equals_the_fused_kernel(key):
    cell, sub = js.LSTM(H), _PlainLSTM(H)
    params, xs, carry, _ = ref.to_jax(cell, problem("lstm"), jnp.float32)
    assert dispatch.fused_rule(cell) is not None and dispatch.fused_rule(sub) is None
    f = lambda c, k: lambda p: js.rollout(c, p, xs, carry, kernel=k, **OPTIONS["masked_reverse"])[1]
    assert _has_custom_vjp(f(cell, "auto"), params)
    assert not _has_custom_vjp(f(sub, "auto"), params)
    got, fused = f(sub, "auto")(params), f(cell, "fused")(params)
    # the same scan path, bit for bit, when both are compiled the same way (an eager call
    # of the library's own cell runs compiled; a user's subclass runs as called)
    np.testing.assert_array_equal(jax.jit(f(sub, "auto"))(params), jax.jit(f(cell, "scan"))(params))
    np.testing.assert_allclose(got, fused, rtol=1e-5, atol=1e-6)
    grads = [
        jax.grad(lambda p, g=g: jnp.sum(g(p) ** 2))(params)
        for g in (f(sub, "auto"), f(cell, "fused"))
    ]
    for a, b in zip(*map(jax.tree_util.tree_leaves, grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="kernel: 'fused' needs a cell whose exact type"):
        js.rollout(sub, params, xs, carry, kernel="fused")


def test_registering_a_rule_for_a_subclass_gives_it_the_fused_kernel(key):
    sub = _PlainLSTM(H)
    params, xs, carry, _ = ref.to_jax(sub, problem("lstm"), jnp.float32)
    f = lambda p: js.rollout(sub, p, xs, carry, **OPTIONS["masked_reverse"])[1]
    dispatch.register_fused_rule(_PlainLSTM, js.recurrent.LSTM_RULE)
    try:
        assert dispatch.fused_rule(sub) is js.recurrent.LSTM_RULE
        assert _has_custom_vjp(f, params)
        got = f(params)
    finally:
        del dispatch._RULES[_PlainLSTM]
    np.testing.assert_array_equal(
        got, js.rollout(js.LSTM(H), params, xs, carry, **OPTIONS["masked_reverse"])[1]
    )
    assert dispatch.fused_rule(sub) is None
    with pytest.raises(TypeError, match="rule: expected a FusedRule"):
        dispatch.register_fused_rule(_PlainLSTM, "lstm")
    with pytest.raises(TypeError, match="cell_type: expected a class"):
        dispatch.register_fused_rule(sub, js.recurrent.LSTM_RULE)


def test_the_builtin_rules_are_registered_for_exact_types():
    assert dispatch.fused_rule(js.RNN(2)) is js.recurrent.TANH_RULE
    assert dispatch.fused_rule(js.RNN(2, activation="relu")) is js.recurrent.RELU_RULE
    assert dispatch.fused_rule(js.LSTM(2)) is js.recurrent.LSTM_RULE
    assert dispatch.fused_rule(js.GRU(2)) is js.recurrent.GRU_RULE
    assert dispatch.fused_rule(_PlainLSTM(2)) is None
    assert dispatch.step_work(js.GRU(3), (2, 5)) == 10 * 3 * 3 * 3
    slstm = js.recurrent.SLSTM(4, num_heads=2)
    assert dispatch.fused_rule(slstm) is js.recurrent.SLSTM_RULE
    assert (
        dispatch.fused_rule(js.recurrent.SLSTM(4, forget_gate="exp")) is js.recurrent.SLSTM_EXP_RULE
    )
    assert dispatch.step_work(slstm, (3,)) == 3 * 4 * 4 * 4 // 2  # block-diagonal: 2 blocks


def _seen_forward_mode(transform):
    """What under_forward_mode says inside ``transform`` of a function of one array."""
    seen = []

    def f(x):
        seen.append(dispatch.under_forward_mode(x))
        return jnp.sum(jnp.sin(x))

    transform(f)(jnp.ones(3))
    return seen


@pytest.mark.parametrize(
    "name, transform, expected",
    [
        ("jvp", lambda f: lambda x: jax.jvp(f, (x,), (x,)), True),
        ("jacfwd", lambda f: jax.jacfwd(f), True),
        ("hessian", lambda f: jax.hessian(f), True),
        ("jvp of grad", lambda f: lambda x: jax.jvp(jax.grad(f), (x,), (x,)), True),
        ("vmap of jvp", lambda f: jax.vmap(lambda x: jax.jvp(f, (x,), (x,))), True),
        ("jvp of vmap", lambda f: lambda x: jax.jvp(jax.vmap(f), (x[None],), (x[None],)), True),
        ("jit of jvp", lambda f: jax.jit(lambda x: jax.jvp(f, (x,), (x,))), True),
        ("grad", lambda f: jax.grad(f), False),
        ("vmap", lambda f: jax.vmap(f), False),
        ("jit", lambda f: jax.jit(f), False),
        ("none", lambda f: f, False),
    ],
)
def test_forward_mode_is_seen_through_every_transformation(name, transform, expected):
    """The detection behind kernel="auto" (public jax.interpreters.ad.JVPTracer, followed
    through the tracers of vmap and of grad's linearisation): if a JAX release changes
    the tracers, this fails rather than the rollouts."""
    seen = _seen_forward_mode(transform)
    assert seen and all(s is expected for s in seen), (name, seen)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_jvp_of_auto_equals_jvp_of_scan(kind):
    """jax.jvp of js.rollout(kernel="auto") (not jitted inside) works and equals the scan
    path's, bit for bit: auto took the scan path."""
    cell = make_cell(kind)
    params, xs, carry, _ = ref.to_jax(cell, problem(kind), jnp.float32)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)

    def f(kernel):
        g = lambda p: js.rollout(cell, p, xs, carry, kernel=kernel, **OPTIONS["masked_reverse"])[1]
        return jax.jvp(g, (params,), (tangent,))

    got, want = f("auto"), f("scan")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
