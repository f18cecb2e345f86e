"""The sLSTM cell (jaxseq/recurrent/slstm.py) and its fused kernel.

The reference is a float64 NumPy step written from the paper's equations in
their unstabilised form (``c = f c + i z``, ``n = f n + i``, ``h = o c / n``
with ``i = exp(ĩ)``), with the block-diagonal recurrent matmul as a loop over
heads; the lengths/reset/reverse loop is the shared test reference
(``_reference.rollout``). The library's stabilised carry ``(c, n, m)`` is
compared through the invariants ``c e^m`` and ``n e^m`` (the paper's ``c`` and
``n``); the stabiliser itself is representation, compared only between the two
kernels.
"""

import _reference as ref
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import jaxseq as js
from jaxseq.recurrent import dispatch

T, D, H, K = 5, 3, 4, 2
BATCH = (2, 3)
LENGTHS = np.array([[5, 3, 0], [4, 5, 1]], np.int32)
RESET = np.zeros((T, *BATCH), bool)
RESET[[0, 2], 0, 0] = True
RESET[[1, 3], 0, 1] = True
RESET[[3, 4], 1, 0] = True
RESET[[2], 1, 1] = True
MASKED_REVERSE = {"lengths": LENGTHS, "reset": RESET, "reverse": True}
# (options, kernels, forget gate): checkpoint_every=2 and 3 do not divide T=5. Small
# steps unroll by 4 by default; unroll=1 (the default of larger steps, and faster to
# compile) runs the fused backward's other loop, which writes over the activations.
CASES = {
    "masked_reverse": (MASKED_REVERSE, ("fused",), "sigmoid"),
    "k2_masked_reverse": (
        {**MASKED_REVERSE, "checkpoint_every": 2, "unroll": 1},
        ("fused",),
        "sigmoid",
    ),
    "k3_plain_exp": ({"checkpoint_every": 3, "unroll": 1}, ("fused",), "exp"),
}


# -- the reference: the paper's equations, float64 ---------------------------------------
def _sigmoid(x, xnp):
    return 1.0 / (1.0 + xnp.exp(-x))


def block_diagonal(w_hh, xnp):
    """The recurrent weight as a dense ``[H, 4H]`` matrix: gate g of head k (columns
    ``g H + k d .. g H + (k + 1) d``) reads head k's units (rows ``k d .. (k + 1) d``) only."""
    heads, d, _ = w_hh.shape
    zero = xnp.zeros((d, d), w_hh.dtype)
    rows = []
    for k in range(heads):
        cols = [
            w_hh[k][:, g * d : (g + 1) * d] if j == k else zero
            for g in range(4)
            for j in range(heads)
        ]
        rows.append(xnp.concatenate(cols, axis=1))
    return xnp.concatenate(rows, axis=0)


def ref_step(p, carry, x, xnp, forget):
    """One unstabilised sLSTM step; ``carry = (h, c, n)`` with the paper's ``c``, ``n``."""
    h, c, n = carry
    hsz = h.shape[-1]
    pre = x @ p["w_ih"] + h @ p["r"] + p["b"]
    i_t, f_t, z_t, o_t = (pre[g * hsz : (g + 1) * hsz] for g in range(4))
    i = xnp.exp(i_t)
    f = xnp.exp(f_t) if forget == "exp" else _sigmoid(f_t, xnp)
    c = f * c + i * xnp.tanh(z_t)
    n = f * n + i
    h = _sigmoid(o_t, xnp) * c / n
    return (h, c, n), h


def ref_loss(p, xs, carry, cts, opts, forget, xnp):
    """``sum(ys dys) + sum(h dh) + sum(c e^m dc) + sum(n e^m dn)`` of the reference."""
    h0, c0, n0, m0 = carry
    start = (h0, c0 * xnp.exp(m0), n0 * xnp.exp(m0))
    opts = {k: v for k, v in opts.items() if k not in ("checkpoint_every", "unroll")}
    p = {"w_ih": p["w_ih"], "r": block_diagonal(p["w_hh"], xnp), "b": p["b"]}
    step = lambda p, c, x, xnp: ref_step(p, c, x, xnp, forget)  # noqa: E731
    (h, c, n), ys = ref.rollout(step, p, xs, start, xnp=xnp, **opts)
    dys, dh, dc, dn = cts
    return (ys * dys).sum() + (h * dh).sum() + (c * dc).sum() + (n * dn).sum()


def lib_loss(cell, params, xs, carry, cts, opts, kernel):
    new, ys = js.rollout(cell, params, xs, carry, kernel=kernel, **opts)
    dys, dh, dc, dn = cts
    e = jnp.exp(new.m)
    return (ys * dys).sum() + (new.h * dh).sum() + (new.c * e * dc).sum() + (new.n * e * dn).sum()


