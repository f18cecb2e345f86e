"""Masked positions never matter (values and gradients, eager and jit); token ids out
of range are errors (eagerly, and under ``js.checked`` inside jit); ``fit`` reports
one step count after an interrupt."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq.training import losses

NAN, INF = float("nan"), float("inf")


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _finite(tree):
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree_util.tree_leaves(tree))


def _eager_and_jit(fn, *args):
    """``fn(*args)`` and ``jax.grad(fn)(*args)``, eagerly and under jit."""
    out = []
    for f in (fn, jax.jit(fn)):
        out.append((f(*args), (jax.grad(fn) if f is fn else jax.jit(jax.grad(fn)))(*args)))
    return out


# ----------------------------------------------------------------- fault 1: masks


def test_mse_ignores_nan_and_inf_at_masked_positions_in_values_and_grads():
    pred = np.array([[[1.0, 2.0]], [[NAN, INF]], [[0.5, -1.0]]], np.float32)  # [N=3, 1, D=2]
    tgt = np.array([[[0.0, 1.0]], [[NAN, -100.0]], [[1.5, -1.0]]], np.float32)
    mask = np.array([[True], [False], [True]])
    valid = mask[..., 0]
    err = (pred - tgt)[valid]
    want = float((err**2).mean())
    want_grad = np.zeros_like(pred)
    want_grad[valid] = 2 * err / err.size
    for value, grad in _eager_and_jit(losses.mse, jnp.asarray(pred), jnp.asarray(tgt), mask):
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
    # lengths: [T=2, B=2, D=1] with sequence 1 of length 1
    p2 = jnp.array([[[1.0], [2.0]], [[3.0], [NAN]]])
    t2 = jnp.array([[[0.0], [0.0]], [[1.0], [NAN]]])
    g = jax.grad(lambda p: losses.mse(p, t2, lengths=jnp.array([2, 1])))(p2)
    np.testing.assert_allclose(g[..., 0], [[2 / 3, 4 / 3], [4 / 3, 0.0]], rtol=1e-6)


def test_cross_entropy_accuracy_bits_ignore_sentinels_and_nan_logits_at_masked_positions():
    v = 4
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, v)).astype(np.float32) * 2
    logits[1] = NAN
    logits[3] = [INF, -INF, 0, 1]
    targets = np.array([2, -100, 1, v + 7, 0], np.int32)  # masked positions hold anything
    mask = np.array([True, False, True, False, True])
    logp = _np_log_softmax(logits[mask])
    tok = -logp[np.arange(3), targets[mask]]
    want = tok.mean()
    want_grad = np.zeros_like(logits)
    onehot = np.eye(v)[targets[mask]]
    want_grad[mask] = (np.exp(logp) - onehot) / 3
    acc = (logits[mask].argmax(-1) == targets[mask]).mean()
    args = (jnp.asarray(logits), jnp.asarray(targets), mask)
    for value, grad in _eager_and_jit(losses.cross_entropy, *args):
        np.testing.assert_allclose(value, want, rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    for value, grad in _eager_and_jit(losses.bits_per_token, *args):
        np.testing.assert_allclose(value, want / np.log(2), rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad / np.log(2), rtol=1e-5, atol=1e-6)
    for f in (losses.accuracy, jax.jit(losses.accuracy)):
        np.testing.assert_allclose(f(*args), acc)
    # time-major with lengths: [T=2, B=2, V]; step 1 of sequence 1 is padding
    lg = jnp.asarray(logits[[0, 2, 4, 1]].reshape(2, 2, v))  # NaN row at the padded step
    tg = jnp.asarray(targets[:4].reshape(2, 2)).at[0, 1].set(3)
    g = jax.jit(jax.grad(lambda z: losses.cross_entropy(z, tg, lengths=jnp.array([2, 1]))))(lg)
    assert _finite(g) and not np.asarray(g[1, 1]).any()


def test_train_step_trains_on_a_batch_with_sentinels_at_masked_positions():
    def loss_fn(params, carry, batch, key):
        logits = batch["x"] + params["w"][None, :]  # [N, V]; NaN/inf rows are masked
        ce = losses.cross_entropy(logits, batch["y"], batch["mask"])
        reg = losses.mse(logits[..., :1], batch["t"], batch["mask"])
        return ce + reg, (carry, {})

    opt = js.make_optimizer("sgd", 0.1, max_norm=None)
    state = js.init_state({"w": jnp.array([0.5, -0.5, 0.0])}, opt, jax.random.key(0))
    batch = {
        "x": jnp.array([[1.0, 0, 0], [NAN, 0, NAN], [2.0, 1, 0], [INF, -INF, 0]]),
        "y": jnp.array([1, -100, 0, 3], jnp.int32),
        "t": jnp.array([[0.0], [NAN], [1.0], [-100.0]]),
        "mask": jnp.array([True, False, True, False]),
    }
    step = js.make_train_step(loss_fn, opt, donate=False)
    new, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(new.bad_steps) == 0
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not np.allclose(new.params["w"], state.params["w"])


def _same_value_and_grad(f, clean, dirty, argnums=0, eager=True):
    """``f`` and its gradient on ``dirty`` equal those on ``clean`` and are finite
    (jit; the value eagerly too unless ``eager`` is False). Returns the gradient on ``dirty``."""
    vg = jax.jit(jax.value_and_grad(f, argnums=argnums))
    want, want_g = vg(*clean)
    got, got_g = vg(*dirty)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if eager:
        np.testing.assert_allclose(f(*dirty), want, rtol=1e-5)
    assert _finite(want_g) and _finite(got_g)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_g, want_g
    )
    return got_g


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_classifier_pooling_ignores_nan_at_padded_steps(pool):
    clf = js.models.classifier(3, input_size=2, cell="gru", hidden_size=4, pool=pool,
                               bidirectional=True)  # fmt: skip
    params = clf.init(jax.random.key(1))
    xs = np.asarray(jax.random.normal(jax.random.key(2), (4, 3, 2)))
    lengths = jnp.array([4, 2, 1])
    pad = np.arange(4)[:, None] >= np.asarray(lengths)[None, :]
    clean = np.where(pad[..., None], 0.0, xs).astype(np.float32)
    dirty = clean.copy()
    dirty[pad] = NAN
    dirty[3, 2] = INF

    def f(p, x):
        return jnp.sum(clf.apply(p, x, lengths=lengths) ** 2)

    _, gx = _same_value_and_grad(f, (params, clean), (params, dirty), argnums=(0, 1))
    assert not np.asarray(gx)[pad].any()


def test_token_models_ignore_any_id_at_padded_steps():
    lengths = jnp.array([3, 1])
    pad = np.arange(3)[:, None] >= np.asarray(lengths)[None, :]
    ids = np.array([[1, 2], [4, 0], [3, 1]], np.int32)
    clean = np.where(pad, 0, ids)
    dirty = np.where(pad, np.array([[0, 0], [0, -100], [0, 99]]), ids).astype(np.int32)

    tg = js.models.tagger(3, vocab_size=5, embedding_size=2, cell="rnn", hidden_size=3)
    tp = tg.init(jax.random.key(0))

    def tag_loss(p, x):
        return jnp.sum(tg.apply(p, x, lengths=lengths)[0] ** 2)

    _same_value_and_grad(tag_loss, (tp, clean), (tp, dirty))

    s2s = js.models.Seq2SeqAttention(5, 4, embedding_size=2, hidden_size=3, attention_size=2,
                                     cell="rnn")  # fmt: skip
    sp = s2s.init(jax.random.key(1))
    tgt_in = jnp.array([[0, 0], [1, 2]], jnp.int32)

    def s2s_loss(p, src):
        logits, _ = s2s.apply(p, src, tgt_in, src_lengths=lengths)
        return losses.cross_entropy(
            logits, jnp.array([[1, 2], [3, -100]]), lengths=jnp.array([2, 1])
        )

    _same_value_and_grad(s2s_loss, (sp, clean), (sp, dirty), eager=False)


def test_lm_loss_and_eval_ignore_sentinels_at_masked_steps():
    v = 5
    model = js.models.char_lm(v, cell="gru", num_layers=1, hidden_size=4, embedding_size=3)
    params = model.init(jax.random.key(0))
    mask = np.array([[True, True], [True, False], [True, False]])
    inputs = np.array([[1, 2], [3, -100], [4, 77]], np.int32)
    targets = np.array([[2, 0], [4, -100], [0, v]], np.int32)
    reset = np.zeros_like(mask)
    chunk = js.data.Chunk(inputs, targets, mask, reset)
    carry0 = model.initial_carry((2,))
    # reference: the same model on clean inputs, cross-entropy in NumPy over the valid steps
    clean = np.where(mask, inputs, 0)
    _, logits = model.apply(params, carry0, clean, lengths=jnp.array([3, 1]))
    logp = _np_log_softmax(np.asarray(logits))
    nll = -np.take_along_axis(logp, np.where(mask, targets, 0)[..., None], -1)[..., 0]
    want_sum = nll[mask].sum()
    _, nats, count = js.training.make_eval_step(model)(params, carry0, chunk)
    np.testing.assert_allclose(nats, want_sum, rtol=1e-5)
    assert float(count) == 4.0
    loss_fn = js.lm_loss_fn(model)
    grad_fn = jax.jit(jax.grad(lambda p: loss_fn(p, carry0, chunk, None)[0]))
    loss, _ = loss_fn(params, carry0, chunk, None)
    np.testing.assert_allclose(loss, want_sum / 4, rtol=1e-5)
    assert _finite(grad_fn(params))


# ----------------------------------------------------------------- fault 2: token ids


def _raises_both_ways(fn, args, match):
    """Eager ValueError, the same message under js.checked (jit), and plain jit still runs."""
    with pytest.raises(ValueError, match=match):
        fn(*args)
    with pytest.raises(ValueError, match=match):
        js.checked(fn)(*args)
    jax.jit(fn)(*args)  # unchecked: runs (JAX clamps / fills NaN)


def test_language_model_rejects_out_of_range_token_ids():
    lm = js.models.char_lm(6, cell="gru", num_layers=1, hidden_size=3, embedding_size=2)
    params = lm.init(jax.random.key(0))

    def f(p, t):
        return lm.apply(p, None, t)[1]

    with pytest.raises(
        ValueError, match=r"tokens: expected values in \[0, 5\].* got 6 at index \[1, 0\]"
    ):
        f(params, jnp.array([[0, 1], [6, 2]]))
    _raises_both_ways(
        f, (params, jnp.array([[0, 1], [2, -1]])), r"tokens: expected values in \[0, 5\]"
    )
    # with lengths only the valid steps are checked
    out = lm.apply(params, None, jnp.array([[0, 1], [6, -1]]), lengths=jnp.array([1, 1]))[1]
    assert _finite(out)


def test_tagger_classifier_seq2seq_reject_out_of_range_token_ids():
    tg = js.models.tagger(3, vocab_size=5, embedding_size=2, cell="rnn", hidden_size=2)
    tp = tg.init(jax.random.key(0))
    bad = jnp.array([[0, 5], [1, 2]])
    with pytest.raises(
        ValueError, match=r"xs: expected values in \[0, 4\].*got 5 at index \[0, 1\]"
    ):
        tg.apply(tp, bad)
    _raises_both_ways(lambda p, x: tg.apply(p, x), (tp, bad), r"xs: expected values in \[0, 4\]")
    clf = js.models.classifier(2, vocab_size=5, embedding_size=2, cell="rnn", hidden_size=2)
    cp = clf.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"xs: expected values in \[0, 4\].*got -3"):
        clf.apply(cp, jnp.array([[0, -3], [1, 2]]), lengths=jnp.array([2, 1]))
    s2s = js.models.Seq2SeqAttention(5, 4, embedding_size=2, hidden_size=2, attention_size=2)
    sp = s2s.init(jax.random.key(1))
    ok_src, ok_tgt = jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"src: expected values in \[0, 4\].*got 5"):
        s2s.apply(sp, ok_src.at[1, 1].set(5), ok_tgt)
    _raises_both_ways(
        lambda p, t: s2s.apply(p, ok_src, t)[0], (sp, ok_tgt.at[0, 1].set(4)),
        r"tgt_in: expected values in \[0, 3\]",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"prime: expected values in \[0, 4\].*got 9"):
        lm = js.models.char_lm(5, cell="rnn", num_layers=1, hidden_size=2, embedding_size=2)
        js.decoding.sample(jax.random.key(0), lm, lm.init(jax.random.key(0)), jnp.array([[9]]), 2)


def test_losses_reject_out_of_range_targets_at_valid_positions():
    logits = jnp.zeros((3, 4))
    mask = jnp.array([True, True, False])
    bad = jnp.array([1, 4, -100])  # 4 is at a valid position
    msg = r"targets: expected values in \[0, 3\].*got 4 at index \[1\]"
    for fn in (losses.cross_entropy, losses.accuracy, losses.bits_per_token):
        with pytest.raises(ValueError, match=msg):
            fn(logits, bad, mask)
    _raises_both_ways(
        losses.cross_entropy, (logits, bad, mask), r"targets: expected values in \[0, 3\]"
    )
    _raises_both_ways(losses.accuracy, (logits, bad, mask), r"targets: expected values in \[0, 3\]")
    _raises_both_ways(
        losses.token_cross_entropy, (logits, jnp.array([0, 1, -1])), r"targets: expected values"
    )
    # at masked positions anything goes
    ok = jnp.array([1, 3, 99])
    np.testing.assert_allclose(losses.cross_entropy(logits, ok, mask), np.log(4), rtol=1e-6)
    np.testing.assert_allclose(
        js.checked(losses.cross_entropy)(logits, ok, mask), np.log(4), rtol=1e-6
    )


# ----------------------------------------------------------------- fault 3: fit


@pytest.mark.parametrize("n, stop_at", [(1, 22), (2, 21)])
def test_fit_interrupted_by_on_step_reports_the_step_it_saved(tmp_path, n, stop_at):
    def loss_fn(params, carry, batch, key):
        return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2), (carry, {})

    opt = js.make_optimizer("sgd", 0.2, max_norm=None)
    state = js.init_state({"w": jnp.zeros(())}, opt, jax.random.key(0))
    step = js.make_train_step(loss_fn, opt, chunks_per_call=n)
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    seen = []

    def on_step(s, rec):
        seen.append(s)
        if s == stop_at:  # with n=2 steps 21 and 22 ran in one call: the state is at 22
            raise KeyboardInterrupt

    ckpt = js.Checkpointer(str(tmp_path / "ckpt"))
    state, info = js.fit(
        step, state, lambda s: {"x": x, "y": 3 * x}, num_steps=50, progress=False,
        checkpointer=ckpt, on_step=on_step, out_dir=tmp_path / "out", plot=False,
    )  # fmt: skip
    assert info["stopped"] == "interrupted" and seen[-1] == stop_at
    assert info["steps"] == int(state.step) == ckpt.latest_step() == 22
    assert ckpt.read_meta()["train_s"] == pytest.approx(info["train_s"])
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in lines] == list(range(1, 23))


def test_an_out_of_range_label_under_jit_warns_then_fails_pointing_at_js_checked():
    # under jit the gather of label 7 among V=4 classes gives NaN, not an error: every step
    # is skipped by the non-finite guard; fit says so and how to find the bad label
    v = 4

    def loss_fn(params, carry, batch, key):
        return js.cross_entropy(batch["x"] @ params["w"], batch["label"]), (carry, {})

    opt = js.make_optimizer("adam", 1e-2)
    fresh = lambda: js.init_state({"w": jnp.zeros((3, v))}, opt, jax.random.key(0))  # noqa: E731
    step = js.make_train_step(loss_fn, opt)
    batch = {"x": np.ones((5, 3), np.float32), "label": np.array([0, 1, 2, 3, 7])}
    with (
        pytest.warns(RuntimeWarning, match="step 1 had a non-finite") as caught,
        pytest.raises(js.NonFiniteError, match="applied no update") as err,
    ):
        js.fit(step, fresh(), lambda s: batch, num_steps=3, progress=False)
    for text in (str(caught[0].message), str(err.value)):
        assert "label or token id out of range" in text
        assert "js.checked(step_fn)(state, batch)" in text
    # the advice finds it: the same step under js.checked names the label
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 3\].*max 7"):
        js.checked(step)(fresh(), batch)
