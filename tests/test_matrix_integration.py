"""The matrix-state and exponential-gated cells (mLSTM, sLSTM, RG-LRU) in the rest of
the library: the models, js.Stack/js.Bidirectional, sampling and beam search, the
Flax modules, and the xLSTM stack of mLSTM and sLSTM blocks.

References here step each cell with its own ``step`` in a Python loop, one
sequence at a time (no rollout, no scan), so they share nothing with the
whole-sequence forms they check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

NEW_CELLS = ("rglru", "mlstm", "slstm")
V, E, H = 7, 4, 8


def _cell(name):
    return js.models.CELLS[name](H)


def _loop(cell, params, xs, reverse=False):
    """``cell.step`` over ``xs: [T, D]`` (one sequence), reversed when asked -> ``[T, H]``."""
    carry = cell.initial_carry(())
    order = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    ys = [None] * xs.shape[0]
    step = jax.jit(cell.step)  # one token at a time, compiled once per cell and shapes
    for t in order:
        carry, ys[t] = step(params, carry, xs[t])
    return carry, jnp.stack(ys) if ys else jnp.zeros((0, cell.output_size))


def _padded(ys, t):
    return jnp.concatenate([ys, jnp.zeros((t - ys.shape[0],) + ys.shape[1:], ys.dtype)])


@pytest.mark.parametrize("name", NEW_CELLS)
def test_lm_trains_and_generation_steps_equal_the_rollout(name):
    assert name in js.models.CELLS
    lm = js.models.char_lm(V, cell=name, num_layers=1, hidden_size=H, embedding_size=E)
    params = lm.init(jax.random.key(0))
    # truncated BPTT through the library's train step: the carry goes on from chunk to chunk
    batcher = js.data.StreamBatcher(np.arange(400) % V, 4, 10)
    opt = js.make_optimizer("adam", 5e-2)
    step = js.make_train_step(js.lm_loss_fn(lm), opt)
    state, losses = js.init_state(params, opt, jax.random.key(1), lm.initial_carry((4,))), []
    for i in range(batcher.num_chunks):
        state, metrics = step(state, batcher.chunk(i))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05
    params = state.params

    prime, n = jnp.array([[1, 2], [3, 4], [5, 6]]), 5
    ids = js.decoding.sample(None, lm, params, prime, n, greedy=True)
    whole = jnp.concatenate([prime, ids], 0)

    @jax.jit
    def both(params, tokens):  # the whole sequence, and the carry threaded one token at a time
        stepped = jax.lax.scan(
            lambda c, t: lm.apply(params, c, t[None]), lm.initial_carry((2,)), tokens
        )
        return lm.apply(params, None, tokens), stepped

    (carry, logits), (carry_s, logits_s) = both(params, whole)
    assert jax.tree_util.tree_structure(carry) == jax.tree_util.tree_structure(
        lm.initial_carry((2,))
    )
    # each generated token is the argmax of the whole-sequence logits one step before
    np.testing.assert_array_equal(jnp.argmax(logits[prime.shape[0] - 1 : -1], -1), ids)
    np.testing.assert_allclose(logits_s[:, 0], logits, rtol=1e-5, atol=2e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5), carry_s, carry
    )
    assert js.decoding.sample(jax.random.key(4), lm, params, prime, n, top_k=3).shape == (n, 2)
    if name == "mlstm":  # beams tile and gather carries [B, K, Dk, Dv] as well as [B, H]
        beam = js.decoding.lm_beam_search(lm, params, prime, n, beam_size=1)
        np.testing.assert_array_equal(beam.tokens[..., 0], ids)


@pytest.mark.parametrize("name", NEW_CELLS)
def test_stack_and_bidirectional_with_lengths(name):
    cell = _cell(name)
    stack = js.Stack([cell, js.Bidirectional(cell)])
    params = stack.init(jax.random.key(1), 3)
    xs = jax.random.normal(jax.random.key(2), (6, 3, 3))
    lengths = jnp.array([6, 2, 0])
    carries, ys = jax.jit(lambda p, x, n: js.rollout(stack, p, x, lengths=n))(params, xs, lengths)
    assert ys.shape == (6, 3, 2 * H)
    for b, n in enumerate(lengths.tolist()):
        c0, h = _loop(cell, params[0], xs[:n, b])
        cf, yf = _loop(cell, params[1].forward, h)
        cb, yb = _loop(cell, params[1].backward, h, reverse=True)
        want = _padded(jnp.concatenate([yf, yb], -1), 6)
        np.testing.assert_allclose(ys[:, b], want, atol=2e-5)
        for got, ref in ((carries[0], c0), (carries[1].forward, cf), (carries[1].backward, cb)):
            jax.tree_util.tree_map(
                lambda g, r, b=b: np.testing.assert_allclose(g[b], r, atol=2e-5), got, ref
            )


@pytest.mark.parametrize("name", ("mlstm", "slstm"))  # the RG-LRU: in test_rglru.py
def test_flax_modules_equal_the_functional_rollout(name):
    jf = pytest.importorskip("jaxseq.flax")
    from flax import nnx

    cell = _cell(name)
    x = jax.random.normal(jax.random.key(5), (2, 5, 3))  # [B, T, D]
    rnn = jf.linen.RNN(cell, return_carry=True)
    variables = rnn.init(jax.random.key(6), x)
    params = variables["params"]["cell"]
    carry, ys = rnn.apply(variables, x)
    want_carry, want = js.rollout(cell, params, x, time_major=False)
    np.testing.assert_allclose(ys, want, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), carry, want_carry
    )
    lengths = jnp.array([5, 3])  # Flax's semantics: the carry after the last valid step
    carry, ys = rnn.apply(variables, x, seq_lengths=lengths)
    want_carry, _ = js.rollout(cell, params, x, lengths=lengths, time_major=False)
    np.testing.assert_allclose(ys[1, :3], want[1, :3], atol=1e-6)  # the valid steps
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), carry, want_carry
    )
    module = jf.nnx.RNN(cell, 3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        module(x), js.rollout(cell, module.param_values(), x, time_major=False)[1], atol=1e-6
    )


def test_xlstm_stack_tagger_and_seq2seq_with_an_mlstm_decoder():
    stack = js.models.xlstm_stack(H, 9, num_heads=2)
    kinds = "".join(type(layer).__name__[0] for layer in stack.layers)
    assert kinds == "MSMMMMMMM" and stack.residual  # xLSTM[7:1]: an sLSTM at 1 of every 8
    assert [type(c).__name__ for c in js.models.char_lm(V, cell="xlstm").stack.layers] == [
        "MLSTM",
        "SLSTM",
    ]
    with pytest.raises(ValueError, match="slstm_at"):
        js.models.xlstm_stack(H, 2, slstm_at=(2,))
    tokens = jnp.asarray(np.arange(15).reshape(5, 3) % V, jnp.int32)
    tg = js.models.tagger(3, vocab_size=V, embedding_size=E, cell="xlstm", hidden_size=H,
                          num_layers=2, num_heads=2, bidirectional=False)  # fmt: skip
    assert [type(layer).__name__ for layer in tg.stack.layers] == ["MLSTM", "SLSTM"]
    run = jax.jit(lambda p, t, n: tg.apply(p, t, lengths=n))
    tags = run(tg.init(jax.random.key(0)), tokens, jnp.array([5, 3, 1]))
    assert tags.shape == (5, 3, 3) and bool(jnp.all(jnp.isfinite(tags)))
    s2s = js.models.Seq2SeqAttention(V, V, embedding_size=E, hidden_size=H, attention_size=4,
                                     cell="mlstm", bidirectional=False)  # fmt: skip
    p = s2s.init(jax.random.key(2))
    enc = jax.eval_shape(s2s.encode, p, tokens)  # shapes only: greedy_decode runs it
    assert isinstance(enc.carry, js.models.DecoderCarry) and enc.carry.h.shape == (3, H)
    toks, _ = js.decoding.greedy_decode(s2s, p, tokens, 4, bos_id=0)
    assert toks.shape == (4, 3) and toks.dtype == jnp.int32


def _np_rglru(params, xs, c=8.0):
    """Griffin's RG-LRU from its equations, float64, over ``xs: [T, D]`` -> ``[T, H]``."""
    w, b, lam = (np.asarray(a, np.float64) for a in params)
    h_size = lam.shape[0]
    h, ys = np.zeros(h_size), []
    for x in xs:
        g = x @ w + b
        r, i, u = 1 / (1 + np.exp(-g[:h_size])), 1 / (1 + np.exp(-g[h_size:-h_size])), g[-h_size:]
        a = np.exp(-c * r * np.log1p(np.exp(-lam)))  # sigmoid(lam) ** (c r)
        h = a * h + np.sqrt(1 - a**2) * (i * u)
        ys.append(h)
    return np.stack(ys)


