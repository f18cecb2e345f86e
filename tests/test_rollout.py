"""``js.rollout`` against the independent reference of ``_reference.py``.

Comparing ``js.rollout`` with ``js.rollout_unrolled`` proves little: the two
share the argument preparation, the reset flags in processing order and the
masked step, and under ``kernel="auto"`` the built-in cells never reach the
plain ``lax.scan`` path at all. Here both kernels (``"fused"`` and ``"scan"``)
are run in float32 and in float64 and compared with a NumPy float64 reference
that runs every sequence on its own with Python loops: the outputs, every leaf
of the final carry, and the gradients with respect to the parameters, the
inputs and the initial carry (those of the reference come from ``jax.vjp`` of
the same loops on ``jax.numpy``).
"""

import _cells
import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import jaxseq as js

T, B, D, H = 6, 4, 3, 4
KINDS = ("tanh", "relu", "lstm", "gru")
KERNELS = ("fused", "scan")
DTYPES = ("float32", "float64")


def make_cell(kind, hidden=H):
    return _cells.make_cell(kind, hidden)


# lengths [T, 4, 1, 0] and reset flags chosen so that every rule is exercised:
# a flag at step 0 (zeroes the initial carry going forward, unused in reverse),
# flags inside sequences, and flags at padded steps, among them a flag at
# t == lengths[b] (which a reverse rollout must not apply to its first step).
LENGTHS = np.array([T, 4, 1, 0], np.int32)
RESET = np.zeros((T, B), bool)
RESET[[0, 3], 0] = True
RESET[[2, 4, 5], 1] = True
RESET[1, 2] = True
RESET[0, 3] = True

OPTIONS = {
    "plain": {},
    "lengths": {"lengths": LENGTHS},
    "reset": {"reset": RESET},
    "reverse": {"reverse": True},
    "all": {"lengths": LENGTHS, "reset": RESET, "reverse": True},
}

_PROBLEMS = {}
_REFERENCES = {}


def problem(kind, t=T, batch=(B,), seed=0):
    key = (kind, t, batch, seed)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = ref.random_problem(kind, t, batch, D, H, seed=seed)
    return _PROBLEMS[key]


def reference(kind, options, t=T, batch=(B,), seed=0):
    """Reference values and gradients, computed once per case."""
    opts = OPTIONS[options] if isinstance(options, str) else options
    key = (kind, options if isinstance(options, str) else repr(opts), t, batch, seed)
    if key not in _REFERENCES:
        params, xs, carry, cts = problem(kind, t, batch, seed)
        _REFERENCES[key] = ref.rollout_vjp(kind, params, xs, carry, cts, **opts)
    return _REFERENCES[key]


def run(cell, prob, dtype, cases):
    return ref.run_vjp(js.rollout, cell, prob, dtype, cases)


