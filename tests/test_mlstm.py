"""xLSTM's mLSTM (``js.recurrent.mlstm_recurrence`` and the ``js.recurrent.MLSTM`` cell)
against a float64 NumPy loop of the paper's stabilised equations, every mode against it,
stepping against the whole-sequence rollout, and the numerics at long T."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxseq as js

MLSTM = js.recurrent.MLSTM
mlstm_recurrence = js.recurrent.mlstm_recurrence
T, B, K, DK, DV = 7, 3, 2, 3, 4
MODES = [("recurrent", 4), ("chunked", 3), ("parallel", 64), ("auto", 4)]  # auto: chunked, padded


# ---- an independent reference: the paper's stabilised mLSTM, one head at a time ------------


def ref_mlstm(
    q,
    k,
    v,
    i_pre,
    f_pre,
    state=None,
    reset=None,
    lengths=None,
    reverse=False,
    gate="sigmoid",
    eps=1e-6,
):
    """``((c, n, m), h)`` in float64: ``q, k [T, B, K, Dk]``, ``v [T, B, K, Dv]``,
    ``i_pre, f_pre [T, B, K]``; each sequence and head on its own, in Python loops."""
    q, k, v, i_pre, f_pre = (np.asarray(x, np.float64) for x in (q, k, v, i_pre, f_pre))
    t, b, nk, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = (np.zeros((b, nk, dk, dv)), np.zeros((b, nk, dk)), np.zeros((b, nk)))
    c_all, n_all, m_all = (np.array(x, np.float64) for x in state)
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    reset = np.zeros((t, b), bool) if reset is None else np.asarray(reset)
    h = np.zeros((t, b, nk, dv))
    for j in range(b):
        n_j = int(lengths[j])
        order = range(n_j - 1, -1, -1) if reverse else range(n_j)
        for head in range(nk):
            c, n, m = c_all[j, head].copy(), n_all[j, head].copy(), float(m_all[j, head])
            for s in order:
                # a flag empties the state before step s in forward time: in reverse,
                # before step s - 1, i.e. when coming from step s + 1
                if (not reverse and reset[s, j]) or (reverse and s + 1 < n_j and reset[s + 1, j]):
                    c, n, m = np.zeros_like(c), np.zeros_like(n), 0.0
                fp = f_pre[s, j, head]
                log_f = -np.logaddexp(0.0, -fp) if gate == "sigmoid" else fp
                log_i = i_pre[s, j, head]
                m_new = max(log_f + m, log_i)
                f_act, i_act = np.exp(log_f + m - m_new), np.exp(log_i - m_new)
                c = f_act * c + i_act * np.outer(k[s, j, head], v[s, j, head])
                n = f_act * n + i_act * k[s, j, head]
                m = m_new
                qs = q[s, j, head] / np.sqrt(dk)
                h[s, j, head] = c.T @ qs / (max(abs(n @ qs), np.exp(-m)) + eps)
            c_all[j, head], n_all[j, head], m_all[j, head] = c, n, m
    return (c_all, n_all, m_all), h


def _inputs(seed=0, t=T, dtype=jnp.float32, gate_scale=3.0):
    rng = np.random.default_rng(seed)  # NumPy draws: no program compiled per shape
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    q, k, v = normal(t, B, K, DK), normal(t, B, K, DK), normal(t, B, K, DV)
    i_pre, f_pre = gate_scale * normal(t, B, K), gate_scale * normal(t, B, K)
    return q, k, v, i_pre, f_pre


def _state(seed=5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return js.recurrent.MLSTMState(normal(B, K, DK, DV), normal(B, K, DK), normal(B, K))


LENGTHS = jnp.array([T, 4, 0])
RESET = jnp.zeros((T, B), bool).at[0, 0].set(True).at[3, 0].set(True).at[5, 0].set(True)
RESET = RESET.at[2, 1].set(True).at[5, 1].set(True)  # step 5 of sequence 1 is padding


def _unscaled(state):
    """``(c e^m, n e^m)``: the memory without its stabiliser (what every mode agrees on)."""
    c, n, m = (np.asarray(x, np.float64) for x in state)
    return c * np.exp(m)[..., None, None], n * np.exp(m)[..., None]


# ---- values against the reference ---------------------------------------------------------


def _all_modes(fn, modes=MODES):
    """``fn(mode, chunk)`` for every mode, in one compiled program."""
    return jax.jit(lambda: [fn(mode, chunk) for mode, chunk in modes])()


@pytest.mark.parametrize(
    "reverse,gate,resets", [(False, "sigmoid", True), (True, "exp", True), (True, "sigmoid", False)]
)
def test_every_mode_matches_the_float64_loop(reverse, gate, resets):
    # without resets the chunked mode solves the pass across chunks at once
    with jax.enable_x64(True):
        xs = _inputs(dtype=jnp.float64)
        s0 = _state(dtype=jnp.float64)
        kw = dict(reset=RESET if resets else None, lengths=LENGTHS, reverse=reverse)
        (c, n, m), h = ref_mlstm(*xs, s0, gate=gate, **kw)
        outs = _all_modes(
            lambda mode, chunk: mlstm_recurrence(
                *xs, initial_state=s0, mode=mode, chunk=chunk, forget_gate=gate, **kw
            )
        )
        for (mode, _), (state, hj) in zip(MODES, outs):
            assert hj.dtype == jnp.float64 and state.c.dtype == jnp.float64
            np.testing.assert_allclose(hj, h, atol=1e-12, rtol=1e-10, err_msg=mode)
            np.testing.assert_allclose(state.m, m, atol=1e-12, err_msg=mode)
            for got, want in zip(_unscaled(state), _unscaled((c, n, m))):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=mode)
            assert np.all(np.asarray(hj)[4:, 1] == 0) and np.all(np.asarray(hj)[:, 2] == 0)
            np.testing.assert_array_equal(state.c[2], s0.c[2])  # length 0: unchanged


def test_float32_modes_agree_with_the_loop_and_the_library_conventions():
    """No state, no padding: the mlstm_kernels conventions (m_0 = 0, q / sqrt(Dk), eps after
    the max) are those of the reference; float32 within float32 rounding."""
    xs = _inputs(seed=3, t=19)
    _, h = ref_mlstm(*xs)
    outs = _all_modes(lambda mode, chunk: mlstm_recurrence(*xs, mode=mode, chunk=chunk)[1])
    for (mode, _), hj in zip(MODES, outs):
        assert hj.dtype == jnp.float32
        np.testing.assert_allclose(hj, h, atol=2e-5, rtol=2e-5, err_msg=mode)


def test_the_exact_values_of_a_hand_example():
    """One head, Dk = Dv = 1, i = f = 1 (f_pre large): h is the running mean of v."""
    q = k = jnp.ones((4, 1, 1))
    v = jnp.array([2.0, 4.0, 6.0, 8.0]).reshape(4, 1, 1)
    _, h = jax.jit(mlstm_recurrence)(q, k, v, jnp.zeros((4, 1)), jnp.full((4, 1), 50.0))
    np.testing.assert_allclose(h[:, 0, 0], [2.0, 3.0, 4.0, 5.0], rtol=1e-5)


def test_any_number_of_batch_dims_is_the_flattened_batch():
    """``*B = ()`` and ``*B = (3, 2)`` give what the flattened batch gives, states included."""
    rng = np.random.default_rng(11)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v, c = normal(5, 6, 2, 3), normal(5, 6, 2, 3), normal(5, 6, 2, 4), normal(6, 2, 3, 4)
    i_pre, f_pre, n, m = normal(5, 6, 2), normal(5, 6, 2), normal(6, 2, 3), normal(6, 2)
    lengths = jnp.array([5, 3, 0, 1, 5, 2])

    def run(shape):
        r = lambda x, lead: x.reshape(x.shape[:lead] + shape + x.shape[lead + 1 :])
        return mlstm_recurrence(
            r(q, 1), r(k, 1), r(v, 1), r(i_pre, 1), r(f_pre, 1), initial_state=(r(c, 0), r(n, 0), r(m, 0)),
            lengths=lengths.reshape(shape), mode="chunked", chunk=2,
        )  # fmt: skip

    (s6, h6), (s32, h32) = jax.jit(lambda: [run((6,)), run((3, 2))])()
    np.testing.assert_allclose(h32.reshape(h6.shape), h6, rtol=1e-6, atol=1e-6)
    for a, b in zip(s32, s6):
        np.testing.assert_allclose(a.reshape(b.shape), b, rtol=1e-6, atol=1e-6)
    s1, h1 = jax.jit(lambda: mlstm_recurrence(q[:, 0], k[:, 0], v[:, 0], i_pre[:, 0], f_pre[:, 0], initial_state=(c[0], n[0], m[0]), mode="chunked", chunk=2))()  # fmt: skip
    np.testing.assert_allclose(h1, h6[:, 0], rtol=1e-6, atol=1e-6)
    for a, b in zip(s1, s6):
        np.testing.assert_allclose(a, b[0], rtol=1e-6, atol=1e-6)


# ---- gradients ----------------------------------------------------------------------------


def test_gradients_of_every_mode_match_finite_differences():
    """``check_grads`` in float64 of one loss: the three modes' losses with random weights,
    so a wrong gradient in any mode fails (one program for the three modes)."""
    with jax.enable_x64(True):
        xs = _inputs(seed=2, t=5, dtype=jnp.float64, gate_scale=1.0)
        args = (*xs, *_state(dtype=jnp.float64))
        reset = jnp.zeros((5, B), bool).at[2, 0].set(True)
        weights = np.random.default_rng(9).standard_normal(4)

        def loss(*a):
            total = 0.0
            # the chunked mode with and without resets (without: the pass across chunks
            # solved at once)
            for w, (mode, chunk), r in zip(weights, [*MODES[:3], MODES[1]], [reset] * 3 + [None]):
                state, h = mlstm_recurrence(
                    *a[:5], initial_state=a[5:], reset=r, lengths=jnp.array([5, 3, 0]),
                    mode=mode, chunk=chunk,
                )  # fmt: skip
                c = state.c * jnp.exp(state.m)[..., None, None]
                total = total + w * (jnp.sum(h * jnp.cos(h)) + jnp.sum(c))
            return total

        check_grads(jax.jit(loss), args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_unpadded_chunks_match_the_loop_in_both_autodiff_modes():
    """No lengths, no resets, T a multiple of the chunk: the mask is added to the log
    weights and the entering state's part has its own differentiation rule (scaled
    after the product undifferentiated, before it differentiated). Values against the
    float64 loop in both layouts; ``check_grads`` in forward and reverse mode."""
    with jax.enable_x64(True):
        xs = _inputs(seed=6, t=12, dtype=jnp.float64)
        s0 = _state(dtype=jnp.float64)
        (_, _, m), h = ref_mlstm(*xs, s0)
        run = lambda *a, **kw: mlstm_recurrence(*a, initial_state=s0, mode="chunked", chunk=4, **kw)
        state, h_tm = jax.jit(run)(*xs)
        _, h_hm = jax.jit(functools.partial(run, layout="heads_major"))(
            *[_heads_major(x) for x in xs]
        )
        np.testing.assert_allclose(h_tm, h, atol=1e-12, rtol=1e-10)
        np.testing.assert_allclose(h_hm, _heads_major(h), atol=1e-12, rtol=1e-10)
        np.testing.assert_allclose(state.m, m, atol=1e-12)
        small = tuple(x[:8, :1] for x in _inputs(seed=7, t=8, dtype=jnp.float64, gate_scale=1.0))

        def loss(*a):
            state, out = mlstm_recurrence(*a, mode="chunked", chunk=4)
            return jnp.sum(out * jnp.cos(out)) + jnp.sum(
                state.c * jnp.exp(state.m)[..., None, None]
            )

        check_grads(jax.jit(loss), small, order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_padded_inputs_reach_no_arithmetic_and_closed_gates_stay_finite():
    """NaN at padded steps changes nothing, in values or gradients; sequence 0 has every
    gate closed (``m`` far below 0: the floor ``exp(-m)`` is capped, no ``0 * inf``)."""
    q, k, v, i_pre, f_pre = _inputs(seed=4)
    i_pre, f_pre = (x.at[:, 0].set(-200.0) for x in (i_pre, f_pre))
    xs = (q, k, v, i_pre, f_pre)
    lengths = jnp.array([T, 4, 0])
    pad = ~(jnp.arange(T)[:, None] < lengths[None, :])  # [T, B]
    nan = lambda x: jnp.where(pad.reshape(pad.shape + (1,) * (x.ndim - 2)), jnp.nan, x)
    bad = tuple(nan(x) for x in xs)

    def run(mode, chunk):
        f = lambda *a: mlstm_recurrence(*a, lengths=lengths, mode=mode, chunk=chunk)[1]
        grads = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4))(*bad)
        return f(*bad), f(*xs), grads

    for (mode, _), (h, h_ok, grads) in zip(MODES, _all_modes(run, MODES[:2])):
        # NaN at a padded step that reached a valid one would make it NaN; the clean run
        # and the NaN run are fused apart by XLA, so equal up to rounding, not bitwise
        np.testing.assert_allclose(h, h_ok, rtol=1e-6, atol=0, err_msg=mode)
        assert np.all(np.isfinite(h)), mode
        for g in grads:
            assert np.all(np.isfinite(g)), mode
            assert np.all(np.asarray(g)[np.asarray(pad)] == 0), mode


# ---- long sequences and extreme gates ------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_values_and_gradients_at_t_8192_with_gates_of_30(dtype):
    t = 8192
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((t, 1, 2, 4)), dtype) for _ in range(3))
    signs = jnp.asarray(np.where(rng.random((2, t, 1, 2)) < 0.5, 30.0, -30.0), dtype)
    i_pre, f_pre = signs[0], signs[1]

    def loss(q, k, v, i_pre, f_pre, mode):
        state, h = mlstm_recurrence(q, k, v, i_pre, f_pre, mode=mode)
        return jnp.sum(h.astype(jnp.float32) ** 2) + jnp.sum(state.n.astype(jnp.float32))

    both = lambda *a: [
        jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*a, mode)
        for mode in (("chunked", "recurrent") if dtype == jnp.float32 else ("chunked",))
    ]
    for value, grads in jax.jit(both)(q, k, v, i_pre, f_pre):
        assert np.isfinite(float(value))
        for g in grads:
            assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g)))


# ---- properties -----------------------------------------------------------------------------


@functools.cache
def _compiled(mode, chunk, reverse):
    f = lambda xs, s0, reset, lengths: mlstm_recurrence(
        *xs, initial_state=s0, reset=reset, lengths=lengths, reverse=reverse, mode=mode, chunk=chunk
    )
    return jax.jit(f)


@settings(max_examples=4, deadline=None)
@given(
    chunk=st.integers(1, 13),
    lengths=st.lists(st.integers(0, 11), min_size=B, max_size=B),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_recurrent_for_any_chunk_and_lengths(chunk, lengths, reverse, seed):
    xs = _inputs(seed=seed, t=11)
    reset = jnp.asarray(np.random.default_rng(seed + 1).random((11, B)) < 0.2)
    args = (xs, _state(seed), reset, jnp.array(lengths))
    s1, h1 = _compiled("recurrent", 1, reverse)(*args)
    s2, h2 = _compiled("chunked", chunk, reverse)(*args)
    np.testing.assert_allclose(h2, h1, atol=1e-4, rtol=1e-4)
    for a, b in zip(_unscaled(s2), _unscaled(s1)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_the_unrolled_and_the_looped_pass_across_chunks_agree_with_recurrent():
    # 34 steps: chunks of 3 give 12 chunks (the pass across them unrolled), chunks of 2
    # give 17 (a loop); resets, padding, an initial state and reverse in both
    t = 34
    xs = _inputs(seed=3, t=t)
    reset = jnp.asarray(np.random.default_rng(4).random((t, B)) < 0.1)
    args = (xs, _state(), reset, jnp.array([t, 29, 5]))
    s0, h0 = _compiled("recurrent", 1, True)(*args)
    for chunk in (3, 2):
        s1, h1 = _compiled("chunked", chunk, True)(*args)
        np.testing.assert_allclose(h1, h0, atol=1e-4, rtol=1e-4)
        for a, b in zip(_unscaled(s1), _unscaled(s0)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _heads_major(x):
    """``[T, B, K, ...]`` -> ``[B, K, T, ...]`` (gates ``[T, B, K]`` -> ``[B, K, T]``)."""
    return jnp.moveaxis(x, 0, 2)


@pytest.mark.parametrize("reverse,resets", [(False, True), (True, True), (False, False)])
def test_heads_major_layout_matches_the_float64_loop_in_every_mode(reverse, resets):
    # inputs [B, K, T, D], reset [B, T]: the loop's (time-major) results moved to that
    # layout; 34 steps in chunks of 3 and 2 take the unrolled and the looped pass across
    # chunks; the state keeps its layout
    t = 34
    with jax.enable_x64(True):
        xs = _inputs(seed=5, t=t, dtype=jnp.float64)
        s0 = _state(dtype=jnp.float64)
        reset = jnp.asarray(np.random.default_rng(6).random((t, B)) < 0.15) if resets else None
        lengths = jnp.array([t, 29, 0])
        (c, n, m), h = ref_mlstm(*xs, s0, reset=reset, lengths=lengths, reverse=reverse)
        modes = [("recurrent", 4), ("chunked", 3), ("chunked", 2), ("parallel", 64)]
        hm = [_heads_major(x) for x in xs]
        outs = _all_modes(
            lambda mode, chunk: mlstm_recurrence(
                *hm, initial_state=s0, reset=None if reset is None else reset.T,
                lengths=lengths, reverse=reverse,
                mode=mode, chunk=chunk, layout="heads_major",
            ),
            modes,
        )  # fmt: skip
        for (mode, chunk), (state, hj) in zip(modes, outs):
            assert hj.shape == (B, K, t, DV)
            np.testing.assert_allclose(hj, _heads_major(h), atol=1e-12, rtol=1e-9, err_msg=mode)
            np.testing.assert_allclose(state.m, m, atol=1e-12, err_msg=f"{mode} {chunk}")
            for got, want in zip(_unscaled(state), _unscaled((c, n, m))):
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=mode)


def test_heads_major_gradients_equal_the_time_major_ones_moved():
    # the same loss through both layouts (resets, lengths, 12 chunks): the gradients with
    # respect to every input are the time-major ones in the heads-major layout
    t = 34
    xs = _inputs(seed=7, t=t)
    reset = jnp.asarray(np.random.default_rng(8).random((t, B)) < 0.15)
    lengths = jnp.array([t, 20, 3])
    w = jnp.asarray(np.random.default_rng(9).standard_normal((t, B, K, DV)), jnp.float32)

    def loss(layout, *a):
        move = _heads_major if layout == "heads_major" else (lambda x: x)
        h = mlstm_recurrence(
            *a, reset=reset.T if layout == "heads_major" else reset, lengths=lengths,
            mode="chunked", chunk=3, layout=layout,
        )[1]  # fmt: skip
        return jnp.sum(h * move(w))

    grads = jax.jit(
        lambda xs: (
            jax.grad(functools.partial(loss, "time_major"), argnums=range(5))(*xs),
            jax.grad(functools.partial(loss, "heads_major"), argnums=range(5))(
                *[_heads_major(x) for x in xs]
            ),
        )
    )
    g_tm, g_hm = grads(xs)
    for name, a, b in zip(("q", "k", "v", "i_pre", "f_pre"), g_tm, g_hm):
        assert bool(jnp.any(a != 0)), name
        np.testing.assert_allclose(b, _heads_major(a), atol=1e-5, rtol=1e-4, err_msg=name)


def test_heads_major_errors_name_the_layout():
    q, k, v, i_pre, f_pre = (_heads_major(x) for x in _inputs())
    hm = dict(layout="heads_major")
    with pytest.raises(ValueError, match=r"i_pre: expected shape \[3, 2, 7\] \(\[\*B, K, T\]"):
        mlstm_recurrence(q, k, v, i_pre[..., :1], f_pre, **hm)
    with pytest.raises(ValueError, match=r"reset: expected shape \[3, 7\] \(\[\*B, T\]"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, reset=jnp.zeros((7, 3), bool), **hm)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 7\]"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, lengths=jnp.array([8, 1, 1]), **hm)
    with pytest.raises(ValueError, match=r"v: expected shape .*\[\*B, K, T, Dv\]"):
        mlstm_recurrence(q, k, v[:, :1], i_pre, f_pre, **hm)
    with pytest.raises(ValueError, match=r"layout"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, layout="batch_major")


# ---- the cell -------------------------------------------------------------------------------

H, D = 8, 5


def _cell_params(cell, seed=0, dtype=jnp.float32):
    p = cell.init(jax.random.key(seed), D, dtype)
    rng = np.random.default_rng(seed)
    w = jnp.asarray(0.5 * rng.standard_normal(p.w_ih.shape), dtype)
    b = jnp.asarray(rng.standard_normal(p.b.shape), dtype)
    return p._replace(w_ih=w, b=b)  # every block non-trivial


def ref_cell(cell, params, xs, lengths=None, reset=None, reverse=False):
    """The cell in float64 from the equations: projections, the mLSTM per head, output gate."""
    w, b = (np.asarray(a, np.float64) for a in params)
    z = np.asarray(xs, np.float64) @ w + b
    h, nk = cell.hidden_size, cell.num_heads
    d = h // nk
    t, bb = z.shape[:2]
    q, k, v = (z[..., j * h : (j + 1) * h].reshape(t, bb, nk, d) for j in range(3))
    o = 1.0 / (1.0 + np.exp(-z[..., 3 * h : 4 * h]))
    i_pre, f_pre = z[..., 4 * h : 4 * h + nk], z[..., 4 * h + nk :]
    state, hh = ref_mlstm(
        q, k, v, i_pre, f_pre, reset=reset, lengths=lengths, reverse=reverse, gate=cell.forget_gate
    )
    return state, o * hh.reshape(t, bb, h)


@pytest.mark.parametrize("mode,reverse", [("recurrent", False), ("chunked", True)])
def test_cell_rollout_and_stepping_match_the_reference(mode, reverse):
    cell = MLSTM(H, num_heads=2, mode=mode, chunk=3)
    params = _cell_params(cell)
    xs = jnp.asarray(np.random.default_rng(3).standard_normal((T, B, D)), jnp.float32)
    kw = dict(lengths=LENGTHS, reset=RESET, reverse=reverse)
    (c, n, m), want = ref_cell(cell, params, xs, **kw)
    both = jax.jit(lambda p: [js.rollout(cell, p, xs, kernel=k, **kw) for k in ("auto", "scan")])
    (carry, ys), (carry_s, ys_s) = both(params)
    for got in (ys, ys_s):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    for got in (carry, carry_s):
        np.testing.assert_allclose(got.m, m, atol=1e-5)
        for a, b in zip(_unscaled(got), _unscaled((c, n, m))):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_step_by_step_equals_the_rollout_and_carries_continue():
    cell = MLSTM(H, num_heads=4, forget_gate="exp")
    params = _cell_params(cell, seed=4)
    xs = jnp.asarray(np.random.default_rng(5).standard_normal((T, B, D)), jnp.float32)

    def run(params, xs):
        carry, ys = cell.initial_carry((B,)), []
        for x in xs:
            carry, y = cell.step(params, carry, x)
            ys.append(y)
        c1, y1 = js.rollout(cell, params, xs[:3])  # two halves, the carry handed over
        c2, y2 = js.rollout(cell, params, xs[3:], c1)
        return jnp.stack(ys), js.rollout(cell, params, xs), (c2, jnp.concatenate([y1, y2]))

    ys, (c_roll, ys_roll), (c2, y12) = jax.jit(run)(params, xs)
    np.testing.assert_allclose(ys, ys_roll, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y12, ys_roll, atol=1e-5, rtol=1e-5)
    for a, b in zip(_unscaled(c2), _unscaled(c_roll)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_params_and_inputs_give_bfloat16_outputs_and_carries(key):
    cell = MLSTM(H, num_heads=2)
    xs = jnp.asarray(np.random.default_rng(6).standard_normal((T, B, D)), jnp.bfloat16)
    p16, p32 = cell.init(key, D, jnp.bfloat16), cell.init(key, D)

    def run(p16, p32):
        carry, ys16 = js.rollout(cell, p16, xs, lengths=LENGTHS)
        carry, _ = js.rollout(cell, p16, xs, carry)  # the carry goes back in
        carry, _ = cell.step(p16, carry, xs[0])
        return carry, ys16, js.rollout(cell, p32, xs, lengths=LENGTHS)

    carry, ys16, (carry32, ys32) = jax.jit(run)(p16, p32)
    assert ys16.dtype == jnp.bfloat16 and {a.dtype for a in carry} == {jnp.dtype(jnp.bfloat16)}
    assert ys32.dtype == jnp.float32 and {a.dtype for a in carry32} == {jnp.dtype(jnp.float32)}
    # the bfloat16 rollout is the float32 one (same params, rounded), rounded
    np.testing.assert_allclose(ys16.astype(jnp.float32), ys32, atol=3e-2, rtol=3e-2)


def test_init_opens_the_forget_gates():
    cell = MLSTM(8, num_heads=4)
    p = cell.init(jax.random.key(0), 3)
    np.testing.assert_allclose(p.b[-4:], [3.0, 4.0, 5.0, 6.0])
    np.testing.assert_allclose(p.b[-8:-4], -1.0)
    p_exp = MLSTM(8, num_heads=4, forget_gate="exp").init(jax.random.key(0), 3)
    np.testing.assert_allclose(jnp.exp(p_exp.b[-4:]), jax.nn.sigmoid(p.b[-4:]), rtol=1e-6)
    assert cell.output_size == 8 and cell.input_size(p) == 3


# ---- argument errors ------------------------------------------------------------------------


def test_argument_errors_name_the_argument():
    q, k, v, i_pre, f_pre = _inputs()
    with pytest.raises(ValueError, match=r"k: expected the shape of q"):
        mlstm_recurrence(q, k[:, :, :1], v, i_pre, f_pre)
    with pytest.raises(ValueError, match=r"v: expected shape"):
        mlstm_recurrence(q, k, v[:, :2], i_pre, f_pre)
    with pytest.raises(ValueError, match=r"i_pre: expected shape \[7, 3, 2\]"):
        mlstm_recurrence(q, k, v, i_pre[..., None], f_pre)
    with pytest.raises(TypeError, match=r"f_pre: expected a floating dtype"):
        mlstm_recurrence(q, k, v, i_pre, f_pre.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"initial_state\.n: expected shape \[3, 2, 3\]"):
        s = _state()
        mlstm_recurrence(q, k, v, i_pre, f_pre, initial_state=s._replace(n=s.c))
    with pytest.raises(TypeError, match=r"initial_state: expected an MLSTMState"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, initial_state=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"reset: expected shape \[7, 3\]"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, reset=jnp.zeros((7,), bool))
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 7\]"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, lengths=jnp.array([8, 1, 1]))
    with pytest.raises(ValueError, match=r"mode"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, mode="fast")
    with pytest.raises(ValueError, match=r"chunk"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, chunk=0)
    with pytest.raises(ValueError, match=r"forget_gate"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, forget_gate="tanh")
    with pytest.raises(ValueError, match=r"eps: expected a finite number"):
        mlstm_recurrence(q, k, v, i_pre, f_pre, eps=-1.0)


def test_cell_errors_name_the_argument(key):
    with pytest.raises(
        ValueError, match=r"hidden_size, num_heads: expected hidden_size a multiple"
    ):
        MLSTM(10, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        MLSTM(8, num_heads=0)
    with pytest.raises(ValueError, match="forget_gate"):
        MLSTM(8, forget_gate="relu")
    cell = MLSTM(8, num_heads=2)
    params = cell.init(key, D)
    carry = cell.initial_carry((B,))
    with pytest.raises(ValueError, match=r"params\.w_ih: expected shape \[D, 36\]"):
        cell.step(params._replace(w_ih=params.w_ih[:, :-1]), carry, jnp.ones((B, D)))
    with pytest.raises(ValueError, match=r"x: expected last dim D=5"):
        cell.step(params, carry, jnp.ones((B, D + 1)))
    with pytest.raises(ValueError, match=r"carry\.n: expected shape \[3, 2, 4\]"):
        cell.step(params, carry._replace(n=carry.m), jnp.ones((B, D)))
    with pytest.raises(TypeError, match=r"carry: expected MLSTMState"):
        cell.step(params, (carry.c, carry.n), jnp.ones((B, D)))
    with pytest.raises(TypeError, match=r"carry\.c: expected dtype float32"):
        js.rollout(cell, params, jnp.ones((T, B, D)), cell.initial_carry((B,), jnp.bfloat16))