def problem(seed=0, batch=BATCH, t=T, heads=K):
    rng = np.random.default_rng(seed)
    dh = H // heads
    p = {
        "w_ih": rng.normal(0, 0.6, (D, 4 * H)),
        "w_hh": rng.normal(0, 0.6, (heads, dh, 4 * dh)),
        "b": rng.normal(0, 0.6, (4 * H,)),
    }
    xs = rng.normal(0, 1.0, (t, *batch, D))
    carry = (
        rng.normal(0, 0.5, (*batch, H)),
        rng.normal(0, 0.5, (*batch, H)),
        rng.uniform(0.5, 2.0, (*batch, H)),  # n > 0: a state with content
        rng.normal(0, 0.5, (*batch, H)),
    )
    cts = tuple(rng.normal(0, 1.0, s) for s in [(t, *batch, H)] + [(*batch, H)] * 3)
    return p, xs, carry, cts


def to_jax(p, xs, carry, dtype):
    params = js.recurrent.SLSTMParams(*(jnp.asarray(p[k], dtype) for k in ("w_ih", "w_hh", "b")))
    return (
        params,
        jnp.asarray(xs, dtype),
        js.recurrent.SLSTMCarry(*(jnp.asarray(c, dtype) for c in carry)),
    )


_REFERENCES = {}


def reference_grads(prob, opts, forget="sigmoid", seed=0):
    """Value and gradients of the reference (jitted, computed once per case)."""
    key = (
        tuple(sorted(k for k in opts if k in ("lengths", "reset"))),
        opts.get("reverse"),
        forget,
        seed,
    )
    if key not in _REFERENCES:
        p, xs, carry, cts = prob
        with jax.enable_x64(True):
            args = (
                {k: jnp.asarray(v) for k, v in p.items()},
                jnp.asarray(xs),
                tuple(map(jnp.asarray, carry)),
            )
            f = lambda p, xs, c: ref_loss(p, xs, c, cts, opts, forget, jnp)  # noqa: E731
            val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
            _REFERENCES[key] = float(val), jax.tree_util.tree_map(np.asarray, grads)
    return _REFERENCES[key]


def library_grads(prob, opts, kernels, dtype, heads=K, forget="sigmoid"):
    """Value and gradients of the library's loss for each kernel (one jitted program)."""
    p, xs, carry, cts = prob
    cell = js.recurrent.SLSTM(H, num_heads=heads, forget_gate=forget)
    with jax.enable_x64(dtype == "float64"):
        params, xs_j, carry_j = to_jax(p, xs, carry, dtype)
        cts_j = tuple(jnp.asarray(c, dtype) for c in cts)

        @jax.jit
        def f(params, xs, carry):
            outs = []
            for kernel in kernels:
                g = lambda a, b, c, k=kernel: lib_loss(cell, a, b, c, cts_j, opts, k)  # noqa: E731
                outs.append(jax.value_and_grad(g, argnums=(0, 1, 2))(params, xs, carry))
            return outs

        results = []
        for val, (gp, gx, gc) in f(params, xs_j, carry_j):
            grads = ({"w_ih": gp.w_ih, "w_hh": gp.w_hh, "b": gp.b}, gx, tuple(gc))
            results.append(
                (float(val), jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), grads))
            )
        return results


def assert_close(got, want, tol):
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)
    ):
        scale = max(np.abs(w).max(), 1.0)
        err = np.abs(g - w).max() / scale
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.3g} > {tol}"


# -- equivalence ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_the_paper_reference(case):
    opts, kernels, forget = CASES[case]
    prob = problem()
    want_val, want = reference_grads(prob, opts, forget)
    for got_val, got in library_grads(prob, opts, kernels, "float64", forget=forget):
        assert abs(got_val - want_val) <= 1e-11 * max(abs(want_val), 1.0)
        assert_close(got, want, 1e-10)


def test_float32_kernels_match_the_reference():
    prob = problem()
    want_val, want = reference_grads(prob, MASKED_REVERSE)
    opts = {**MASKED_REVERSE, "unroll": 1}
    for got_val, got in library_grads(prob, opts, ("fused", "scan"), "float32"):
        assert abs(got_val - want_val) <= 1e-5 * max(abs(want_val), 1.0)
        assert_close(got, want, 2e-5)