to_jax = ref.to_jax
TOL = ref.TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
def test_rollout_matches_reference(kind, kernel, dtype):
    """Plain, lengths, reset, reverse and their combinations, from a random non-zero
    carry: outputs, final carry (h and c) and all gradients against the reference."""
    cell = make_cell(kind)
    prob = problem(kind)
    cases = {name: dict(kernel=kernel, unroll=1, **opts) for name, opts in OPTIONS.items()}
    got = run(cell, prob, dtype, cases)
    wants = {name: reference(kind, name) for name in OPTIONS}
    ref.check_cases(got, wants, dtype, prob[2], OPTIONS, f"{kind}/{kernel}/{dtype}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_unroll_options_agree_with_reference(kernel):
    kind = "lstm"
    cell = make_cell(kind)
    cases = {str(u): dict(kernel=kernel, unroll=u, **OPTIONS["all"]) for u in (4, True)}
    prob = problem(kind)
    got = run(cell, prob, "float32", cases)  # 4 does not divide T; True unrolls fully
    for name in cases:
        ref.check(got[name], reference(kind, "all"), "float32", prob[2], LENGTHS, f"unroll={name}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_padding_invariance(kind):
    """A padded batch with lengths equals each sequence run alone through ``cell.step``,
    with junk in the padding."""
    cell = make_cell(kind)
    p, xs, _, _ = to_jax(cell, problem(kind), jnp.float32)
    xs = xs.at[:, 1, :].set(jnp.where(jnp.arange(T)[:, None] >= LENGTHS[1], 99.0, xs[:, 1, :]))
    runs = [(k, r) for k in KERNELS for r in (False, True)]
    outs = jax.jit(
        lambda p, xs: [
            js.rollout(cell, p, xs, lengths=LENGTHS, reverse=r, kernel=k) for k, r in runs
        ]
    )(p, xs)
    step = jax.jit(cell.step)
    for (kernel, reverse), (carry, ys) in zip(runs, outs):
        for b in range(B):
            n = int(LENGTHS[b])
            c_b = cell.initial_carry(())
            y_b = [None] * n
            for t in range(n - 1, -1, -1) if reverse else range(n):
                c_b, y_b[t] = step(p, c_b, xs[t, b])
            for a, r in zip(carry, c_b):
                np.testing.assert_allclose(a[b], r, rtol=1e-5, atol=1e-6, err_msg=kernel)
            if n:
                np.testing.assert_allclose(ys[:n, b], jnp.stack(y_b), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(ys[n:, b], 0.0)


def test_length_zero_returns_initial_carry_and_zero_outputs(key):
    cell = make_cell("lstm")
    p = cell.init(key, D)
    xs = jax.random.normal(key, (T, 2, D))
    c0 = js.recurrent.LSTMCarry(jnp.ones((2, H)), 2 * jnp.ones((2, H)))
    runs = [(k, r) for k in KERNELS for r in (False, True)]

    @jax.jit
    def f(p, xs, c0):
        zero = jnp.array([0, 0])
        out = [js.rollout(cell, p, xs, c0, lengths=zero, reverse=r, kernel=k) for k, r in runs]
        # An empty sequence (T = 0) is valid too.
        empty = [js.rollout(cell, p, xs[:0], c0, kernel=k) for k in KERNELS]
        return out, empty + [js.rollout_unrolled(cell, p, xs[:0], c0)]

    out, empty = f(p, xs, c0)
    for carry, ys in out:
        np.testing.assert_array_equal(ys, 0.0)
        jax.tree_util.tree_map(np.testing.assert_array_equal, carry, c0)
    for carry, ys in empty:
        assert ys.shape == (0, 2, H)
        jax.tree_util.tree_map(np.testing.assert_array_equal, carry, c0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_reset_equals_fresh_start(kernel):
    """A reset at step s gives the rollout of xs[s:] from zeros, forward and reverse."""
    cell = make_cell("gru")
    p, xs, _, _ = to_jax(cell, problem("gru", batch=(1,)), jnp.float32)
    c0 = js.recurrent.RNNCarry(jnp.ones((1, H)))
    s = 3
    reset = jnp.zeros((T, 1), bool).at[s, 0].set(True)

    @jax.jit
    def f(p, xs, c0):
        roll = lambda *a, **k: js.rollout(cell, p, *a, kernel=kernel, **k)
        fwd = (roll(xs, c0, reset=reset), roll(xs[s:]), roll(xs[:s], c0))
        rev = (roll(xs, c0, reset=reset, reverse=True), roll(xs[s:], c0, reverse=True))
        return fwd, rev + (roll(xs[:s], reverse=True),)

    ((carry, ys), (c_tail, y_tail), (_, y_head)), rev = f(p, xs, c0)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    close(ys[s:], y_tail)
    close(ys[:s], y_head)
    close(carry.h, c_tail.h)
    # Reverse: the two episodes [0, s) and [s, T) are processed independently, and
    # the carry given in is the one the tail episode starts from.
    (carry, ys), (_, y_tail), (c_head, y_head) = rev
    close(ys[s:], y_tail)
    close(ys[:s], y_head)
    close(carry.h, c_head.h)


@pytest.mark.parametrize("kernel", KERNELS)
def test_reset_flags_on_padding_are_ignored(kernel, key):
    """Flags at padded steps change nothing, forward and in reverse (where a flag at
    ``t == lengths`` would otherwise reset the carry before the first step)."""
    cell = make_cell("lstm")
    p = cell.init(key, D)
    xs = jax.random.normal(key, (T, 2, D))
    lengths = jnp.array([3, 3])
    c0 = js.recurrent.LSTMCarry(jnp.ones((2, H)), jnp.ones((2, H)))
    flags = jnp.zeros((T, 2), bool).at[3:].set(True)

    @jax.jit
    def f(p, xs, c0):
        kw = dict(lengths=lengths, kernel=kernel)
        return [
            (
                js.rollout(cell, p, xs, c0, reverse=r, **kw),
                js.rollout(cell, p, xs, c0, reset=flags, reverse=r, **kw),
            )
            for r in (False, True)
        ]

    for a, b in f(p, xs, c0):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", KERNELS)
def test_traced_lengths_and_reset_under_jit(kernel):
    """Lengths and reset passed as traced arguments (no concrete bounds check): other
    values reuse the one compilation."""
    kind = "lstm"
    cell = make_cell(kind)
    p, xs, c0, _ = to_jax(cell, problem(kind), jnp.float32)
    f = jax.jit(
        chex.assert_max_traces(
            lambda p, xs, c0, lengths, reset: js.rollout(
                cell, p, xs, c0, lengths=lengths, reset=reset, reverse=True, kernel=kernel
            ),
            n=1,
        )
    )  # new lengths and flags: no new compilation  # new lengths and flags: no new compilation
    carry, ys = f(p, xs, c0, jnp.asarray(LENGTHS), jnp.asarray(RESET))
    ref.assert_close((tuple(carry), ys), reference(kind, "all")[0], TOL["float32"], "values")
    carry, ys = f(p, xs, c0, jnp.full(B, T, jnp.int32), jnp.zeros((T, B), bool))
    ref.assert_close((tuple(carry), ys), reference(kind, "reverse")[0], TOL["float32"], "full")


class RolloutVariants(chex.TestCase):
    """``js.rollout`` jitted and not, on device arrays and on NumPy inputs (chex's variants),
    with both kernels, equals the reference (lengths, resets and reverse together)."""

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    @parameterized.product(kind=("relu", "lstm", "gru"), kernel=KERNELS)
    def test_rollout_equals_the_reference(self, kind, kernel):
        cell = make_cell(kind)
        p, xs, c0, _ = to_jax(cell, problem(kind), jnp.float32)
        run = self.variant(
            lambda p, xs, c0, lengths, reset: js.rollout(
                cell, p, xs, c0, lengths=lengths, reset=reset, reverse=True, kernel=kernel
            )
        )
        carry, ys = run(p, xs, c0, LENGTHS, RESET)
        chex.assert_shape(ys, (T, B, H))
        ref.assert_close((tuple(carry), ys), reference(kind, "all")[0], TOL["float32"], kernel)


@pytest.mark.parametrize("kind", ["tanh", "gru"])
def test_vmap_matches_reference(kind):
    """Per-example rollouts under vmap (no batch dims inside) equal the reference."""
    cell = make_cell(kind)
    p, xs, c0, _ = to_jax(cell, problem(kind), jnp.float32)

    def per_example(kernel):
        return jax.vmap(
            lambda x, c, n, r: js.rollout(
                cell, p, x, c, lengths=n, reset=r, reverse=True, kernel=kernel
            ),
            in_axes=(1, 0, 0, 1),
            out_axes=(0, 1),
        )(xs, c0, LENGTHS, RESET)

    outs = jax.jit(lambda: [per_example(k) for k in KERNELS])()
    for kernel, (carry, ys) in zip(KERNELS, outs):
        ref.assert_close((tuple(carry), ys), reference(kind, "all")[0], TOL["float32"], kernel)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_several_batch_dims(kernel, dtype):
    """Batch (2, 3): the lengths, reset flags and carry keep their layout."""
    kind, batch = "lstm", (2, 3)
    opts = {
        "lengths": np.array([[T, 2, 0], [5, 1, T]], np.int32),
        "reset": np.arange(T * 6).reshape(T, 2, 3) % 4 == 1,
        "reverse": True,
    }
    prob = problem(kind, batch=batch, seed=1)
    got = run(make_cell(kind), prob, dtype, {"b23": dict(kernel=kernel, unroll=1, **opts)})
    assert got["b23"][0][1].shape == (T, 2, 3, H) and got["b23"][0][0][1].shape == (2, 3, H)
    want = reference(kind, opts, batch=batch, seed=1)
    ref.check(got["b23"], want, dtype, prob[2], opts["lengths"], "batch (2, 3)")


@pytest.mark.parametrize("kernel", KERNELS)
def test_check_grads(kernel):
    """Finite differences in float64, a check independent of any reference.

    float64 operands take the fused kernel under ``kernel="auto"`` (it then
    accumulates in float64); here each kernel is asked for explicitly.
    """
    kind = "gru"
    cell = make_cell(kind)
    prob = problem(kind, t=4, batch=(2,))
    opts = {"lengths": np.array([4, 2]), "reset": np.array([[0, 1], [0, 0], [1, 1], [0, 0]], bool)}
    with jax.enable_x64(True):
        p, xs, c0, _ = to_jax(cell, prob, jnp.float64)

        @jax.jit
        def f(p, xs, c0):
            c, ys = js.rollout(cell, p, xs, c0, reverse=True, kernel=kernel, **opts)
            return jnp.sum(ys**2) + jnp.sum(jnp.sin(c.h))

        assert f(p, xs, c0).dtype == jnp.float64
        check_grads(f, (p, xs, c0), order=1, modes=["rev"], eps=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_inputs_compute_in_float32(kernel):
    """bfloat16 xs with float32 params and carry: the math runs in float32, so the
    result equals the reference on the bfloat16-rounded inputs to float32 round-off."""
    kind = "lstm"
    cell = make_cell(kind)
    params, xs, carry, cts = problem(kind)
    xs16 = jnp.asarray(xs, jnp.bfloat16)
    xs_rounded = np.asarray(xs16.astype(jnp.float32), np.float64)
    opts = OPTIONS["all"]
    want = ref.rollout_vjp(kind, params, xs_rounded, carry, cts, **opts)
    p, _, c0, cts32 = to_jax(cell, (params, xs, carry, cts), jnp.float32)

    def f(p, x, c):
        return js.rollout(cell, p, x, c, kernel=kernel, unroll=1, **opts)

    (c, ys), pullback = jax.vjp(f, p, xs16, c0)
    dp, dx, dc = pullback(cts32)
    assert ys.dtype == jnp.float32 and c.c.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
    got = ref.as_numpy(((c, ys), (dp, dx.astype(jnp.float32), dc)))
    ref.assert_close(got[0], want[0], TOL["float32"], "values")
    ref.assert_close((got[1][0], got[1][2]), (want[1][0], want[1][2]), TOL["float32"], "grads")
    ref.assert_close(got[1][1], want[1][1], 1e-2, "dxs (rounded to bfloat16)")


def _leaky_step(p, carry, x, xnp):
    h = 0.5 * carry[0] + xnp.tanh(x @ p["w"])
    return (h,), 2.0 * h


class Leaky:
    """A user cell with only init/initial_carry/step: h' = 0.5 h + tanh(x W), y = 2 h'."""

    hidden_size = 3

    def init(self, key, input_size):
        return {"w": jax.random.normal(key, (input_size, 3))}

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, 3), dtype)

    def step(self, params, carry, x):
        h = 0.5 * carry + jnp.tanh(x @ params["w"])
        return h, 2.0 * h


def test_custom_cell_without_projection(key):
    """Any object with init/initial_carry/step works with rollout (scan path, no hoisting)."""
    cell = Leaky()
    p = cell.init(key, D)
    xs = jax.random.normal(jax.random.fold_in(key, 1), (T, B, D))
    c0 = 0.5 * jax.random.normal(jax.random.fold_in(key, 2), (B, 3))
    dys = jax.random.normal(jax.random.fold_in(key, 3), (T, B, 3))
    dc0 = jax.random.normal(jax.random.fold_in(key, 4), (B, 3))
    opts = OPTIONS["all"]
    arrays = (np.asarray(p["w"]), np.asarray(xs), np.asarray(c0), np.asarray(dc0), np.asarray(dys))
    w, xs_np, c0_np, dc0_np, dys_np = (a.astype(np.float64) for a in arrays)
    want = ref.rollout_vjp(_leaky_step, {"w": w}, xs_np, (c0_np,), ((dc0_np,), dys_np), **opts)

    @jax.jit
    def f(p, xs, c0):
        out = []
        for every in (None, 4):  # 4 does not divide T
            roll = lambda p, x, c, e=every: js.rollout(cell, p, x, c, checkpoint_every=e, **opts)
            (c, ys), pullback = jax.vjp(roll, p, xs, c0)
            out.append((((c,), ys), pullback((dc0, dys))))
        return out

    for (values, (dp, dx, dc)), every in zip(f(p, xs, c0), (None, 4)):
        ref.assert_close(values, want[0], TOL["float32"], f"values, checkpoint_every={every}")
        ref.assert_close((dp, dx, (dc,)), want[1], TOL["float32"], f"grads, {every}")
    with pytest.raises(ValueError, match="carry"):
        js.rollout(cell, p, xs, jnp.zeros((B, 4)))


# -- bad input ----------------------------------------------------------------------------


def test_bad_inputs(key):
    cell = make_cell("lstm", 5)
    p = cell.init(key, 4)
    t, b = 7, 3
    xs = jnp.zeros((t, b, 4))
    with pytest.raises(ValueError, match=r"xs: expected last dim D=4 .*got float32\[7, 3, 6\]"):
        js.rollout(cell, p, jnp.zeros((t, b, 6)))
    with pytest.raises(ValueError, match=r"xs: expected rank >= 2 \[T, \*B, D\], got rank 1"):
        js.rollout(cell, p, jnp.zeros((4,)))
    with pytest.raises(TypeError, match=r"xs: expected a floating dtype, got int32"):
        js.rollout(cell, p, jnp.zeros((t, b, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"lengths: expected shape \[3\] .*got int32\[2\]"):
        js.rollout(cell, p, xs, lengths=jnp.array([1, 2]))
    with pytest.raises(TypeError, match=r"lengths: expected an integer dtype, got float32\[3\]"):
        js.rollout(cell, p, xs, lengths=jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(
        ValueError,
        match=r"lengths: expected values in \[0, 7\] \(T=7\), got 8 at index \[1\] \(min 1, max 8\)",
    ):
        js.rollout(cell, p, xs, lengths=jnp.array([1, 8, 3]))
    with pytest.raises(
        ValueError, match=r"lengths: expected values in \[0, 7\] \(T=7\), got -1 at"
    ):
        js.rollout_unrolled(cell, p, xs, lengths=jnp.array([-1, 2, 3]))
    with pytest.raises(ValueError, match=r"reset: expected shape \[7, 3\] .*got bool\[7\]"):
        js.rollout(cell, p, xs, reset=jnp.zeros((t,), bool))
    with pytest.raises(TypeError, match=r"reset: expected dtype bool, got int32\[7, 3\]"):
        js.rollout(cell, p, xs, reset=jnp.zeros((t, b), jnp.int32))
    with pytest.raises(ValueError, match=r"carry.c: expected shape \[3, 5\].*got float32\[3, 4\]"):
        js.rollout(cell, p, xs, js.recurrent.LSTMCarry(jnp.zeros((b, 5)), jnp.zeros((b, 4))))
    with pytest.raises(TypeError, match=r"carry: expected LSTMCarry"):
        js.rollout(cell, p, xs, (jnp.zeros((b, 5)), jnp.zeros((b, 5))))
    with pytest.raises(ValueError, match="unroll: expected a positive int, True or 'auto', got 0"):
        js.rollout(cell, p, xs, unroll=0)
    with pytest.raises(
        TypeError,
        match=r"layer: expected a cell \(init/initial_carry/step methods\) or a sequence "
        r"layer \(a rollout method\), got object without 'init' or 'rollout'",
    ):
        js.rollout(object(), p, xs)


def test_errors_raise_at_trace_time_under_jit(key):
    cell = make_cell("gru")
    p = cell.init(key, D)
    f = jax.jit(lambda xs: js.rollout(cell, p, xs))
    with pytest.raises(ValueError, match="xs: expected last dim D=3"):
        f(jnp.zeros((T, B, 2)))


def test_rollout_unrolled_matches_reference():
    """The Python-loop reference implementation itself, with reset flags (alone, and
    with lengths and reverse), against the independent NumPy reference."""
    kind = "lstm"
    cell = make_cell(kind)
    params, xs_np, c0_np, _ = problem(kind)
    p, xs, c0, _ = to_jax(cell, problem(kind), jnp.float32)
    for name in ("reset", "all"):
        carry, ys = js.rollout_unrolled(cell, p, xs, c0, **OPTIONS[name])
        want = ref.rollout(kind, params, xs_np, c0_np, **OPTIONS[name])
        ref.assert_close((tuple(carry), ys), want, TOL["float32"], f"rollout_unrolled, {name}")


def test_empty_sequence_outputs_keep_the_model_dtype(key):
    """T = 0: the empty outputs have the dtype a step would give (bfloat16 for a
    bfloat16 model), the same for every implementation, as for T = 1."""
    cell = make_cell("gru")
    p = cell.init(key, D, jnp.bfloat16)
    xs = jax.random.normal(key, (1, 2, D), jnp.bfloat16)
    c16 = cell.initial_carry((2,), jnp.bfloat16)
    outs = [js.rollout(cell, p, x, c16, kernel=k) for x in (xs, xs[:0]) for k in KERNELS]
    outs += [js.rollout_unrolled(cell, p, x, c16) for x in (xs, xs[:0])]
    outs += [js.rollout(cell, p, x, kernel=k) for x in (xs, xs[:0]) for k in KERNELS]
    for carry, ys in outs:
        assert ys.dtype == jnp.bfloat16 and carry.h.dtype == jnp.bfloat16
        assert ys.shape[1:] == (2, H)


def test_unknown_kernel_is_named(key):
    cell = make_cell("gru")
    p = cell.init(key, D)
    with pytest.raises(ValueError, match=r"kernel: expected one of \['auto', 'fused', 'scan'\]"):
        js.rollout(cell, p, jnp.zeros((T, B, D)), kernel="cuda")


def test_checkpointed_outputs_keep_the_model_dtype(key):
    """checkpoint_every changes memory, not dtypes: a bfloat16 model gives bfloat16 outputs."""
    cell = make_cell("lstm")
    p = cell.init(key, D, jnp.bfloat16)
    xs = jax.random.normal(key, (5, 2, D), jnp.bfloat16)
    c16 = cell.initial_carry((2,), jnp.bfloat16)
    for kernel in KERNELS:
        plain = js.rollout(cell, p, xs, c16, kernel=kernel)
        ckpt = js.rollout(cell, p, xs, c16, kernel=kernel, checkpoint_every=2)
        assert ckpt[1].dtype == plain[1].dtype == jnp.bfloat16, kernel
        np.testing.assert_array_equal(np.float32(ckpt[1]), np.float32(plain[1]))