def _np_norm(kind, x, scale, eps=1e-6):
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_stack_without_norm_is_unchanged():
    layers = (js.recurrent.RGLRU(H), js.recurrent.RGLRU(H))
    stack = js.Stack(layers, residual=True)
    assert stack.norm is None and stack == js.Stack(layers, residual=True, norm=None)
    params = stack.init(jax.random.key(0), 3)
    # one params per layer, nothing else: the tree of every existing model and checkpoint
    assert isinstance(params, tuple) and len(params) == 2
    assert all(isinstance(p, js.recurrent.RGLRUParams) for p in params)
    xs = jax.random.normal(jax.random.key(1), (5, 2, 3))
    _, ys = js.rollout(stack, params, xs)
    y0 = js.rollout(layers[0], params[0], xs)[1]
    np.testing.assert_allclose(ys, js.rollout(layers[1], params[1], y0)[1] + y0, atol=1e-6)
    for cell in ("lstm", "gru", "mlstm", "slstm"):  # only the RG-LRU's model stack changed
        s = js.models.char_lm(V, cell=cell, num_layers=2, hidden_size=H, embedding_size=E).stack
        assert s.norm is None and not s.residual
    for bad in ("RMS", "batch", 1):
        with pytest.raises(ValueError, match="norm: expected None"):
            js.Stack(layers, norm=bad)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_normalised_stack_equals_numpy(kind):
    layers = (js.recurrent.RGLRU(H), js.recurrent.RGLRU(H))
    stack = js.Stack(layers, residual=True, norm=kind)
    params = stack.init(jax.random.key(0), 3)
    norms = params[-1]
    assert isinstance(norms, js.recurrent.layers.StackNormParams)
    assert [s.shape for s in norms.inputs] == [(3,), (H,)] and norms.output.shape == (H,)
    k = iter(jax.random.split(jax.random.key(1), 3))  # scales away from 1, so they count
    norms = jax.tree_util.tree_map(lambda s: s + 0.5 * jax.random.normal(next(k), s.shape), norms)
    params = (*params[:-1], norms)
    xs = 2.0 + jax.random.normal(jax.random.key(2), (6, 2, 3))  # a constant part, as in text
    lengths = jnp.array([6, 3])
    _, ys = jax.jit(lambda p, x, n: js.rollout(stack, p, x, lengths=n))(params, xs, lengths)
    for b, n in enumerate(lengths.tolist()):
        x = np.asarray(xs[:n, b], np.float64)
        h1 = _np_rglru(params[0], _np_norm(kind, x, norms.inputs[0]))
        h2 = _np_rglru(params[1], _np_norm(kind, h1, norms.inputs[1])) + h1  # residual
        want = _np_norm(kind, h2, norms.output)
        np.testing.assert_allclose(ys[:n, b], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(ys[n:, b], 0.0)  # padded steps stay zero


def test_rglru_lm_logits_stay_bounded_over_carried_chunks():
    # The same token over and over, the state carried from chunk to chunk: a bare
    # RG-LRU stack amplifies the constant input up to sqrt((1 + a) / (1 - a)) times,
    # the model's Griffin-style stack (pre-norm residual layers, final norm) does not.
    lm = js.models.char_lm(V, cell="rglru", num_layers=2, hidden_size=H, embedding_size=E)
    assert lm.stack.norm == "rms" and lm.stack.residual
    bare = js.models.RecurrentLM(V, E, js.Stack(lm.stack.layers))
    params = lm.init(jax.random.key(0))
    w, bias = np.asarray(params.head.w, np.float64), np.asarray(params.head.b, np.float64)
    # |logit_v| <= ||h|| ||w_v|| + |b_v|, ||h|| = sqrt(H) after an RMS norm of unit scale
    bound = np.max(np.sqrt(H) * np.linalg.norm(w, axis=0) + np.abs(bias)) + 1e-4
    tokens = jnp.zeros((32, 2), jnp.int32)

    @jax.jit
    def chunks(params, bare_params):  # 8 chunks of 32 steps, each model's carry carried on
        def one(carries, _):
            c, logits = lm.apply(params, carries[0], tokens)
            cb, logits_b = bare.apply(bare_params, carries[1], tokens)
            return (c, cb), (jnp.max(jnp.abs(logits)), jnp.max(jnp.abs(logits_b)))

        init = (lm.initial_carry((2,)), bare.initial_carry((2,)))
        return jax.lax.scan(one, init, None, length=8)[1]

    normed, unnormed = chunks(params, params._replace(stack=params.stack[:-1]))
    assert np.all(np.isfinite(normed)) and np.max(normed) <= bound
    assert unnormed[-1] > 2 * bound and unnormed[-1] > unnormed[0]  # the failure it prevents


def test_normalised_stack_gradients():
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        stack = js.Stack([js.recurrent.RGLRU(3), js.recurrent.RGLRU(3)], residual=True, norm="rms")
        params = stack.init(jax.random.key(0), 2, jnp.float64)
        xs = 1.0 + jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
        f = jax.jit(lambda p, x: js.rollout(stack, p, x)[1])
        check_grads(f, (params, xs), order=1, modes=["rev"], eps=1e-5)
