"""js.linear_recurrence (every mode) and the minGRU/minLSTM cells built on it.

References written here: a float64 NumPy loop over the steps with the
rollout semantics (resets, lengths, reverse), its gradients by central
differences, and the cells stepped one token at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxseq as js
from jaxseq import data
from jaxseq import training as train
from jaxseq.training import losses

MODES = ("sequential", "associative", "chunked")


def np_linear(a, b, h0, reset, lengths, reverse):
    """``(h_last, hs)`` of ``h_t = a_t h_{t-1} + b_t``, float64, one sequence at a time."""
    nb = a.shape[1]
    hs, h_last = np.zeros_like(a), h0.copy()
    for j in range(nb):
        n = int(lengths[j])
        h = h0[j].copy()
        for s in range(n - 1, -1, -1) if reverse else range(n):
            # reset[s] marks s as an episode start; in reverse the boundary is crossed at s + 1
            if (reset[s + 1, j] if s + 1 < n else False) if reverse else reset[s, j]:
                h = np.zeros_like(h)
            h = a[s, j] * h + b[s, j]
            hs[s, j] = h
        h_last[j] = h
    return h_last, hs


def np_loss(a, b, h0, w, wl, reset, lengths, reverse):
    h_last, hs = np_linear(a, b, h0, reset, lengths, reverse)
    return float(np.sum(hs * w) + np.sum(h_last * wl))


def np_grads(args, *rest, eps=1e-6):
    """Central differences of :func:`np_loss` with respect to ``a``, ``b``, ``h0``."""
    out = []
    for i in range(3):
        g = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            hi = [x.copy() for x in args]
            lo = [x.copy() for x in args]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            g[idx] = (np_loss(*hi, *rest) - np_loss(*lo, *rest)) / (2 * eps)
        out.append(g)
    return out


def _problem(t, nb=3, h=2, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 1.1, (t, nb, h))
    b = rng.normal(size=(t, nb, h))
    h0 = rng.normal(size=(nb, h))
    w = rng.normal(size=(t, nb, h))
    wl = rng.normal(size=(nb, h))
    reset = rng.uniform(size=(t, nb)) < 0.25
    lengths = np.minimum(np.array([t, max(t - 3, 1), 0])[:nb], t)
    return a, b, h0, w, wl, reset, lengths


@pytest.mark.parametrize("t, chunk", [(7, 3), (1, None)])
@pytest.mark.parametrize("reverse", [False, True])
def test_every_mode_equals_the_numpy_loop_in_values_and_gradients(t, chunk, reverse):
    a, b, h0, w, wl, reset, lengths = _problem(t)
    want_last, want_hs = np_linear(a, b, h0, reset, lengths, reverse)
    want_grads = np_grads((a, b, h0), w, wl, reset, lengths, reverse)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    for mode in MODES:

        @jax.jit
        def run(a, b, h0, mode=mode):
            def loss(a, b, h0):
                h_last, hs = js.linear_recurrence(
                    a, b, h0, reset=jnp.asarray(reset), lengths=jnp.asarray(lengths),
                    reverse=reverse, mode=mode, chunk=chunk,
                )  # fmt: skip
                return jnp.sum(hs * f32(w)) + jnp.sum(h_last * f32(wl)), (h_last, hs)

            return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(a, b, h0)

        grads, (h_last, hs) = run(f32(a), f32(b), f32(h0))
        np.testing.assert_allclose(hs, want_hs, rtol=1e-5, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(h_last, want_last, rtol=1e-5, atol=1e-5, err_msg=mode)
        assert not np.any(np.asarray(hs)[:, 2]), "padded steps output zeros"
        for g, want, name in zip(grads, want_grads, ("a", "b", "h0")):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5, err_msg=f"{mode} d{name}")


def test_check_grads_in_every_mode():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.uniform(0.3, 0.9, (5, 2, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(5, 2, 2)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
    reset = jnp.asarray([[0, 0], [0, 1], [0, 0], [1, 0], [0, 0]], bool)
    for mode in MODES:
        f = jax.jit(
            lambda a, b, h0, mode=mode: js.linear_recurrence(
                a, b, h0, reset=reset, lengths=jnp.array([5, 3]), mode=mode, chunk=2
            )[1]
        )
        # the custom-VJP modes have no forward mode; the associative one has both
        check_grads(f, (a, b, h0), order=1, modes=["rev"] if mode != "associative" else ["fwd", "rev"], atol=1e-2, rtol=1e-2)  # fmt: skip


def test_long_sequence_with_gates_near_zero_stays_finite_and_exact():
    # Gate products underflow after a few dozen steps; a few gates near 1 keep memories.
    rng = np.random.default_rng(2)
    t = 4096
    a = rng.uniform(1e-4, 1e-2, (t, 1, 3))
    a[rng.uniform(size=a.shape) < 0.02] = 0.9999
    b = rng.normal(size=(t, 1, 3)) * 1e-3
    h0 = np.full((1, 3), 5.0)
    no_reset = np.zeros((t, 1), bool)
    want_last, want = np_linear(a, b, h0, no_reset, [t], False)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    for mode in ("sequential", "chunked"):  # the associative mode composes the same way
        h_last, hs = js.linear_recurrence(f32(a), f32(b), f32(h0), mode=mode)
        assert np.all(np.isfinite(hs)), mode
        np.testing.assert_allclose(hs, want, rtol=1e-4, atol=1e-9, err_msg=mode)
        np.testing.assert_allclose(h_last, want_last, rtol=1e-4, atol=1e-9, err_msg=mode)


def test_auto_rule_and_chunk_choice():
    from jaxseq.recurrent import linear

    assert linear.auto_mode(16384, "cpu") == "sequential"
    assert linear.auto_mode(100, "gpu") == "chunked" and linear.auto_mode(64, "tpu") == "sequential"
    for t in (1, 2, 7, 100, 997, 4096, 16384):
        c = linear.auto_chunk(t)
        assert 1 <= c <= t and c <= 2 * np.sqrt(t) + 1


def test_linear_recurrence_errors_name_the_argument():
    a = jnp.ones((4, 2, 3))
    with pytest.raises(
        ValueError, match=r"b: expected the shape of a float32\[4, 2, 3\].*got float32\[4, 2, 2\]"
    ):
        js.linear_recurrence(a, jnp.ones((4, 2, 2)))
    with pytest.raises(TypeError, match=r"a: expected a floating dtype, got int32\[4, 2, 3\]"):
        js.linear_recurrence(jnp.ones((4, 2, 3), jnp.int32), a)
    with pytest.raises(ValueError, match=r"a: expected rank >= 2 \[T, \*B, H\], got rank 1"):
        js.linear_recurrence(jnp.ones(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"h0: expected shape \[2, 3\].*got float32\[3\]"):
        js.linear_recurrence(a, a, jnp.ones(3))
    with pytest.raises(ValueError, match=r"reset: expected shape \[4, 2\].*got bool\[4\]"):
        js.linear_recurrence(a, a, reset=jnp.ones(4, bool))
    with pytest.raises(TypeError, match=r"reset: expected dtype bool, got float32"):
        js.linear_recurrence(a, a, reset=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"lengths: expected shape \[2\].*got int32\[3\]"):
        js.linear_recurrence(a, a, lengths=jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 4\] \(T=4\), got 5"):
        js.linear_recurrence(a, a, lengths=jnp.array([5, 1]))
    with pytest.raises(ValueError, match=r"mode: expected one of .*'chunked'\], got 'fast'"):
        js.linear_recurrence(a, a, mode="fast")
    with pytest.raises(ValueError, match=r"chunk: expected a positive int, got 0"):
        js.linear_recurrence(a, a, mode="chunked", chunk=0)


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize("cls, mode", [(js.MinGRU, "chunked"), (js.MinLSTM, "auto")])
def test_cell_parallel_rollout_equals_stepping_with_lengths_resets_reverse(cls, mode, key):
    cell = cls(4, mode=mode, chunk=3)
    params = cell.init(key, 3)
    t, nb = 8, 3
    xs = jax.random.normal(jax.random.fold_in(key, 1), (t, nb, 3))
    xs = xs.at[6:, 1].set(jnp.nan)  # padding: never used
    lengths = jnp.array([8, 6, 0])
    reset = jax.random.uniform(jax.random.fold_in(key, 2), (t, nb)) < 0.3
    h0 = jax.random.normal(jax.random.fold_in(key, 3), (nb, 4))
    carry = cell.initial_carry((nb,))._replace(h=h0)

    @jax.jit
    def both(params, xs):
        out = []
        for reverse in (False, True):
            for kernel in ("auto", "scan"):

                def loss(p, x, reverse=reverse, kernel=kernel):
                    c, ys = js.rollout(
                        cell,
                        p,
                        x,
                        carry,
                        lengths=lengths,
                        reset=reset,
                        reverse=reverse,
                        kernel=kernel,
                    )
                    return jnp.sum(jnp.sin(ys)) + jnp.sum(c.h**2), (c.h, ys)

                out.append(jax.grad(loss, argnums=(0, 1), has_aux=True)(params, xs))
        return out

    out = both(params, xs)
    for (gp, (cp, yp)), (gs, (cs, ys)) in [(out[0], out[1]), (out[2], out[3])]:
        np.testing.assert_allclose(yp, ys, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cp, cs, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gs)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(yp)[:, 2]) and not np.any(np.asarray(yp)[6:, 1])
        assert np.all(np.asarray(gp[1])[6:, 1] == 0)  # no gradient reaches padded inputs
        np.testing.assert_array_equal(np.asarray(cp)[2], np.asarray(h0)[2])  # length 0: h0 back


def test_cell_step_matches_the_paper_equations(key):
    x = jax.random.normal(key, (2, 3))
    h = jax.random.normal(jax.random.fold_in(key, 1), (2, 4))
    sig = lambda v: 1 / (1 + np.exp(-v))
    g = lambda v: np.where(v >= 0, v + 0.5, sig(v))
    gru = js.MinGRU(4)
    p = gru.init(key, 3)
    zk, hk = np.split(
        np.asarray(x, np.float64) @ np.asarray(p.w_ih, np.float64) + np.asarray(p.b), 2, -1
    )
    want = (1 - sig(zk)) * np.asarray(h) + sig(zk) * g(hk)
    np.testing.assert_allclose(
        gru.step(p, js.recurrent.RNNCarry(h), x)[1], want, rtol=1e-5, atol=1e-6
    )
    lstm = js.MinLSTM(4, candidate="identity")
    p = lstm.init(key, 3)
    f, i, hk = np.split(
        np.asarray(x, np.float64) @ np.asarray(p.w_ih, np.float64) + np.asarray(p.b), 3, -1
    )
    want = sig(f) / (sig(f) + sig(i)) * np.asarray(h) + sig(i) / (sig(f) + sig(i)) * hk
    np.testing.assert_allclose(
        lstm.step(p, js.recurrent.RNNCarry(h), x)[1], want, rtol=1e-5, atol=1e-6
    )


def test_cell_errors_name_the_argument(key):
    cell = js.MinGRU(4)
    params = cell.init(key, 3)
    xs = jnp.ones((5, 2, 3))
    with pytest.raises(ValueError, match=r"xs: expected last dim D=3.*got float32\[5, 2, 2\]"):
        js.rollout(cell, params, jnp.ones((5, 2, 2)))
    with pytest.raises(
        ValueError, match=r"params.w_ih: expected shape \[D, 8\].*got float32\[3, 12\]"
    ):
        js.rollout(cell, js.recurrent.MinGRUParams(jnp.ones((3, 12)), jnp.ones(12)), xs)
    with pytest.raises(
        TypeError, match=r"params: expected MinGRUParams for MinGRU, got MinLSTMParams"
    ):
        js.rollout(cell, js.MinLSTM(4).init(key, 3), xs)
    with pytest.raises(ValueError, match=r"carry.h: expected shape \[2, 4\].*got float32\[2, 5\]"):
        js.rollout(cell, params, xs, js.recurrent.RNNCarry(jnp.ones((2, 5))))
    with pytest.raises(ValueError, match=r"lengths: expected shape \[2\]"):
        js.rollout(cell, params, xs, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"kernel: expected one of"):
        js.rollout(cell, params, xs, kernel="cuda")
    with pytest.raises(
        ValueError, match=r"candidate: expected one of \['g', 'identity', 'tanh'\], got 'relu'"
    ):
        js.MinLSTM(4, candidate="relu")
    with pytest.raises(ValueError, match=r"mode: expected one of"):
        js.MinGRU(4, mode="parallel")


# --------------------------------------------------------------------------- models


def test_trained_mingru_lm_steps_one_token_at_a_time_as_its_parallel_forward(key):
    model = js.models.char_lm(7, cell="mingru", num_layers=1, hidden_size=8, embedding_size=5)
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (4 * 41,), 0, 7))
    bt = data.StreamBatcher(ids, 4, 10)
    opt = train.make_optimizer("adam", 3e-2)
    state = train.init_state(model.init(key), opt, key, model.initial_carry((4,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt)
    state, _ = train.fit(step, state, bt, num_steps=4)
    params = state.params
    tokens = jnp.asarray(bt.streams[:8])

    @jax.jit
    def stepped(params, tokens):
        def body(c, tok):
            c, logits = model.apply(params, c, tok[None])
            return c, logits[0]

        return jax.lax.scan(body, model.initial_carry((4,)), tokens)

    apply = jax.jit(model.apply)
    carry_par, logits_par = apply(params, None, tokens)
    carry_seq, logits_seq = stepped(params, tokens)
    np.testing.assert_allclose(logits_seq, logits_par, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(carry_seq), jax.tree_util.tree_leaves(carry_par)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # greedy generation (js.decoding, one token at a time) = argmax of the parallel forward
    prime = tokens[:3]
    gen = js.decoding.sample(key, model, params, prime, 6, greedy=True)
    _, logits = apply(params, None, jnp.concatenate([prime, gen[:-1]]))  # 8 tokens: no retrace
    np.testing.assert_array_equal(jnp.argmax(logits[2:], -1), gen)


def test_tbptt_with_mingru_carries_the_state_as_one_long_rollout(key):
    model = js.models.char_lm(7, cell="minlstm", num_layers=2, hidden_size=8, embedding_size=5)
    params = model.init(key)
    b, k = 3, 8
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (b * 27,), 0, 7))
    bt = data.StreamBatcher(ids, b, k)  # 26 steps per stream: chunks 8, 8, 8, 2
    streams = jnp.asarray(bt.streams)
    carry_full, logits = jax.jit(lambda p, x: model.apply(p, None, x[:-1]))(params, streams)
    per_tok = np.asarray(losses.token_cross_entropy(logits, streams[1:]))
    opt = train.make_optimizer("sgd", 1e-30, max_norm=None)  # updates vanish in float32
    state = train.init_state(params, opt, key, model.initial_carry((b,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt)
    for i in range(bt.num_chunks):
        state, m = step(state, bt.at_step(i))
        lo, hi = i * k, min((i + 1) * k, 26)
        np.testing.assert_allclose(float(m["loss"]), per_tok[lo:hi].mean(), rtol=2e-5)
    for a, c in zip(jax.tree_util.tree_leaves(state.carry), jax.tree_util.tree_leaves(carry_full)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_models_take_the_new_cells(key):
    tg = js.models.tagger(3, input_size=2, cell="minlstm", hidden_size=4, bidirectional=True)
    p = tg.init(key)
    xs = jax.random.normal(key, (5, 2, 2))
    assert tg.apply(p, xs, lengths=jnp.array([5, 2])).shape == (5, 2, 3)
    clf = js.models.classifier(3, input_size=2, cell="mingru", hidden_size=4)
    assert clf.apply(clf.init(key), xs, lengths=jnp.array([5, 2])).shape == (2, 3)


def test_parallel_scan_benchmark_smoke(tmp_path):
    from benchmarks import parallel_scan

    parallel_scan.main(
        [
            "--quick",
            "--T",
            "5",
            "-B",
            "2",
            "-H",
            "3",
            "--modes",
            "scan_autodiff,chunked,auto",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    for name in ("parallel_scan.json", "parallel_scan.md", "step_time_vs_T.png"):
        assert (tmp_path / name).stat().st_size > 0
