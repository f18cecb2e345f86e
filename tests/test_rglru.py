"""The RG-LRU cell (``js.recurrent.RGLRU``) against a float64 NumPy loop of the paper's
equations, its stepping against its whole-sequence rollout, and its numerics at long T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxseq as js

RGLRU = js.recurrent.RGLRU
T, B, D, H = 7, 3, 3, 4


# ---- an independent reference: Griffin's equations, one sequence at a time ----------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_step(p, h, x, c=8.0):
    """One RG-LRU step in float64, written from the paper: ``a = sigmoid(Λ)^(c r)``."""
    z = x @ p["w_ih"] + p["b"]
    gr, gi, u = np.split(z, 3)
    r, i = _sigmoid(gr), _sigmoid(gi)
    a = _sigmoid(p["lam"]) ** (c * r)
    return a * h + np.sqrt(1.0 - a**2) * (i * u)


def ref_rollout(params, xs, h0=None, lengths=None, reset=None, reverse=False, c=8.0):
    """``(h_last [B, H], ys [T, B, H])``: each sequence on its own, in Python loops."""
    p = {k: np.asarray(v, np.float64) for k, v in params._asdict().items()}
    xs = np.asarray(xs, np.float64)
    t, b = xs.shape[:2]
    h_size = p["lam"].shape[0]
    h0 = np.zeros((b, h_size)) if h0 is None else np.asarray(h0, np.float64)
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    reset = np.zeros((t, b), bool) if reset is None else np.asarray(reset)
    ys, last = np.zeros((t, b, h_size)), np.zeros((b, h_size))
    for j in range(b):
        n, h = int(lengths[j]), h0[j].copy()
        order = range(n - 1, -1, -1) if reverse else range(n)
        for s in order:
            # a reset flag of step s empties the state before step s in forward time:
            # in reverse that is after step s, i.e. before step s - 1
            if (not reverse and reset[s, j]) or (reverse and s + 1 < n and reset[s + 1, j]):
                h = np.zeros_like(h)
            h = ref_step(p, h, xs[s, j], c)
            ys[s, j] = h
        last[j] = h
    return last, ys


def _params(seed=0, dtype=jnp.float32, scale=1.0, d=D, h=H):
    cell = RGLRU(h)
    p = cell.init(jax.random.key(seed), d, dtype)
    kb = jax.random.key(seed + 100)
    b = jax.random.normal(kb, p.b.shape, dtype)  # nonzero biases: every term is exercised
    return p._replace(w_ih=p.w_ih * scale, b=b)


def _inputs(seed=1, t=T):
    return jax.random.normal(jax.random.key(seed), (t, B, D))


LENGTHS = jnp.array([T, 3, 0])
RESET = jnp.zeros((T, B), bool).at[2, 0].set(True).at[4, 0].set(True).at[1, 1].set(True)


# ---- values against the reference ---------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kernel", ["auto", "scan"])
def test_matches_float64_reference(kernel, reverse):
    cell = RGLRU(H)
    params, xs = _params(), _inputs()
    h0 = jax.random.normal(jax.random.key(5), (B, H))
    carry, ys = js.rollout(
        cell, params, xs, js.recurrent.RNNCarry(h0), lengths=LENGTHS, reset=RESET,
        reverse=reverse, kernel=kernel,
    )  # fmt: skip
    last, want = ref_rollout(params, xs, h0, LENGTHS, RESET, reverse)
    np.testing.assert_allclose(ys, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(carry.h, last, atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(ys)[:, 2] == 0)  # length 0: nothing emitted
    np.testing.assert_array_equal(carry.h[2], h0[2])  # ... and the state passes through


def test_paper_cell_is_the_identity_input_projection():
    """With ``D = H``, ``W_u = I`` and ``b_u = 0`` the cell is the paper's RG-LRU on ``x``."""
    cell = RGLRU(H)
    p = cell.init(jax.random.key(0), H)
    p = p._replace(w_ih=p.w_ih.at[:, 2 * H :].set(jnp.eye(H)), b=jnp.zeros(3 * H))
    xs = jax.random.normal(jax.random.key(1), (T, B, H))
    _, ys = js.rollout(cell, p, xs)
    w_a, w_x = np.asarray(p.w_ih[:, :H], np.float64), np.asarray(p.w_ih[:, H : 2 * H], np.float64)
    lam = np.asarray(p.lam, np.float64)
    h = np.zeros((B, H))
    for t in range(T):  # Griffin, eqs. (1)-(4), gates from the recurrence's own input x
        x = np.asarray(xs[t], np.float64)
        r, i = _sigmoid(x @ w_a), _sigmoid(x @ w_x)
        a = _sigmoid(lam) ** (8 * r)
        h = a * h + np.sqrt(1 - a**2) * (i * x)
        np.testing.assert_allclose(ys[t], h, atol=2e-5, rtol=1e-5)


