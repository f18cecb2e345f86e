"""Taggers, sequence classifiers and the attention encoder-decoder of jaxseq.models."""

import _np_models as npm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cells import ProtocolCell

import jaxseq as js
from jaxseq import decoding, models


def _tokens(key, shape, v):
    return jax.random.randint(key, shape, 0, v)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_tagger_sees_the_future_only_when_bidirectional(key, bidirectional):
    tg = models.tagger(4, input_size=3, cell="gru", hidden_size=5, bidirectional=bidirectional)
    params = tg.init(key)
    xs = jax.random.normal(jax.random.fold_in(key, 1), (6, 2, 3))
    logits = jax.eval_shape(tg.apply, params, xs)
    assert logits.shape == (6, 2, 4) and logits.dtype == jnp.float32
    # d logits[2] / d xs[t]: nonzero for t > 2 exactly when the tagger reads both directions
    g = jax.jit(jax.grad(lambda x: jnp.sum(tg.apply(params, x)[2])))(xs)
    future = float(jnp.abs(g[3:]).sum())
    assert float(jnp.abs(g[:3]).sum()) > 0
    assert (future > 0) if bidirectional else (future == 0.0)


def test_tagger_padding_invariance(key):
    tg = models.tagger(3, vocab_size=7, embedding_size=4, cell="lstm", hidden_size=6)
    params = tg.init(key)
    tokens = _tokens(jax.random.fold_in(key, 2), (8, 3), 7)
    lengths = jnp.array([8, 5, 2])
    apply = jax.jit(lambda p, x, n: tg.apply(p, x, lengths=n))
    logits = apply(params, tokens, lengths)
    # sequence 1 alone, unpadded: the same tags on its 5 valid steps
    alone = jax.jit(tg.apply)(params, tokens[:5, 1:2])
    np.testing.assert_allclose(logits[:5, 1], alone[:, 0], rtol=1e-5, atol=1e-5)
    # junk in the padding changes nothing in the valid part (backward direction included)
    noisy = tokens.at[5:, 1].set(6).at[2:, 2].set(0)
    again = apply(params, noisy, lengths)
    np.testing.assert_allclose(again[:5, 1], logits[:5, 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again[:2, 2], logits[:2, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again[:, 0], logits[:, 0], rtol=1e-6, atol=1e-6)


def test_classifier_last_pool_matches_a_manual_rollout(key):
    clf = models.classifier(2, input_size=3, cell="rnn", hidden_size=4)
    params = clf.init(key)
    xs = jax.random.normal(jax.random.fold_in(key, 3), (7, 2, 3))
    lengths = jnp.array([7, 4])
    out = jax.jit(lambda p, x, n: clf.apply(p, x, lengths=n))(params, xs, lengths)
    assert out.shape == (2, 2)
    cell = clf.stack.layers[0]
    carry, _ = js.rollout(cell, params.stack[0], xs, lengths=lengths)
    want = carry.h @ params.head.w + params.head.b[None]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_classifier_bidirectional_last_and_mean_pool(key):
    clf = models.classifier(3, vocab_size=5, embedding_size=4, hidden_size=3, bidirectional=True)
    params = clf.init(key)
    tokens = _tokens(jax.random.fold_in(key, 4), (6, 2), 5)
    lengths = jnp.array([6, 3])
    out = jax.jit(lambda p, x, n: clf.apply(p, x, lengths=n))(params, tokens, lengths)
    alone = jax.jit(clf.apply)(params, tokens[:3, 1:2])
    np.testing.assert_allclose(out[1], alone[0], rtol=1e-5, atol=1e-5)
    mean_clf = models.SequenceClassifier(clf.stack, 3, vocab_size=5, embedding_size=4, pool="mean")
    m, ys = jax.jit(
        lambda p, x, n: (
            mean_clf.apply(p, x, lengths=n),
            js.rollout(clf.stack, p.stack, js.nn.embed(p.embedding, x), lengths=n)[1],
        )
    )(params, tokens, lengths)
    feat = jnp.sum(ys[:3, 1], axis=0) / 3.0
    np.testing.assert_allclose(m[1], feat @ params.head.w + params.head.b, rtol=1e-5, atol=1e-5)


def test_irnn_cell_kwargs_and_dropout_only_with_key(key):
    clf = models.classifier(
        1, input_size=2, cell="rnn", hidden_size=4, activation="relu", dropout_rate=0.5,
        recurrent_init=js.initializers.identity(), bias_init=js.initializers.zeros(),
    )  # fmt: skip
    params = clf.init(key)
    np.testing.assert_array_equal(params.stack[0].w_hh, np.eye(4, dtype=np.float32))
    xs = jax.random.normal(key, (5, 3, 2))
    apply = jax.jit(lambda p, x, k: clf.apply(p, x, key=k))
    a, b = jax.jit(clf.apply)(params, xs), clf.apply(params, xs)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    c = apply(params, xs, jax.random.key(3))
    assert not np.allclose(a, c)


def test_sequence_model_bad_input(key):
    with pytest.raises(ValueError, match="give exactly one"):
        models.tagger(3, vocab_size=5, input_size=2)
    with pytest.raises(ValueError, match="pool"):
        models.classifier(2, input_size=2, pool="max")
    tg = models.tagger(3, vocab_size=5, embedding_size=2, hidden_size=3)
    params = tg.init(key)
    with pytest.raises(TypeError, match="xs: expected an integer dtype"):
        tg.apply(params, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"lengths: expected shape \[2\]"):
        tg.apply(params, jnp.zeros((4, 2), jnp.int32), lengths=jnp.array([1, 2, 3]))
    ft = models.tagger(3, input_size=2, hidden_size=3)
    with pytest.raises(ValueError, match="xs: expected last dim D=2"):
        ft.apply(ft.init(key), jnp.zeros((4, 2, 5)))
    with pytest.raises(TypeError, match="params: expected SequenceParams"):
        tg.apply({"w": 1}, jnp.zeros((4, 2), jnp.int32))


@pytest.fixture
def s2s():
    return models.Seq2SeqAttention(
        6, 5, embedding_size=4, hidden_size=5, attention_size=3, cell="lstm"
    )


def test_seq2seq_teacher_forcing_equals_step_by_step(s2s, key):
    params = s2s.init(key)
    src = _tokens(jax.random.fold_in(key, 5), (7, 3), 6)
    tgt_in = _tokens(jax.random.fold_in(key, 6), (4, 3), 5)
    lengths = jnp.array([7, 4, 1])
    apply = jax.jit(lambda p, s, t, n: s2s.apply(p, s, t, src_lengths=n))
    logits, w = apply(params, src, tgt_in, lengths)
    assert logits.shape == (4, 3, 5) and w.shape == (4, 3, 7)
    np.testing.assert_allclose(jnp.sum(w, axis=-1), 1.0, rtol=1e-5)
    valid = np.arange(7)[None, None, :] < np.asarray(lengths)[None, :, None]
    assert np.all(np.asarray(w)[~np.broadcast_to(valid, w.shape)] == 0.0)
    enc = jax.jit(s2s.encode)(params, src, lengths)
    step = jax.jit(s2s.step)
    carry = enc.carry
    for t in range(4):
        carry, lg, wt = step(params, enc, carry, tgt_in[t])
        np.testing.assert_allclose(lg, logits[t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(wt, w[t], rtol=1e-5, atol=1e-6)
    # source padding is invisible: junk past each source length changes nothing
    junk = src.at[4:, 1].set(5).at[1:, 2].set(0)
    lg2, w2 = apply(params, junk, tgt_in, lengths)
    np.testing.assert_allclose(lg2, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w2, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell,bidirectional", [("lstm", True), ("gru", False)])
def test_seq2seq_matches_reference(key, cell, bidirectional):
    """Encoder, bridge (mean over each source's valid steps), one decoder step and teacher
    forcing against a NumPy float64 model, with every weight and bias random and non-zero."""
    s2s = models.Seq2SeqAttention(
        6,
        5,
        embedding_size=4,
        hidden_size=5,
        attention_size=3,
        cell=cell,
        bidirectional=bidirectional,
    )
    params = npm.perturb(s2s.init(key), seed=8)
    src = _tokens(jax.random.fold_in(key, 9), (7, 4), 6)
    tgt_in = _tokens(jax.random.fold_in(key, 10), (4, 4), 5)
    lengths = np.array([7, 4, 1, 0])  # the mean divides by these, not by S = 7
    enc = jax.jit(s2s.encode)(params, src, jnp.asarray(lengths))
    step = jax.jit(s2s.step)(params, enc, enc.carry, tgt_in[0])
    logits, w = jax.jit(lambda p, s, t, n: s2s.apply(p, s, t, src_lengths=n))(
        params, src, tgt_in, jnp.asarray(lengths)
    )
    srcn, tgtn = np.asarray(src), np.asarray(tgt_in)
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(enc.lengths, lengths)
    for b in range(4):
        states, h0 = npm.seq2seq_encode(params, cell, bidirectional, srcn[:, b], lengths[b])
        np.testing.assert_allclose(enc.states[b], states, **tol)
        np.testing.assert_allclose(enc.keys[b], states @ np.asarray(params.attention.w_k), **tol)
        carry = npm.seq2seq_initial_carry(cell, h0)
        for got, want in zip(enc.carry, carry):
            np.testing.assert_allclose(got[b], want, **tol)
        carry1, lg1, w1 = npm.seq2seq_step(params, cell, states, lengths[b], carry, tgtn[0, b])
        for got, want in zip(step[0], carry1):
            np.testing.assert_allclose(got[b], want, **tol)
        np.testing.assert_allclose(step[1][b], lg1, **tol)
        np.testing.assert_allclose(step[2][b], w1, **tol)
        want_lg, want_w = npm.seq2seq_apply(
            params, cell, bidirectional, srcn[:, b], tgtn[:, b], lengths[b]
        )
        np.testing.assert_allclose(logits[:, b], want_lg, **tol)
        np.testing.assert_allclose(w[:, b], want_w, **tol)


def test_seq2seq_without_attention_matches_reference(key):
    """attention=False: the decoder sees only the final encoder state f (forward at the last
    valid step, backward at step 0), as context at every step and through the bridge;
    against NumPy float64, with an empty source (f = 0); greedy decoding gives no weights."""
    s2s = models.Seq2SeqAttention(
        6, 5, embedding_size=4, hidden_size=5, cell="lstm", attention=False
    )
    params = npm.perturb(s2s.init(key), seed=3)
    assert params.attention is None
    src = _tokens(jax.random.fold_in(key, 9), (7, 4), 6)
    tgt_in = _tokens(jax.random.fold_in(key, 10), (4, 4), 5)
    lengths = np.array([7, 4, 1, 0])

    @jax.jit
    def run(p, s, t, n):
        return s2s.apply(p, s, t, src_lengths=n), decoding.greedy_decode(s2s, p, s, 3, bos_id=0)

    (logits, w), (toks, gw) = run(params, src, tgt_in, jnp.asarray(lengths))
    assert w is None and gw is None and toks.shape == (3, 4)
    srcn, tgtn = np.asarray(src), np.asarray(tgt_in)
    for b in range(4):
        n = int(lengths[b])
        x = npm.f64(params.src_embedding)[srcn[:, b]]
        yf = npm.cell_rollout("lstm", params.encoder.forward, x, n)
        yb = npm.cell_rollout("lstm", params.encoder.backward, x, n, reverse=True)
        f = np.concatenate([yf[n - 1], yb[0]]) if n else np.zeros(10)
        h0 = np.tanh(npm.dense(params.bridge, f))
        carry, want = (h0, np.zeros_like(h0)), []
        for y in tgtn[:, b]:
            xin = np.concatenate([npm.f64(params.tgt_embedding)[int(y)], f])
            carry, h = npm.ref.step("lstm", npm.ref.as_arrays(params.decoder), carry, xin)
            want.append(npm.dense(params.head, np.concatenate([h, f])))
        np.testing.assert_allclose(logits[:, b], np.stack(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="params.attention: expected None"):
        s2s.apply(params._replace(attention=params.bridge), src, tgt_in)
    with pytest.raises(TypeError, match="params.attention: expected AdditiveAttentionParams"):
        models.Seq2SeqAttention(6, 5, 4, 5, cell="lstm").apply(params, src, tgt_in)


def test_seq2seq_greedy_decode_feeds_back_its_argmax(key):
    s2s = models.Seq2SeqAttention(
        6, 5, embedding_size=4, hidden_size=5, attention_size=3, bidirectional=False
    )
    params = s2s.init(key)
    src = _tokens(jax.random.fold_in(key, 7), (5, 2), 6)
    toks, w = jax.jit(lambda p, s: decoding.greedy_decode(s2s, p, s, 4, bos_id=0))(params, src)
    assert toks.shape == (4, 2) and toks.dtype == jnp.int32 and w.shape == (4, 2, 5)
    tgt_in = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), toks[:-1]])
    logits, w_tf = jax.jit(s2s.apply)(params, src, tgt_in)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), toks)
    np.testing.assert_allclose(w_tf, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell,bidirectional", [("lstm", True), ("gru", False)])
def test_greedy_decode_equals_a_numpy_greedy_loop(key, cell, bidirectional):
    """greedy_decode against a step-by-step float64 NumPy loop that feeds back its own
    argmax (peaky head so float32 and float64 agree on every argmax)."""
    s2s = models.Seq2SeqAttention(
        6, 5, embedding_size=4, hidden_size=5, attention_size=3, cell=cell,
        bidirectional=bidirectional,
    )  # fmt: skip
    params = npm.perturb(s2s.init(key), seed=21)
    params = params._replace(head=params.head._replace(w=params.head.w * 4))
    src = _tokens(jax.random.fold_in(key, 22), (6, 3), 6)
    lengths = np.array([6, 3, 1])
    toks, w = decoding.greedy_decode(
        s2s, params, src, 5, bos_id=2, src_lengths=jnp.asarray(lengths)
    )
    assert toks.shape == (5, 3) and toks.dtype == jnp.int32 and w.shape == (5, 3, 6)
    for b in range(3):
        states, h0 = npm.seq2seq_encode(
            params, cell, bidirectional, np.asarray(src[:, b]), lengths[b]
        )
        carry, y, want_toks, want_w = npm.seq2seq_initial_carry(cell, h0), 2, [], []
        for _ in range(5):
            carry, lg, wt = npm.seq2seq_step(params, cell, states, lengths[b], carry, y)
            y = int(np.argmax(lg))
            want_toks.append(y)
            want_w.append(wt)
        assert toks[:, b].tolist() == want_toks
        np.testing.assert_allclose(w[:, b], np.stack(want_w), rtol=1e-5, atol=1e-6)
    assert len(set(np.asarray(toks).ravel().tolist())) > 1  # not a constant sequence


def test_seq2seq_bad_input(s2s, key):
    params = s2s.init(key)
    src = jnp.zeros((5, 2), jnp.int32)
    with pytest.raises(ValueError, match="tgt_in: expected batch B=2"):
        s2s.apply(params, src, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"src: expected rank 2"):
        s2s.apply(params, jnp.zeros((5,), jnp.int32), jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"src_lengths: expected shape \[B=2\]"):
        s2s.encode(params, src, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="bos_id"):
        decoding.greedy_decode(s2s, params, src, 3, bos_id=9)
    with pytest.raises(ValueError, match="cell"):
        models.Seq2SeqAttention(3, 3, cell="transformer")


# -- any cell meeting js.protocols.Cell ------------------------------------------------


def _leaky_np(w, xs, n, reverse=False):
    """One sequence ``xs [T, D]`` of which ``n`` steps are valid -> outputs ``[T, 3]`` (zeros past n)."""
    w, xs = np.float64(w), np.float64(xs)
    ys, h = np.zeros((xs.shape[0], w.shape[1])), np.zeros(w.shape[1])
    for s in range(n - 1, -1, -1) if reverse else range(n):
        h = 0.5 * h + np.tanh(xs[s] @ w)
        ys[s] = h
    return ys


@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_last_pool_with_the_protocol_example_cell(key, bidirectional):
    layer = js.Bidirectional(ProtocolCell()) if bidirectional else ProtocolCell()
    clf = models.SequenceClassifier(js.Stack([layer]), 2, input_size=2, pool="last")
    params = npm.perturb(clf.init(key), seed=5)
    xs = jax.random.normal(jax.random.fold_in(key, 1), (6, 3, 2))
    lengths = jnp.array([6, 2, 0])
    out = jax.jit(lambda p, x, n: clf.apply(p, x, lengths=n))(params, xs, lengths)
    w = params.stack[0]
    head_w, head_b = np.float64(params.head.w), np.float64(params.head.b)
    for b, n in enumerate([6, 2, 0]):
        if bidirectional:
            fwd = _leaky_np(w.forward, xs[:, b], n)
            bwd = _leaky_np(w.backward, xs[:, b], n, reverse=True)
            feat = np.concatenate([fwd[max(n - 1, 0)], bwd[0]]) if n else np.zeros(6)
        else:
            feat = _leaky_np(w, xs[:, b], n)[n - 1] if n else np.zeros(3)
        np.testing.assert_allclose(out[b], feat @ head_w + head_b, rtol=1e-5, atol=1e-5)


def test_tagger_and_mean_pool_with_the_protocol_example_cell(key):
    stack = js.Stack([js.Bidirectional(ProtocolCell()), ProtocolCell()])
    tg = models.SequenceTagger(stack, 4, vocab_size=5, embedding_size=2)
    params = npm.perturb(tg.init(key), seed=6)
    tokens = _tokens(jax.random.fold_in(key, 2), (5, 2), 5)
    lengths = jnp.array([5, 3])
    out = jax.jit(lambda p, x, n: tg.apply(p, x, lengths=n))(params, tokens, lengths)
    assert out.shape == (5, 2, 4)
    for b, n in enumerate([5, 3]):
        x = np.asarray(params.embedding)[np.asarray(tokens[:, b])]
        bi = params.stack[0]
        h = np.concatenate(
            [_leaky_np(bi.forward, x, n), _leaky_np(bi.backward, x, n, reverse=True)], -1
        )
        h = _leaky_np(params.stack[1], h, n)
        want = h[:n] @ np.float64(params.head.w) + np.float64(params.head.b)
        np.testing.assert_allclose(out[:n, b], want, rtol=1e-5, atol=1e-5)
    mean = models.SequenceClassifier(stack, 4, vocab_size=5, embedding_size=2, pool="mean")
    assert mean.apply(params, tokens, lengths=lengths).shape == (2, 4)


def test_user_cell_output_size_checked_where_the_model_is_declared():
    class WrongSize(ProtocolCell):
        output_size = 5

    class NoSize:
        init = ProtocolCell.init

    with pytest.raises(
        ValueError, match=r"stack.layers\[0\] \(WrongSize\): declares output_size=5"
    ):
        models.SequenceClassifier(js.Stack([WrongSize()]), 2, input_size=2)
    with pytest.raises(ValueError, match=r"stack.layers\[0\].forward \(WrongSize\)"):
        models.SequenceTagger(
            js.Stack([js.Bidirectional(WrongSize())]), 2, vocab_size=3, embedding_size=2
        )
    with pytest.raises(
        TypeError, match=r"layers\[0\]: expected a cell or layer with an 'output_size'"
    ):
        models.SequenceTagger(js.Stack([NoSize()]), 2, input_size=2)


def test_sequence_model_config_with_a_user_cell(key, tmp_path):
    clf = models.SequenceClassifier(js.Stack([ProtocolCell()]), 2, input_size=2, pool="mean")
    cfg = clf.config()
    assert cfg["type"] == "SequenceClassifier" and cfg["pool"] == "mean"
    assert cfg["input_size"] == 2 and cfg["vocab_size"] is None
    assert cfg["layers"] == [{"type": "ProtocolCell", "output_size": 3}]
    state = js.init_state(clf.init(key), js.make_optimizer("sgd", 0.1), key)
    js.Checkpointer(tmp_path, model_config=cfg).save(state)
    other = models.SequenceClassifier(js.Stack([ProtocolCell()]), 3, input_size=2)
    with pytest.raises(ValueError, match="num_classes"):
        js.Checkpointer(tmp_path, model_config=other.config()).restore(state)


# -- time_major=False -----------------------------------------------------------------


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inputs", ["tokens", "features"])
def test_tagger_and_classifier_batch_major_equal_the_transposed_time_major_run(key, inputs):
    kw = {"vocab_size": 6, "embedding_size": 3} if inputs == "tokens" else {"input_size": 3}
    tg = models.tagger(4, hidden_size=5, cell="gru", **kw)
    params = npm.perturb(tg.init(key), seed=7)
    if inputs == "tokens":
        xs = _tokens(jax.random.fold_in(key, 3), (6, 2), 6).at[4:, 1].set(-100)  # [T, B]
        xs_bm = xs.T
    else:
        xs = jax.random.normal(jax.random.fold_in(key, 3), (6, 2, 3)).at[4:, 1].set(jnp.nan)
        xs_bm = jnp.swapaxes(xs, 0, 1)
    lengths = jnp.array([6, 4])

    def both(model):  # both layouts in one jit: one compile, not one per eager operation
        return jax.jit(
            lambda p, x, x_bm: (
                model.apply(p, x_bm, lengths=lengths, time_major=False),
                model.apply(p, x, lengths=lengths),
            )
        )(params, xs, xs_bm)

    bm, tm = both(tg)
    _close(bm, jnp.swapaxes(tm, 0, 1))
    for pool in ("last", "mean"):
        _close(*both(models.SequenceClassifier(tg.stack, 4, pool=pool, **kw)))
    with pytest.raises(TypeError, match="time_major: expected a Python bool"):
        tg.apply(params, xs, time_major=None)


def test_seq2seq_batch_major_equals_the_transposed_time_major_run(s2s, key):
    params = npm.perturb(s2s.init(key), seed=8)
    src = _tokens(jax.random.fold_in(key, 4), (5, 2), 6)
    tgt_in = _tokens(jax.random.fold_in(key, 5), (4, 2), 5)
    lengths = jnp.array([5, 3])
    logits, w = jax.jit(lambda p, s, t: s2s.apply(p, s, t, src_lengths=lengths))(
        params, src, tgt_in
    )  # under jit, like the batch-major run: one compile, not one per eager operation
    logits_bm, w_bm = jax.jit(
        lambda p, s, t: s2s.apply(p, s, t, src_lengths=lengths, time_major=False)
    )(params, src.T, tgt_in.T)
    assert logits_bm.shape == (2, 4, 5) and w_bm.shape == (2, 4, 5)
    _close(logits_bm, jnp.swapaxes(logits, 0, 1))
    _close(w_bm, jnp.swapaxes(w, 0, 1))
    with pytest.raises(ValueError, match=r"tgt_in: expected rank 2.*\[B, T\] token ids"):
        s2s.apply(params, src.T, tgt_in[0], time_major=False)