def test_fused_equals_scan_with_cotangents_on_every_carry_leaf(key):
    """The stabiliser ``m`` is representation, but the two kernels share it: with a
    cotangent on ``m`` itself (and ``c``, ``n`` directly) their gradients agree."""
    cell = js.recurrent.SLSTM(8, num_heads=2, recurrent_init=js.initializers.orthogonal())
    params = cell.init(key, 3)
    xs = 2.0 * jax.random.normal(jax.random.key(1), (7, 2, 3))
    reset = jnp.zeros((7, 2), bool).at[3, 0].set(True)

    def loss(p, xs, kernel):
        c, ys = js.rollout(
            cell, p, xs, kernel=kernel, reset=reset, lengths=jnp.array([7, 5]), unroll=1
        )
        return (ys**2).sum() + (c.c * c.n).sum() + (c.m**2).sum() + c.h.sum()

    grads = jax.jit(lambda p, xs: [jax.grad(loss, (0, 1))(p, xs, k) for k in ("fused", "scan")])
    got, want = grads(params, xs)
    assert_close(
        jax.tree_util.tree_map(np.asarray, got), jax.tree_util.tree_map(np.asarray, want), 1e-5
    )


def test_check_grads_of_the_fused_rollout():
    p, xs, carry, _ = problem(seed=2, batch=(2,), t=4)
    cell = js.recurrent.SLSTM(H, num_heads=K)
    with jax.enable_x64(True):
        params, xs_j, carry_j = to_jax(p, xs, carry, "float64")

        @jax.jit
        def f(params, xs, carry):
            new, ys = js.rollout(
                cell, params, xs, carry, kernel="fused", lengths=jnp.array([4, 2]), unroll=1
            )
            return ys, new.h, new.c * jnp.exp(new.m)

        check_grads(f, (params, xs_j, carry_j), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_the_fused_kernel_is_the_default_and_stepping_equals_it(key):
    cell = js.recurrent.SLSTM(4, num_heads=2, forget_gate="exp")
    params = cell.init(key, 3)
    xs = jax.random.normal(jax.random.key(1), (5, 2, 3))
    seq = js.recurrent.prepare(cell, params, xs)
    assert (
        dispatch.plan(cell, params, seq, None, js.recurrent.RolloutOptions()).rule.name
        == "slstm_exp"
    )
    carry, ys = js.rollout(cell, params, xs)
    c = cell.initial_carry((2,))
    step = jax.jit(cell.step)
    for t in range(5):
        c, y = step(params, c, xs[t])
        np.testing.assert_allclose(ys[t], y, atol=1e-6)
    for a, b in zip(carry, c):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_stack_and_bidirectional_take_the_fused_kernel(key):
    layer = js.Stack([js.Bidirectional(js.recurrent.SLSTM(4, num_heads=2))])
    params = layer.init(key, 3)
    xs = jax.random.normal(jax.random.key(1), (6, 2, 3))
    lengths = jnp.array([6, 3])

    def loss(p, kernel):
        _, ys = js.rollout(layer, p, xs, lengths=lengths, kernel=kernel, unroll=1)
        return (ys**2).sum()

    got, want = jax.jit(lambda p: [jax.grad(loss)(p, k) for k in ("fused", "scan")])(params)
    assert_close(
        jax.tree_util.tree_map(np.asarray, got), jax.tree_util.tree_map(np.asarray, want), 1e-5
    )


def test_jvp_takes_the_scan_path(key):
    cell = js.recurrent.SLSTM(4, num_heads=2)
    params = cell.init(key, 3)
    xs = jnp.ones((4, 2, 3))
    out, tangent = jax.jvp(lambda x: js.rollout(cell, params, x)[1], (xs,), (xs,))
    assert out.shape == tangent.shape == (4, 2, 4)


# -- structure and init -----------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["fused", "scan"])
def test_a_head_sees_only_its_own_previous_hidden_state(kernel, key):
    cell = js.recurrent.SLSTM(6, num_heads=3, recurrent_init=js.initializers.orthogonal())
    params = cell.init(key, 2)
    x = jax.random.normal(jax.random.key(1), (1, 2))
    c0 = cell.initial_carry(())._replace(n=jnp.ones(6), c=0.3 * jnp.ones(6))

    def y_of_h(h):
        return js.rollout(cell, params, x, c0._replace(h=h), kernel=kernel, unroll=1)[1][0]

    jac = np.asarray(jax.jit(jax.jacrev(y_of_h))(jnp.linspace(-1.0, 1.0, 6)))  # [H out, H in]
    for k in range(3):
        for j in range(3):
            block = jac[2 * k : 2 * k + 2, 2 * j : 2 * j + 2]
            assert (np.abs(block).max() > 1e-3) == (k == j), (k, j, block)


def test_init_follows_the_xlstm_reference(key):
    cell = js.recurrent.SLSTM(8, num_heads=2)
    p = cell.init(key, 5)
    assert p.w_ih.shape == (5, 32) and p.w_hh.shape == (2, 4, 16) and p.b.shape == (32,)
    assert not np.any(p.w_hh)  # recurrent blocks start at zero
    per_head = 5.0 - 12.0 * (np.arange(4) / 3.0) ** 0.3
    np.testing.assert_allclose(p.b[8:16], np.tile(per_head, 2), rtol=1e-6)
    assert not np.any(p.b[:8]) and not np.any(p.b[16:])
    q = js.recurrent.SLSTM(8, num_heads=2, recurrent_init=js.initializers.orthogonal()).init(key, 5)
    block = np.asarray(q.w_hh[1, :, 4:8])  # head 1's forget block: orthogonal
    np.testing.assert_allclose(block @ block.T, np.eye(4), atol=1e-5)


# -- numerics ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "forget, x_dtype, p_dtype",
    [
        ("sigmoid", "float32", "float32"),
        ("exp", "bfloat16", "float32"),
        ("sigmoid", "bfloat16", "bfloat16"),
    ],
)
def test_long_sequences_with_large_gate_preactivations_stay_finite(forget, x_dtype, p_dtype):
    t = 8192
    cell = js.recurrent.SLSTM(4, num_heads=2, forget_gate=forget)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], (t, 2, 1))
    xs = jnp.asarray(signs, x_dtype)
    gates = np.array([1, -1, 1, 1, -1, 1, -1, 1, 1, 1, -1, -1, 1, -1, 1, -1], np.float32)
    params = js.recurrent.SLSTMParams(
        jnp.asarray(30.0 * gates[None], p_dtype),  # pre-activations of +-30
        jnp.asarray(np.full((2, 2, 8), 0.5), p_dtype),
        jnp.zeros(16, p_dtype),
    )

    @jax.jit
    def f(params, xs):
        def loss(params, xs):
            carry, ys = js.rollout(cell, params, xs, unroll=1)
            return ys.astype(jnp.float32).sum() + carry.h.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1))(params, xs)

    val, grads = f(params, xs)
    assert np.isfinite(float(val))
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@settings(max_examples=25, deadline=None)
@given(
    pre=st.lists(st.floats(-60.0, 60.0), min_size=3 * 16, max_size=3 * 16),
    exp_forget=st.booleans(),
)
def test_normaliser_stays_at_least_one_and_h_bounded(pre, exp_forget):
    """From the zero carry, for any gate pre-activations: ``n >= 1`` and ``|h| <= 1``."""
    xs = jnp.asarray(np.array(pre, np.float32).reshape(3, 1, 16))
    carry, ys = _rollouts(xs)[int(exp_forget)]
    assert np.all(np.asarray(carry.n) >= 1.0 - 1e-6)
    assert np.all(np.abs(np.asarray(ys)) <= 1.0 + 1e-6)
    assert np.all(np.isfinite(np.asarray(carry.m)))