def test_step_by_step_equals_rollout():
    cell = RGLRU(H)
    params, xs = _params(), _inputs()
    carry = cell.initial_carry((B,))
    steps = []
    for t in range(T):
        carry, y = cell.step(params, carry, xs[t])
        steps.append(y)
    last, ys = js.rollout(cell, params, xs)
    np.testing.assert_allclose(jnp.stack(steps), ys, atol=1e-6)
    np.testing.assert_allclose(carry.h, last.h, atol=1e-6)


# ---- the whole-sequence paths against stepping: values and gradients ------------------------


def _loss(cell, kernel, reverse, lengths=LENGTHS, reset=RESET):
    w = jax.random.normal(jax.random.key(9), (T, B, H))

    def f(params, xs, h0):
        carry, ys = js.rollout(
            cell, params, xs, js.recurrent.RNNCarry(h0), lengths=lengths, reset=reset,
            reverse=reverse, kernel=kernel,
        )  # fmt: skip
        return jnp.sum(ys * w) + jnp.sum(carry.h**2)

    return f


@pytest.mark.parametrize(
    "mode, reverse",
    [("sequential", False), ("sequential", True), ("associative", True), ("chunked", False)],
)
def test_parallel_equals_scan_values_and_gradients(mode, reverse):
    cell = RGLRU(H, mode=mode, chunk=3)
    args = (_params(), _inputs(), jax.random.normal(jax.random.key(5), (B, H)))
    v_par, g_par = jax.value_and_grad(_loss(cell, "auto", reverse), argnums=(0, 1, 2))(*args)
    v_scan, g_scan = jax.value_and_grad(_loss(cell, "scan", reverse), argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(v_par, v_scan, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_par), jax.tree.leaves(g_scan), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@jax.jit
def _both_paths(lengths, reset):
    """The forward and reverse rollouts, whole-sequence and stepped, in one program."""
    cell, params, xs = RGLRU(H), _params(), _inputs()
    out = []
    for reverse in (False, True):
        for kernel in ("auto", "scan"):
            kw = dict(lengths=lengths, reset=reset, reverse=reverse, kernel=kernel)
            out.append(js.rollout(cell, params, xs, **kw)[1])
    return out


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, T), min_size=B, max_size=B),
    flags=st.lists(st.booleans(), min_size=T * B, max_size=T * B),
)
def test_rollout_equals_stepping_for_any_padding_and_resets(lengths, flags):
    fwd, fwd_scan, bwd, bwd_scan = _both_paths(jnp.array(lengths), jnp.array(flags).reshape(T, B))
    np.testing.assert_allclose(fwd, fwd_scan, atol=1e-5)
    np.testing.assert_allclose(bwd, bwd_scan, atol=1e-5)


