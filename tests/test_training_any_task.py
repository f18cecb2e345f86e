"""The training contract for any task: regression over a carried state, classification on
padded batches, seq2seq-shaped batch pytrees, optimizers from any scalar or schedule,
parameters restored alone, runs extended past their first num_steps."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseq as js
from jaxseq import data
from jaxseq import training as train
from jaxseq.training import losses

# -- a GRU regressor over a real-valued series, its state carried from chunk to chunk ------


def _regressor(hidden_size=16):
    cell = js.GRU(hidden_size)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"cell": cell.init(k1, 1), "head": js.nn.Dense(1).init(k2, hidden_size)}

    def loss_fn(params, carry, chunk, key):
        carry, ys = js.rollout(cell, params["cell"], chunk.inputs, carry, reset=chunk.reset)
        pred = js.nn.dense(params["head"], ys)
        return losses.mse(pred, chunk.targets, chunk.mask), (carry, {})

    return cell, init, loss_fn


def test_gru_regressor_with_a_carried_state_beats_the_variance_baseline(key, tmp_path):
    t = np.arange(4000)
    series = (np.sin(t * 0.3) + 0.5 * np.sin(t * 0.11)).astype(np.float32)
    b, k = 8, 10
    bt = data.SeriesBatcher(series, b, k)
    cell, init, loss_fn = _regressor()
    opt = train.make_optimizer("adam", 1e-2, total_steps=300, final_lr_ratio=0.1)
    state = train.init_state(init(key), opt, key, carry=cell.initial_carry((b,)))
    step = train.make_train_step(loss_fn, opt)
    state, info = train.fit(step, state, bt, num_steps=300, out_dir=str(tmp_path), plot=False)
    assert info["steps"] == 300 and step.traces == 1
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {"loss", "grad_norm", "lr", "finite", "train_s", "steps_per_s", "tokens_per_s"} <= set(
        recs[0]
    )
    baseline = float(np.var(series))  # predicting the mean
    final = float(np.mean([r["loss"] for r in recs[-20:]]))
    assert recs[0]["loss"] > 0.3 * baseline
    assert final < 0.02 * baseline, (final, baseline)
    # the carry matters: the same params from zeros at every chunk predict worse
    no_carry = data.SeriesBatcher(series, b, k, reset_every_chunk=True)
    ev = jax.jit(lambda p, c, ch: loss_fn(p, c, ch, None))

    def mean_loss(batcher):
        carry, out = cell.initial_carry((b,)), []
        for i in range(batcher.num_chunks):
            loss, (carry, _) = ev(state.params, carry, batcher.chunk(i))
            out.append(float(loss))
        return np.mean(out)

    assert mean_loss(bt) < 0.7 * mean_loss(no_carry)


# -- a classifier on padded batches ----------------------------------------------------------


def _classifier(vocab_size=6, embedding_size=4, hidden_size=12):
    cell = js.GRU(hidden_size)

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "embed": js.nn.Embedding(embedding_size).init(k1, vocab_size),
            "cell": cell.init(k2, embedding_size),
            "head": js.nn.Dense(2).init(k3, hidden_size),
        }

    def loss_fn(params, carry, batch, key):
        xs = js.nn.embed(params["embed"], batch["tokens"])
        final, _ = js.rollout(cell, params["cell"], xs, lengths=batch["tokens_lengths"])
        logits = js.nn.dense(params["head"], final.h)
        loss = losses.cross_entropy(logits, batch["label"])
        return loss, (carry, {"accuracy": losses.accuracy(logits, batch["label"])})

    return init, loss_fn


def _parity_examples(n, seed):
    """Label: whether token 1 occurs an odd number of times (needs the whole sequence)."""
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(1, 6, size=int(t)) for t in rng.integers(1, 12, size=n)]
    labels = [int((s == 1).sum() % 2) for s in tokens]
    return tokens, labels


def test_classifier_on_padded_batches_learns_and_ignores_padding(key):
    tokens, labels = _parity_examples(400, 0)
    bt = data.PaddedBatcher({"tokens": tokens, "label": labels}, 32, num_buckets=3, seed=0)
    init, loss_fn = _classifier()
    opt = train.make_optimizer("adam", 2e-2)
    state = train.init_state(init(key), opt, key)
    step = train.make_train_step(loss_fn, opt)
    state, info = train.fit(step, state, bt, num_steps=300, progress=False)
    assert step.traces <= 3  # one compilation per bucket length
    metrics_of = jax.jit(lambda p, b: loss_fn(p, None, b, None)[1][1])
    acc = [
        float(metrics_of(state.params, bt.at_step(s))["accuracy"]) for s in range(bt.num_batches)
    ]
    assert np.mean(acc) > 0.9, acc
    # padding must not matter: any values in the padded positions, the same loss and gradient
    batch = bt.at_step(0)
    noisy = dict(batch)
    t = batch["tokens"].shape[0]
    pad = np.arange(t)[:, None] >= batch["tokens_lengths"][None, :]
    assert pad.any()
    rng = np.random.default_rng(1)
    noisy["tokens"] = np.where(pad, rng.integers(0, 6, size=pad.shape), batch["tokens"])
    assert (noisy["tokens"] != batch["tokens"]).any()
    vg = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, None, b, None)[0]))
    (l1, g1), (l2, g2) = vg(state.params, batch), vg(state.params, noisy)
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_array_equal(a, b)


def test_fit_shards_padded_batches_along_their_batch_axes(key):
    tokens, labels = _parity_examples(40, 1)
    bt = data.PaddedBatcher({"tokens": tokens, "label": labels}, 8)
    init, loss_fn = _classifier()
    opt = train.make_optimizer("sgd", 0.1)
    mesh = train.make_mesh(jax.devices()[:1])
    batch = train.shard_batch(bt.at_step(0), mesh, bt.batch_axes)
    assert tuple(batch["tokens"].sharding.spec) == (None, "data")
    assert tuple(batch["label"].sharding.spec) == ("data",)
    state = train.init_state(init(key), opt, key)
    state, info = train.fit(train.make_train_step(loss_fn, opt), state, bt, num_steps=3, mesh=mesh)
    assert info["steps"] == 3


# -- a seq2seq-shaped batch pytree -----------------------------------------------------------


def _seq2seq(vocab_size=7, hidden_size=8):
    enc, dec = js.GRU(hidden_size), js.GRU(hidden_size)

    def init(key):
        ks = jax.random.split(key, 4)
        return {
            "embed": js.nn.Embedding(5).init(ks[0], vocab_size),
            "enc": enc.init(ks[1], 5),
            "dec": dec.init(ks[2], 5),
            "head": js.nn.Dense(vocab_size).init(ks[3], hidden_size),
        }

    def loss_fn(params, carry, batch, key):
        src = js.nn.embed(params["embed"], batch["src"])
        h, _ = js.rollout(enc, params["enc"], src, lengths=batch["src_lengths"])
        tgt = js.nn.embed(params["embed"], batch["tgt_in"])
        _, ys = js.rollout(dec, params["dec"], tgt, h, lengths=batch["tgt_lengths"])
        logits = js.nn.dense(params["head"], ys)
        loss = losses.cross_entropy(logits, batch["tgt_out"], lengths=batch["tgt_lengths"])
        acc = losses.accuracy(logits, batch["tgt_out"], lengths=batch["tgt_lengths"])
        return loss, (carry, {"accuracy": acc})

    return init, loss_fn


def _copy_batch(rng, b=4, ts=5, tt=6):
    src = rng.integers(2, 7, size=(ts, b)).astype(np.int32)
    src_len = rng.integers(2, ts + 1, size=b).astype(np.int32)
    tgt_out = np.zeros((tt, b), np.int32)
    tgt_out[:ts] = src
    tgt_in = np.concatenate([np.ones((1, b), np.int32), tgt_out[:-1]])
    return {"src": src, "src_lengths": src_len, "tgt_in": tgt_in, "tgt_out": tgt_out,
            "tgt_lengths": src_len + 1}  # fmt: skip


def test_seq2seq_batch_pytree_through_make_train_step(key):
    init, loss_fn = _seq2seq()
    params = init(key)
    batch = _copy_batch(np.random.default_rng(0))
    opt = train.make_optimizer("sgd", 0.5, max_norm=None)  # update = -0.5 * grad
    state = train.init_state(params, opt, key)
    step = train.make_train_step(loss_fn, opt, donate=False)
    new, m = step(state, batch)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, None, batch, None)[0]))(params)
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-6)
    assert 0.0 <= float(m["accuracy"]) <= 1.0 and float(m["lr"]) == 0.5
    for p, n, g in zip(*(jax.tree_util.tree_leaves(t) for t in (params, new.params, grads))):
        np.testing.assert_allclose(n, p - 0.5 * g, rtol=1e-5, atol=1e-6)
    # two batches per call: every leaf stacked on a leading [2] axis, metrics per batch
    rng = np.random.default_rng(1)
    two = train.make_train_step(loss_fn, opt, chunks_per_call=2, donate=False)
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), _copy_batch(rng), _copy_batch(rng))
    after, m2 = two(state, stacked)
    assert m2["loss"].shape == (2,) and m2["accuracy"].shape == (2,) and int(after.step) == 2
    with pytest.raises(ValueError, match=r"batch\['src'\]: expected a leading axis of n=2"):
        two(state, batch)
    with pytest.raises(TypeError, match=r"batch\['src'\]\[0\]: expected an array, got int"):
        step(state, {**batch, "src": [1, 2]})
    with pytest.raises(TypeError, match=r"batch\['name'\]: expected a numeric or bool array"):
        step(state, {**batch, "name": np.array(["a"] * 4)})
    assert step.traces == 1 and two.traces == 1  # every error before any trace


def test_fit_takes_a_function_or_an_iterable_of_batches(key):
    init, loss_fn = _seq2seq()
    rng = np.random.default_rng(2)
    pool = [_copy_batch(rng) for _ in range(6)]
    opt = train.make_optimizer("adam", 1e-2)
    fresh = lambda: train.init_state(init(key), opt, key)
    step = train.make_train_step(loss_fn, opt)
    seen = []
    state, info = train.fit(
        step, fresh(), lambda s: seen.append(s) or pool[s % 6], num_steps=4, progress=False
    )
    assert seen == [0, 1, 2, 3] and info["stopped"] == "steps"
    a, _ = train.fit(step, fresh(), iter(pool), num_steps=4, progress=False)
    b, _ = train.fit(step, fresh(), lambda s: pool[s], num_steps=4, progress=False)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params))
    )
    # an iterable that runs out stops the run early; stacking n at a time
    two = train.make_train_step(loss_fn, opt, chunks_per_call=2)
    state, info = train.fit(two, fresh(), pool, num_steps=10, progress=False)
    assert info["stopped"] == "data" and info["steps"] == 6 and int(state.step) == 6
    # resuming from an iterable draws on where it stands: islice skips the done steps
    state, _ = train.fit(step, fresh(), iter(pool), num_steps=2, progress=False)
    state, _ = train.fit(step, state, itertools.islice(pool, 2, None), num_steps=4, progress=False)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(
            jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(a.params)
        )
    )
    with pytest.raises(TypeError, match="batches: expected an object with at_step"):
        train.fit(step, fresh(), 3, num_steps=2)


# -- optimizers: any scalar, any schedule ------------------------------------------------------


def _lr_trace(opt, steps=6):
    loss_fn = lambda p, c, b, k: (jnp.sum((p["w"] - b["x"]) ** 2), (c, {}))
    state = train.init_state({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    step = train.make_train_step(loss_fn, opt)
    out = []
    for _ in range(steps):
        state, m = step(state, {"x": np.ones(2, np.float32)})
        out.append(float(m["lr"]))
    return out


def test_make_optimizer_takes_numpy_and_jax_scalars_and_optax_schedules():
    for lr in (np.float32(3e-3), jnp.float32(3e-3), jnp.asarray(3e-3), np.int64(2), 3e-3):
        np.testing.assert_allclose(
            _lr_trace(train.make_optimizer("adam", lr)), float(lr), rtol=1e-6
        )
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    got = _lr_trace(train.make_optimizer("sgd", schedule))
    np.testing.assert_allclose(got, [0.1 * 0.5**s for s in range(6)], rtol=1e-6)
    got = _lr_trace(train.make_optimizer("adamw", lambda s: 0.01 * (s + 1), weight_decay=0.1))
    np.testing.assert_allclose(got, [0.01 * (s + 1) for s in range(6)], rtol=1e-6)
    # the lr can be changed between steps through the injected hyperparameters
    opt = train.make_optimizer("sgd", 0.1, max_norm=None)
    state = opt.init({"w": jnp.zeros(1)})
    state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    upd, _ = opt.update({"w": jnp.ones(1)}, state, {"w": jnp.zeros(1)})
    np.testing.assert_allclose(upd["w"], [-0.5])
    for bad in (0, -1e-3, float("nan"), True, "1e-3", np.array([1e-3]), None):
        with pytest.raises(ValueError, match="learning_rate: expected a positive real scalar"):
            train.make_optimizer("adam", bad)
    with pytest.raises(ValueError, match="warmup_steps, total_steps: apply to a number"):
        train.make_optimizer("adam", schedule, total_steps=10)


def test_any_optax_transformation_trains_and_reports_no_lr_it_does_not_have(key):
    opt = optax.sgd(0.1)  # not injected: no lr metric
    loss_fn = lambda p, c, b, k: (jnp.sum((p["w"] - b["x"]) ** 2), (c, {}))
    state = train.init_state({"w": jnp.zeros(2)}, opt, key)
    state, m = train.make_train_step(loss_fn, opt)(state, {"x": np.ones(2, np.float32)})
    assert "lr" not in m
    np.testing.assert_allclose(state.params["w"], [0.2, 0.2], rtol=1e-6)


# -- checkpoints: params alone, extended runs --------------------------------------------------


class _TinyLM:
    """A GRU language model with the interface evaluate_lm uses."""

    def __init__(self, vocab_size=7, hidden_size=8):
        self.vocab_size, self.cell = vocab_size, js.GRU(hidden_size)

    def init(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "embed": js.nn.Embedding(4).init(k1, self.vocab_size),
            "cell": self.cell.init(k2, 4),
            "head": js.nn.Dense(self.vocab_size).init(k3, self.cell.hidden_size),
        }

    def initial_carry(self, batch_shape):
        return self.cell.initial_carry(batch_shape)

    def apply(self, params, carry, tokens, *, reset=None, lengths=None, key=None):
        xs = js.nn.embed(params["embed"], tokens)
        carry, ys = js.rollout(self.cell, params["cell"], xs, carry, reset=reset, lengths=lengths)
        return carry, js.nn.dense(params["head"], ys)


def test_params_restored_alone_serve_another_batch_size(key, tmp_path):
    model = _TinyLM()
    ids = np.random.default_rng(0).integers(0, 7, size=600)
    bt = data.StreamBatcher(ids, 4, 8)
    opt = train.make_optimizer("adam", 1e-2)
    state = train.init_state(model.init(key), opt, key, model.initial_carry((4,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt)
    ckpt = js.Checkpointer(tmp_path / "ckpt", model_config={"vocab_size": 7})
    state, _ = train.fit(step, state, bt, num_steps=6, checkpointer=ckpt, progress=False)
    # evaluation with 2 streams and no optimizer: a whole-state restore cannot do that
    other = jax.random.key(5)
    template = model.init(other)
    eval_bt = data.StreamBatcher(ids[:300], 2, 8)
    small = train.init_state(template, optax.sgd(0.1), other, model.initial_carry((2,)))
    with pytest.raises(js.training.IncompatibleCheckpointError):
        ckpt.restore(small)
    params = train.restore_params(tmp_path / "ckpt", template, model_config={"vocab_size": 7})
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(template)
    for got, want in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params)
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert train.evaluate_lm(model, params, eval_bt) == train.evaluate_lm(
        model, state.params, eval_bt
    )
    with pytest.raises(js.training.IncompatibleCheckpointError, match="incompatible model"):
        train.restore_params(tmp_path / "ckpt", template, model_config={"vocab_size": 8})
    with pytest.raises(
        js.training.IncompatibleCheckpointError, match=r"params/head/w: saved shape"
    ):
        ckpt.restore_params(_TinyLM(hidden_size=6).init(key) | {"cell": template["cell"]})
    with pytest.raises(js.training.IncompatibleCheckpointError, match="missing"):
        ckpt.restore_params({"embed": template["embed"]})
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        train.restore_params(tmp_path / "nowhere", template)


def test_resume_with_a_larger_num_steps_extends_the_run(key, tmp_path):
    cell, init, loss_fn = _regressor(hidden_size=4)
    series = np.sin(np.arange(400) * 0.2).astype(np.float32)
    bt = data.SeriesBatcher(series, 4, 5)
    lr = 1e-2
    steps = {}  # an optimizer and train step per schedule, compiled once for all the runs

    def run(num_steps, total_steps, out, restore=True):
        if total_steps not in steps:
            opt = train.make_optimizer("adam", lr, total_steps=total_steps, final_lr_ratio=0.1)
            steps[total_steps] = opt, train.make_train_step(loss_fn, opt)
        opt, step = steps[total_steps]
        state = train.init_state(init(key), opt, key, cell.initial_carry((4,)))
        ckpt = js.Checkpointer(out)
        if restore and ckpt.latest_step() is not None:
            state, _ = ckpt.restore(state)
        lrs = {}
        state, info = train.fit(
            step, state, bt, num_steps=num_steps, checkpointer=ckpt,
            on_step=lambda s, m: lrs.__setitem__(s, m["lr"]), progress=False,
        )  # fmt: skip
        return state, info, lrs

    state, _, lrs = run(8, 8, tmp_path / "a")
    assert sorted(lrs) == list(range(1, 9))
    same, info, none = run(8, 8, tmp_path / "a")  # already done: returns at once
    assert info["steps"] == 8 and none == {} and int(same.step) == 8
    # a larger num_steps continues; the schedule built for 8 steps stays at its end value
    state, info, lrs = run(12, 8, tmp_path / "a")
    assert sorted(lrs) == [9, 10, 11, 12] and int(state.step) == 12
    np.testing.assert_allclose(list(lrs.values()), 0.1 * lr, rtol=1e-5)
    # the same steps in one run give the same result, bit for bit
    ref, _, _ = run(12, 8, tmp_path / "ref")
    for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    # a new schedule: a new optimizer of the new total; the restored count picks it up
    _, _, lrs = run(16, 16, tmp_path / "a")
    want = optax.cosine_decay_schedule(lr, 16, alpha=0.1)
    np.testing.assert_allclose(
        [lrs[s] for s in range(13, 17)], [float(want(s - 1)) for s in range(13, 17)], rtol=1e-5
    )


# -- the loss_fn contract, checked when the step is traced ------------------------------

_GRU = js.GRU(4)


def _gru_loss(cell=_GRU):
    """A loss over a GRU rollout: returns the new carry (and a scalar loss)."""

    def loss_fn(params, carry, batch, key):
        carry, ys = js.rollout(cell, params["gru"], batch["x"], carry)
        return jnp.mean(ys**2), (carry, {})

    return loss_fn


def _sum_loss(params, batch):
    return jnp.mean((batch["x"] - params["w"]) ** 2)


def _returns(carry):
    """A loss that returns this carry whatever it is given."""
    return lambda p, c, b, k: (_sum_loss(p, b), (carry, {}))


_BAD_LOSS_FNS = {
    "only the loss": (
        lambda p, c, b, k: _sum_loss(p, b), None, TypeError,
        r"expected loss_fn\(params, carry, batch, key\) -> \(loss, \(new_carry, metrics\)\), "
        r"got only the loss \(float32\[\]\); return e.g. \(loss, \(carry, \{\}\)\)",
    ),
    "(loss, {})": (
        lambda p, c, b, k: (_sum_loss(p, b), {}), None, TypeError,
        r"got \(loss, dict\) as the second element; return the carry with the metrics",
    ),
    "a tuple of three": (
        lambda p, c, b, k: (_sum_loss(p, b), c, {}), None, TypeError,
        r"got a tuple of length 3",
    ),
    "non-scalar loss": (
        lambda p, c, b, k: ((b["x"] - p["w"]) ** 2, (c, {})), None, ValueError,
        r"expected a scalar loss, got float32\[5, 3, 1\]",
    ),
    "integer loss": (
        lambda p, c, b, k: (jnp.sum(b["x"] > p["w"]), (c, {})), None, TypeError,
        r"expected a floating-point loss, got int32\[\]",
    ),
    "carry returned, state.carry None": (
        _gru_loss(), None, ValueError,
        r"returned a carry \(RNNCarry\) but state.carry is None; start the state with the "
        r"model's carry: init_state\(\.\.\., carry=model.initial_carry\(batch_shape\)\)",
    ),
    "carry None, state.carry set": (
        _returns(None), _GRU.initial_carry((3,)), ValueError,
        r"returned carry None but state.carry holds one",
    ),
    "another carry structure": (
        _returns(_GRU.initial_carry((3,))), js.LSTM(4).initial_carry((3,)), ValueError,
        r"returned a carry with structure .*RNNCarry.*but state.carry has structure .*LSTMCarry"
        r".*init_state\(\.\.\., carry=model.initial_carry\(batch_shape\)\)",
    ),
    "another carry shape": (
        _returns(_GRU.initial_carry((3,))), js.GRU(6).initial_carry((3,)), ValueError,
        r"returned carry.h as float32\[3, 4\], but state.carry holds float32\[3, 6\] there",
    ),
    "another carry dtype": (
        lambda p, c, b, k: (_sum_loss(p, b), (jax.tree.map(lambda h: h.astype(jnp.bfloat16), c), {})),
        _GRU.initial_carry((3,)), ValueError,
        r"returned carry.h as bfloat16\[3, 4\], but state.carry holds float32\[3, 4\]",
    ),
    "metrics not a dict": (
        lambda p, c, b, k: (_sum_loss(p, b), (c, [])), None, TypeError,
        r"expected a dict of metrics \(may be empty\), got list",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD_LOSS_FNS))
def test_make_train_step_says_what_a_wrong_loss_fn_return_should_be(key, case):
    loss_fn, carry, error, match = _BAD_LOSS_FNS[case]
    params = {"w": jnp.zeros(()), "gru": _GRU.init(key, 1)}
    opt = optax.sgd(0.1)
    state = train.init_state(params, opt, key, carry=carry)
    step = train.make_train_step(loss_fn, opt)
    batch = {"x": np.ones((5, 3, 1), np.float32)}  # [T, B, D]
    with pytest.raises(error, match=match):
        step(state, batch)


@pytest.mark.parametrize("chunks_per_call, precision", [(2, "fp32"), (1, "bf16")])
def test_the_loss_fn_contract_is_checked_on_every_step_path(key, chunks_per_call, precision):
    opt = optax.sgd(0.1)
    state = train.init_state({"w": jnp.zeros(())}, opt, key)
    step = train.make_train_step(
        lambda p, c, b, k: (_sum_loss(p, b), {}), opt, chunks_per_call=chunks_per_call,
        precision=precision,
    )  # fmt: skip
    batch = {"x": np.ones((chunks_per_call, 5, 3, 1), np.float32)}
    batch = batch if chunks_per_call > 1 else {"x": batch["x"][0]}
    with pytest.raises(TypeError, match=r"got \(loss, dict\) as the second element"):
        step(state, batch)
    # a carry in another dtype is stored in its own under bf16: only shapes must agree
    params = {"w": jnp.zeros(()), "gru": _GRU.init(key, 1)}
    state = train.init_state(params, opt, key, carry=_GRU.initial_carry((3,)))
    step = train.make_train_step(_gru_loss(), opt, precision="bf16")
    new, _ = step(state, {"x": np.ones((5, 3, 1), np.float32)})
    assert new.carry.h.dtype == jnp.float32
