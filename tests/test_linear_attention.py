"""``js.recurrent.linear_attention``: every mode against a float64 NumPy loop of
``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``y_t = S_tᵀ q_t`` written here (values and
finite-difference gradients), ``check_grads`` per mode, long strongly decaying
sequences, and the argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxseq as js

MODES = ("recurrent", "chunked", "parallel", "auto")
linear_attention = jax.jit(
    js.recurrent.linear_attention, static_argnames=("reverse", "mode", "chunk")
)


def np_linear_attention(q, k, v, g, s0, reset, lengths, reverse):
    """``(S_final [B, K, Dk, Dv], ys [T, B, K, Dv])``, float64, one head at a time.

    ``g``: None, ``[T, B, K]`` or ``[T, B, K, Dk]``; ``reset[t]`` empties the state
    before step ``t`` in forward time (in reverse, before the step after ``t``)."""
    t_len, nb, nk, dk = q.shape
    dv = v.shape[-1]
    ys = np.zeros((t_len, nb, nk, dv))
    final = np.zeros((nb, nk, dk, dv))
    for b in range(nb):
        n = int(lengths[b])
        order = range(n - 1, -1, -1) if reverse else range(n)
        for h in range(nk):
            s = np.array(s0[b, h], np.float64)
            for t in order:
                if g is not None:
                    decay = np.exp(np.asarray(g[t, b, h], np.float64))
                    s = (decay[:, None] if np.ndim(decay) else decay) * s
                flag = (t + 1 < n and reset[t + 1, b]) if reverse else reset[t, b]
                if flag:
                    s = np.zeros_like(s)
                s = s + np.outer(k[t, b, h], v[t, b, h])
                ys[t, b, h] = s.T @ q[t, b, h]
            final[b, h] = s
    return final, ys


def _problem(t, decay, seed=0, nb=3, nk=2, dk=3, dv=2):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, t, nb, nk, dk))
    v = rng.normal(size=(t, nb, nk, dv))
    g = {
        "none": None,
        "head": -rng.uniform(0.0, 1.5, (t, nb, nk)),
        "key": -rng.uniform(0.0, 1.5, (t, nb, nk, dk)),
    }[decay]
    s0 = rng.normal(size=(nb, nk, dk, dv))
    reset = rng.uniform(size=(t, nb)) < 0.25
    lengths = np.array([t, max(t - 3, 1), 0])[:nb]
    return q, k, v, g, s0, reset, lengths


def _np_grads(args, w, ws, reset, lengths, reverse, eps=1e-6):
    """Central differences of ``sum(ys w) + sum(S ws)`` through the NumPy loop."""

    def loss(args):
        final, ys = np_linear_attention(*args, reset, lengths, reverse)
        return np.sum(ys * w) + np.sum(final * ws)

    grads = []
    for i, x in enumerate(args):
        if x is None:
            grads.append(None)
            continue
        grad = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            hi, lo = [list(args) for _ in range(2)]
            hi[i], lo[i] = x.copy(), x.copy()
            hi[i][idx] += eps
            lo[i][idx] -= eps
            grad[idx] = (loss(hi) - loss(lo)) / (2 * eps)
        grads.append(grad)
    return grads


def _all_modes(args, w, ws, reset, lengths, reverse, chunk):
    """Values and gradients of every mode, compiled once."""
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)

    @jax.jit
    def run(q, k, v, g, s0):
        out = {}
        for mode in MODES:

            def loss(q, k, v, g, s0, mode=mode):
                final, ys = js.recurrent.linear_attention(
                    q, k, v, g, initial_state=s0, reset=jnp.asarray(reset),
                    lengths=jnp.asarray(lengths), reverse=reverse, mode=mode, chunk=chunk,
                )  # fmt: skip
                return jnp.sum(ys * f32(w)) + jnp.sum(final * f32(ws)), (final, ys)

            argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
            out[mode] = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, g, s0)
        return out

    return run(*(f32(x) for x in args))


@pytest.mark.parametrize(
    "t, chunk, decay, reverse",
    [
        (7, 3, "none", False),
        (7, 3, "head", False),
        (7, 3, "key", False),
        (7, 3, "head", True),
        (7, 3, "key", True),
        (1, 64, "key", False),
    ],
)
def test_every_mode_equals_the_numpy_loop_in_values_and_gradients(t, chunk, decay, reverse):
    q, k, v, g, s0, reset, lengths = _problem(t, decay)
    rng = np.random.default_rng(1)
    w, ws = rng.normal(size=v.shape), rng.normal(size=s0.shape)
    args = (q, k, v, g, s0)
    want_final, want_ys = np_linear_attention(*args, reset, lengths, reverse)
    want_grads = [x for x in _np_grads(args, w, ws, reset, lengths, reverse) if x is not None]
    for mode, (grads, (final, ys)) in _all_modes(
        args, w, ws, reset, lengths, reverse, chunk
    ).items():
        np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5, err_msg=mode)
        assert not np.any(np.asarray(ys)[:, 2]), "a sequence of length 0 outputs zeros"
        np.testing.assert_array_equal(final[2], np.float32(s0[2]), err_msg="length 0 keeps S0")
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=mode)


def test_check_grads_in_every_mode():
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(5, 2, 1, 2)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(5, 2, 1, 2)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.2, 1.0, (5, 2, 1, 2)), jnp.float32)
    s0 = jnp.asarray(rng.normal(size=(2, 1, 2, 2)), jnp.float32)
    reset = jnp.asarray([[0, 0], [0, 1], [0, 0], [1, 0], [0, 0]], bool)
    for mode in MODES[:3]:
        f = jax.jit(
            lambda q, k, v, g, s0, mode=mode: js.recurrent.linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                reset=reset,
                lengths=jnp.array([5, 3]),
                mode=mode,
                chunk=2,
            )  # fmt: skip
        )
        fwd = ["fwd"] if mode == "chunked" else []  # every mode is plain autodiff
        check_grads(f, (q, k, v, g, s0), order=1, modes=[*fwd, "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("decay", ["head", "key"])
def test_modes_agree_on_long_strongly_decaying_sequences(decay):
    t, nb, nk, dk, dv = 300, 2, 2, 4, 3
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, t, nb, nk, dk))
    v = rng.normal(size=(t, nb, nk, dv))
    shape = (t, nb, nk) if decay == "head" else (t, nb, nk, dk)
    g = -rng.uniform(0.0, 30.0, shape) * (rng.uniform(size=shape) < 0.5)  # gates near 0 or 1
    reset = rng.uniform(size=(t, nb)) < 0.02
    lengths = np.array([t, 250])
    _, want = np_linear_attention(q, k, v, g, np.zeros((nb, nk, dk, dv)), reset, lengths, False)

    @jax.jit
    def run(q, k, v, g):
        out = {}
        for mode in MODES[:3]:

            def loss(q, k, v, g, mode=mode):
                _, ys = js.recurrent.linear_attention(
                    q, k, v, g, reset=jnp.asarray(reset), lengths=jnp.asarray(lengths), mode=mode
                )
                return jnp.sum(jnp.sin(ys)), ys

            out[mode] = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, g)
        return out

    out = run(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, g)))
    ref_grads = out["recurrent"][0]
    for mode, (grads, ys) in out.items():
        np.testing.assert_allclose(ys, want, rtol=1e-4, atol=1e-4, err_msg=mode)
        for got, ref in zip(grads, ref_grads):
            assert np.all(np.isfinite(got)), mode
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3, err_msg=mode)


def test_per_key_chunks_on_either_side_of_the_decayed_range():
    """A chunk decaying by more than e^-30 on one key takes the sub-chunked form, the
    others the decayed queries and keys: both match the loop, values and gradients."""
    q, k, v, g, s0, reset, lengths = _problem(12, "key", seed=4, nb=2)
    g = g * 0.1
    g[5, :, 1, 2] = -35.0  # the second chunk of 4 steps, one key
    want_final, want_ys = np_linear_attention(q, k, v, g, s0, reset, lengths, False)
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def loss(q, k, v, g, mode):
        final, ys = js.recurrent.linear_attention(
            q, k, v, g, initial_state=f32(s0), reset=jnp.asarray(reset),
            lengths=jnp.asarray(lengths), mode=mode, chunk=4,
        )  # fmt: skip
        return jnp.sum(jnp.sin(ys)) + jnp.sum(final), (final, ys)

    run = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
    args = [f32(x) for x in (q, k, v, g)]
    grads, (final, ys) = run(*args, "chunked")
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, run(*args, "recurrent")[0]):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(
    chunk=st.integers(1, 13),
    decay=st.sampled_from(["none", "head", "key"]),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_the_numpy_loop_for_any_chunk_length(chunk, decay, reverse, seed):
    q, k, v, g, s0, reset, lengths = _problem(12, decay, seed)
    want_final, want_ys = np_linear_attention(q, k, v, g, s0, reset, lengths, reverse)
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    final, ys = linear_attention(
        f32(q), f32(k), f32(v), f32(g), initial_state=f32(s0), reset=jnp.asarray(reset),
        lengths=jnp.asarray(lengths), reverse=reverse, mode="chunked", chunk=chunk,
    )  # fmt: skip
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5)


def test_batch_dims_any_number_and_padded_nan_stays_out():
    q, k, v, g, s0, reset, lengths = _problem(6, "head", nb=6)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    flat = linear_attention(f32(q), f32(k), f32(v), f32(g), mode="chunked", chunk=4)
    split = lambda x: f32(x).reshape(x.shape[:1] + (2, 3) + x.shape[2:])
    final, ys = linear_attention(split(q), split(k), split(v), split(g), mode="chunked", chunk=4)
    np.testing.assert_allclose(ys.reshape(flat[1].shape), flat[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.reshape(flat[0].shape), flat[0], rtol=1e-6, atol=1e-6)
    one = linear_attention(f32(q[:, 0]), f32(k[:, 0]), f32(v[:, 0]), f32(g[:, 0]))
    np.testing.assert_allclose(one[1], flat[1][:, 0], rtol=1e-5, atol=1e-5)

    lens = jnp.array([6, 2, 0, 4, 1, 3])
    pad = ~js.recurrent.sequence.valid_steps(lens, 6)
    poison = lambda x: jnp.where(pad.reshape(pad.shape + (1,) * (x.ndim - 2)), jnp.nan, f32(x))
    for mode in MODES[:3]:
        loss = lambda q, k, v, g, mode=mode: jnp.sum(
            js.recurrent.linear_attention(q, k, v, g, lengths=lens, mode=mode, chunk=4)[1]
        )
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*(poison(x) for x in (q, k, v, g)))
        for x in grads:
            assert np.all(np.isfinite(x)), mode
            assert not np.any(np.asarray(x)[np.asarray(pad)]), mode


def test_stepping_one_token_at_a_time_equals_one_call():
    q, k, v, g, s0, reset, lengths = _problem(5, "key", nb=2)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    q, k, v, g, s0 = (f32(x) for x in (q, k, v, g, s0))
    final, ys = linear_attention(q, k, v, g, initial_state=s0, mode="chunked", chunk=2)
    state, steps = s0, []
    for t in range(5):
        state, y = linear_attention(
            q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], initial_state=state,
            mode="recurrent",
        )  # fmt: skip
        steps.append(y[0])
    np.testing.assert_allclose(jnp.stack(steps), ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, final, rtol=1e-5, atol=1e-5)


def test_dtypes_and_empty_sequences():
    x = jnp.ones((4, 2, 3), jnp.bfloat16)
    final, ys = linear_attention(x, x, x, -jnp.ones((4, 2), jnp.bfloat16))
    assert final.dtype == ys.dtype == jnp.bfloat16 and final.shape == (2, 3, 3)
    s0 = jnp.ones((2, 3, 3))
    final, ys = js.recurrent.linear_attention(
        jnp.ones((0, 2, 3)), jnp.ones((0, 2, 3)), jnp.ones((0, 2, 3)), initial_state=s0
    )
    assert ys.shape == (0, 2, 3) and np.array_equal(final, s0)
    x = jnp.ones((3, 1, 2))
    grow, _ = js.recurrent.linear_attention(x, x, x, jnp.ones((3, 1)))
    keep, _ = js.recurrent.linear_attention(x, x, x, jnp.zeros((3, 1)))
    np.testing.assert_array_equal(grow, keep, err_msg="a positive log_decay is clipped to 0")


def test_float64_inputs_compute_in_float64():
    q, k, v, g, s0, reset, lengths = _problem(9, "key", nb=2)
    want_final, want_ys = np_linear_attention(q, k, v, g, s0, reset, lengths, False)
    with jax.enable_x64(True):
        for mode in MODES[:3]:
            final, ys = linear_attention(
                *(jnp.asarray(x) for x in (q, k, v, g)), initial_state=jnp.asarray(s0),
                reset=jnp.asarray(reset), lengths=jnp.asarray(lengths), mode=mode, chunk=4,
            )  # fmt: skip
            assert ys.dtype == final.dtype == jnp.float64
            np.testing.assert_allclose(ys, want_ys, rtol=1e-12, atol=1e-12, err_msg=mode)
            np.testing.assert_allclose(final, want_final, rtol=1e-12, atol=1e-12, err_msg=mode)


def test_errors_name_the_argument():
    q = jnp.ones((4, 2, 3, 5))  # T=4, B=2, K=3, Dk=5
    v = jnp.ones((4, 2, 3, 6))
    la = js.recurrent.linear_attention
    cases = [
        (lambda: la(q, q[..., :4], v), ValueError, "k: expected the shape of q"),
        (lambda: la(q, q, v[:, :1]), ValueError, "v: expected shape [4, 2, 3, 'Dv']"),
        (lambda: la(q.astype(int), q, v), TypeError, "q: expected a floating dtype"),
        (lambda: la(q[0, 0], q[0, 0], v[0, 0]), ValueError, "q: expected rank >= 3"),
        (lambda: la(q, q, v, jnp.ones((4, 2))), ValueError, "log_decay: expected shape [4, 2, 3]"),
        (lambda: la(q, q, v, initial_state=jnp.ones((2, 3, 5, 5))), ValueError,
         "initial_state: expected shape [2, 3, 5, 6]"),
        (lambda: la(q, q, v, reset=jnp.ones((4, 2))), TypeError, "reset: expected dtype bool"),
        (lambda: la(q, q, v, reset=jnp.ones((4, 3), bool)), ValueError,
         "reset: expected shape [4, 2]"),
        (lambda: la(q, q, v, lengths=jnp.array([1, 2, 3])), ValueError, "lengths: expected shape [2]"),
        (lambda: la(q, q, v, lengths=jnp.array([1, 5])), ValueError, "lengths: expected values in [0, 4]"),
        (lambda: la(q, q, v, mode="scan"), ValueError, "mode: expected one of"),
        (lambda: la(q, q, v, chunk=0), ValueError, "chunk: expected a positive int"),
        (lambda: la(q, q, v, reverse=1), TypeError, "reverse: expected a bool"),
    ]  # fmt: skip
    for call, exc, message in cases:
        with pytest.raises(exc) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