def test_float64_and_check_grads_tiny():
    with jax.enable_x64(True):
        cell = RGLRU(2, mode="sequential")
        params = cell.init(jax.random.key(0), 2, jnp.float64)
        xs = jax.random.normal(jax.random.key(1), (4, 2, 2), jnp.float64)
        reset = jnp.zeros((4, 2), bool).at[2, 1].set(True)

        def f(params, xs):  # not jitted: a jit hides forward mode from the kernel choice
            _, ys = js.rollout(cell, params, xs, lengths=jnp.array([4, 3]), reset=reset)
            return ys

        ys = f(params, xs)  # float64 params: float64 arithmetic, to the reference's precision
        assert ys.dtype == jnp.float64
        _, want = ref_rollout(params, xs, lengths=[4, 3], reset=reset)
        np.testing.assert_allclose(ys, want, rtol=1e-12, atol=1e-12)
        check_grads(f, (params, xs), order=1, modes=["rev"])
        check_grads(f, (params, xs), order=1, modes=["fwd"])  # the scan path (jvp)


# ---- long sequences, saturated gates --------------------------------------------------------


def _saturated(dtype, t=8192):
    """Inputs and weights of +-1 and +-15 (D = 2): every gate pre-activation is -30, 0 or 30."""
    cell = RGLRU(8)
    p = cell.init(jax.random.key(0), 2, jnp.float32)
    signs = jnp.sign(jax.random.normal(jax.random.key(3), p.w_ih.shape))
    p = p._replace(w_ih=15.0 * signs)
    xs = jnp.sign(jax.random.normal(jax.random.key(4), (t, 2, 2)))
    return cell, jax.tree.map(lambda a: a.astype(dtype), p), xs.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_long_sequence_saturated_gates_is_finite(dtype):
    cell, params, xs = _saturated(dtype)

    def loss(params, xs):
        _, ys = js.rollout(cell, params, xs)
        return jnp.mean(ys.astype(jnp.float32) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
    assert np.isfinite(value)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    if dtype == jnp.float32:
        _, ys = js.rollout(cell, params, xs)
        _, want = ref_rollout(params, xs)
        np.testing.assert_allclose(ys, want, atol=1e-3 * np.abs(want).max(), rtol=1e-3)


def test_closed_recurrence_gate_keeps_the_state_and_finite_gradients():
    """``r_t = 0`` exactly (pre-activation -200): ``a_t = 1``, the state is kept and the
    gradient of ``sqrt(1 - a^2)`` at 0 is capped instead of infinite."""
    cell = RGLRU(H)
    params = _params()
    params = params._replace(b=params.b.at[:H].set(-200.0))
    h0 = jax.random.normal(jax.random.key(5), (B, H))

    def loss(params, xs):
        _, ys = js.rollout(cell, params, xs, js.recurrent.RNNCarry(h0))
        return jnp.sum(ys**2)

    _, ys = js.rollout(cell, params, _inputs(), js.recurrent.RNNCarry(h0))
    np.testing.assert_array_equal(ys, jnp.broadcast_to(h0, ys.shape))
    for g in jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(params, _inputs())):
        assert np.all(np.isfinite(g))


# ---- inside layers and models -----------------------------------------------------------------


def test_inside_stack_and_bidirectional():
    f, g = RGLRU(H), RGLRU(5)
    stack = js.Stack([js.Bidirectional(f, RGLRU(H)), g])
    params = stack.init(jax.random.key(0), D)
    xs = _inputs()
    _, ys = js.rollout(stack, params, xs, lengths=LENGTHS)
    assert ys.shape == (T, B, 5)
    (pf, pb), pg = params[0], params[1]
    _, yf = ref_rollout(pf, xs, lengths=LENGTHS)
    _, yb = ref_rollout(pb, xs, lengths=LENGTHS, reverse=True)
    _, want = ref_rollout(pg, np.concatenate([yf, yb], -1), lengths=LENGTHS)
    np.testing.assert_allclose(ys, want, atol=5e-5, rtol=1e-4)