_CELLS = {
    e: js.recurrent.SLSTM(4, num_heads=2, forget_gate="exp" if e else "sigmoid") for e in (0, 1)
}
_IDENTITY = js.recurrent.SLSTMParams(jnp.eye(16), jnp.zeros((2, 2, 8)), jnp.zeros(16))


@jax.jit
def _rollouts(xs):
    return [js.rollout(_CELLS[e], _IDENTITY, xs, unroll=1) for e in (0, 1)]


# -- argument errors --------------------------------------------------------------------
def test_argument_errors_name_the_argument(key):
    with pytest.raises(ValueError, match="num_heads: expected a divisor of hidden_size=6, got 4"):
        js.recurrent.SLSTM(6, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        js.recurrent.SLSTM(6, num_heads=0)
    with pytest.raises(ValueError, match="forget_gate"):
        js.recurrent.SLSTM(4, forget_gate="tanh")
    with pytest.raises(ValueError, match="hidden_size"):
        js.recurrent.SLSTM(0)
    with pytest.raises(TypeError, match="forget_bias_init"):
        js.recurrent.SLSTM(4, forget_bias_init=1.0)
    cell = js.recurrent.SLSTM(4, num_heads=2)
    params = cell.init(key, 3)
    with pytest.raises(ValueError, match=r"params.w_hh: expected shape \[K=2, H/K=2, 4H/K=8\]"):
        cell.step(
            params._replace(w_hh=jnp.zeros((4, 16))), cell.initial_carry((1,)), jnp.ones((1, 3))
        )
    with pytest.raises(TypeError, match="params: expected SLSTMParams"):
        cell.check_params(js.LSTM(4).init(key, 3))
    with pytest.raises(TypeError, match="carry"):
        js.rollout(cell, params, jnp.ones((2, 1, 3)), js.LSTM(4).initial_carry((1,)))
    with pytest.raises(ValueError, match=r"carry.m: expected shape \[1, 4\]"):
        bad = cell.initial_carry((1,))._replace(m=jnp.zeros((1, 3)))
        js.rollout(cell, params, jnp.ones((2, 1, 3)), bad)
    with pytest.raises(ValueError, match="x: expected last dim D=3"):
        cell.step(params, cell.initial_carry((1,)), jnp.ones((1, 2)))