def test_language_model_with_rglru_cells_samples_what_its_forward_predicts():
    lm = js.models.char_lm(11, cell="rglru", num_layers=2, hidden_size=8, embedding_size=4)
    params = lm.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (5, 2), 0, 11)
    _, logits = lm.apply(params, None, tokens)
    assert logits.shape == (5, 2, 11) and np.all(np.isfinite(logits))
    # greedy generation (one token at a time, the cells' step) = argmax of the whole-sequence forward
    prime = tokens[:3]
    gen = js.decoding.sample(None, lm, params, prime, 4, greedy=True)
    _, logits = lm.apply(params, None, jnp.concatenate([prime, gen[:-1]]))
    np.testing.assert_array_equal(jnp.argmax(logits[2:], -1), gen)


def test_flax_modules_run_the_rglru():
    jf = pytest.importorskip("jaxseq.flax")
    from flax import nnx

    xs = jnp.moveaxis(_inputs(), 0, 1)  # [B, T, D], Flax's default layout
    lengths = jnp.array([T, 3, 1])
    module = jf.linen.RNN(RGLRU(H))
    variables = module.init(jax.random.key(0), xs, seq_lengths=lengths)
    ys = module.apply(variables, xs, seq_lengths=lengths)
    params = variables["params"]["cell"]
    _, want = ref_rollout(params, _inputs(), lengths=lengths)
    np.testing.assert_allclose(jnp.moveaxis(ys, 1, 0), want, atol=2e-5, rtol=1e-5)
    rnn = jf.nnx.RNN(RGLRU(H), D, rngs=nnx.Rngs(0))
    assert rnn(xs, seq_lengths=lengths).shape == (B, T, H)


# ---- initialisation and validation -----------------------------------------------------------


def test_init_puts_the_decay_in_the_papers_range():
    params = RGLRU(2000).init(jax.random.key(0), 3)
    a = _sigmoid(np.asarray(params.lam, np.float64)) ** 8
    assert a.min() >= 0.9 - 1e-5 and a.max() <= 0.999 + 1e-5
    assert a.min() < 0.905 and a.max() > 0.994  # uniform over the range, not a point
    assert abs(a.mean() - 0.9495) < 0.005
    b = RGLRU(100, a_min=0.5, a_max=0.6, c=2.0).init(jax.random.key(0), 3).lam
    a = _sigmoid(np.asarray(b, np.float64)) ** 2
    assert a.min() >= 0.5 - 1e-5 and a.max() <= 0.6 + 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": 4, "c": 0}, "c: expected a positive"),
        ({"hidden_size": 4, "a_min": 0.99, "a_max": 0.9}, "a_min, a_max"),
        ({"hidden_size": 4, "a_max": 1.0}, "a_max"),
        ({"hidden_size": 4, "mode": "fast"}, "mode"),
        ({"hidden_size": 4, "chunk": 0}, "chunk"),
    ],
)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RGLRU(**kwargs)


def test_bad_inputs_raise_naming_the_argument():
    cell = RGLRU(H)
    params = cell.init(jax.random.key(0), D)
    xs = _inputs()
    with pytest.raises(TypeError, match="params: expected RGLRUParams"):
        js.rollout(cell, js.MinGRU(H).init(jax.random.key(0), D), xs)
    with pytest.raises(ValueError, match=r"params.lam: expected shape \[4\]"):
        js.rollout(cell, params._replace(lam=jnp.zeros(3)), xs)
    with pytest.raises(ValueError, match=r"params.w_ih: expected shape \[D, 12\]"):
        js.rollout(cell, params._replace(w_ih=jnp.zeros((D, 8))), xs)
    with pytest.raises(TypeError, match="params.lam"):
        js.rollout(cell, params._replace(lam=jnp.zeros(H, jnp.int32)), xs)
    with pytest.raises(ValueError, match="xs: expected last dim D=3"):
        js.rollout(cell, params, jnp.zeros((T, B, 5)))
    with pytest.raises(ValueError, match="carry.h: expected shape"):
        cell.step(params, cell.initial_carry((2,)), jnp.zeros((B, D)))
    with pytest.raises(TypeError, match="x"):
        cell.step(params, cell.initial_carry((B,)), jnp.zeros((B, D), jnp.int32))
    with pytest.raises(ValueError, match="input_size: expected a positive int"):
        cell.init(jax.random.key(0), 2.5)
