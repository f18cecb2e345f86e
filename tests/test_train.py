"""Tests of the training loop: TBPTT, guard, clipping, one trace, sharding.

Killed and resumed runs are in tests/test_faults.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxseq as js
from jaxseq import data
from jaxseq import training as train
from jaxseq.training import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_lm(vocab_size=7, hidden_size=8, num_layers=2, cell="lstm"):
    return js.models.char_lm(
        vocab_size, cell=cell, num_layers=num_layers, hidden_size=hidden_size, embedding_size=5
    )


def _copy(tree):
    def cp(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x, copy=True)

    return jax.tree_util.tree_map(cp, tree)


def _bits_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb)
    )


def test_tbptt_with_k_equal_t_gives_full_bptt_gradients(key):
    model = _tiny_lm(cell="gru")
    params = model.init(key)
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (3 * 13,), 0, 7))
    bt = data.StreamBatcher(ids, 3, 12)  # L=13 -> one chunk of exactly T=12 steps
    assert bt.num_chunks == 1
    streams = jnp.asarray(bt.streams)

    def full_loss(p):
        _, logits = model.apply(p, None, streams[:-1])
        return losses.cross_entropy(logits, streams[1:])

    want_loss, want = jax.jit(jax.value_and_grad(full_loss))(params)  # one compile, not eager
    opt = train.make_optimizer("sgd", 1.0, max_norm=None)  # update = -grad
    state = train.init_state(params, opt, key, model.initial_carry((3,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt, donate=False)
    new, m = step(state, bt.chunk(0))
    got = jax.tree_util.tree_map(lambda a, b: a - b, params, new.params)
    np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(want)), rtol=1e-5)


def test_tbptt_forward_losses_equal_one_full_pass_and_partial_chunk_is_masked(key):
    model = _tiny_lm()
    params = model.init(key)
    b, k = 3, 8
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (b * 27,), 0, 7))
    bt = data.StreamBatcher(ids, b, k)  # 26 steps per stream: chunks 8, 8, 8, 2
    assert bt.num_chunks == 4
    streams = jnp.asarray(bt.streams)
    carry_full, per_tok = jax.jit(
        lambda p, x: (lambda c, lg: (c, losses.token_cross_entropy(lg, x[1:])))(
            *model.apply(p, None, x[:-1])
        )
    )(params, streams)
    per_tok = np.asarray(per_tok)

    opt = train.make_optimizer("sgd", 1e-30, max_norm=None)  # updates vanish in float32
    state = train.init_state(params, opt, key, model.initial_carry((b,)))
    # the loss is traced once for every chunk, the partial one included (chex counts it)
    step = train.make_train_step(chex.assert_max_traces(train.lm_loss_fn(model), n=1), opt)
    for i in range(bt.num_chunks):
        chunk = bt.at_step(i)
        state, m = step(state, chunk)
        lo, hi = i * k, min((i + 1) * k, 26)
        np.testing.assert_allclose(float(m["loss"]), per_tok[lo:hi].mean(), rtol=2e-5)
    assert not chunk.mask[2:].any()  # the last chunk was padded ...
    for a, c in zip(jax.tree_util.tree_leaves(state.carry), jax.tree_util.tree_leaves(carry_full)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)  # ... and its padding ignored
    state, _ = step(state, bt.at_step(4))  # epoch 2: chunk 0 again, the carry is reset
    assert step.traces == 1  # one compilation for every chunk, the partial one included


def _delay_task(rng, n, k):
    """Segments [m, 0 x d, q, m]: after the query q comes the segment's marker m again.

    Most delays d are short (the marker sits in the same chunk, so the gradient
    teaches the model to hold it); 30% put the marker k+5 steps before the
    token to predict, always in an earlier chunk: reachable only through the carry.
    """
    seg = []
    for m in rng.integers(2, 4, size=n):
        d = k + 3 if rng.random() < 0.3 else int(rng.integers(0, k - 1))
        seg += [int(m)] + [0] * d + [1, int(m)]
    return np.array(seg, np.int32)


def _long_query_accuracy(apply, model, params, ids, b, k, reset_every_chunk):
    bt = data.StreamBatcher(ids, b, k, reset_every_chunk=reset_every_chunk)
    dist = np.full(bt.streams.shape, 10**6)  # steps back to the segment's marker
    for s in range(b):
        last = None
        for t, tok in enumerate(bt.streams[:, s]):
            if last is not None:
                dist[t, s] = t - last
            if tok >= 2 and (t == 0 or bt.streams[t - 1, s] != 1):
                last = t
    carry, hits, total = model.initial_carry((b,)), 0, 0
    for i in range(bt.num_chunks):
        ch = bt.chunk(i)
        carry, logits = apply(params, carry, ch.inputs, ch.reset)
        dd = dist[i * k : i * k + k]
        dd = np.pad(dd, ((0, k - dd.shape[0]), (0, 0)), constant_values=10**6)
        sel = (ch.inputs == 1) & ch.mask & (dd >= k + 4) & (dd < 10**6)
        hits += int((np.argmax(logits, -1)[sel] == ch.targets[sel]).sum())
        total += int(sel.sum())
    assert total >= 40
    return hits / total


def test_carry_crossing_chunks_makes_a_long_delay_learnable(key):
    k, b = 4, 16
    rng = np.random.default_rng(0)
    train_ids, test_ids = _delay_task(rng, 500, k), _delay_task(rng, 200, k)
    model = js.models.char_lm(4, cell="lstm", num_layers=1, hidden_size=16, embedding_size=4)
    opt = train.make_optimizer("adam", 1e-2, max_norm=1.0)
    loss_fn = chex.assert_max_traces(train.lm_loss_fn(model), n=1)  # one trace for 30 calls
    step = train.make_train_step(loss_fn, opt, chunks_per_call=10)
    apply = jax.jit(lambda p, c, x, r: model.apply(p, c, x, reset=r))
    acc = {}
    for no_carry in (False, True):
        bt = data.StreamBatcher(train_ids, b, k, reset_every_chunk=no_carry)
        state = train.init_state(model.init(key), opt, key, model.initial_carry((b,)))
        for s in range(0, 300, 10):
            state, _ = step(state, bt.stacked(s, 10))
        acc[no_carry] = _long_query_accuracy(apply, model, state.params, test_ids, 4, k, no_carry)
    assert step.traces == 1
    assert acc[False] > 0.95, acc  # the carry holds the marker across chunk boundaries
    assert acc[True] < 0.8, acc  # from zeros at every chunk: a coin flip


def test_global_norm_clipping_caps_the_update_norm():
    opt = train.make_optimizer("sgd", 1.0, max_norm=0.5)
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    big = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.ones((2, 2))}  # norm sqrt(29)
    upd, _ = opt.update(big, opt.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(upd)), 0.5, rtol=1e-6)
    small = jax.tree_util.tree_map(lambda g: g * 0.01, big)
    upd, _ = opt.update(small, opt.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(upd)), 0.01 * 29**0.5, rtol=1e-6)


def test_step_reports_the_norm_before_clipping_and_the_schedule(key):
    model = _tiny_lm(num_layers=1)
    params = model.init(key)
    bt = data.StreamBatcher(np.arange(60) % 7, 2, 6)
    opt = train.make_optimizer("adam", 1e-2, max_norm=1e-3, warmup_steps=4, total_steps=10)
    state = train.init_state(params, opt, key, model.initial_carry((2,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt, donate=False)
    _, m = step(state, bt.chunk(0))
    lf = train.lm_loss_fn(model)
    g = jax.jit(jax.grad(lambda p: lf(p, state.carry, bt.chunk(0), key)[0]))(params)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(g)), rtol=1e-5)
    assert float(m["grad_norm"]) > 1e-3  # above max_norm: clipped, yet reported raw
    assert float(m["lr"]) == 0.0  # warmup starts at 0
    lrs = []
    for _ in range(12):
        state, m = step(state, bt.chunk(0))
        lrs.append(float(m["lr"]))
    # the lr of update s: warmup to 1e-2 at s=4, cosine to 0 at s=10, 0 after
    np.testing.assert_allclose(lrs[:5], [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-6)
    np.testing.assert_allclose(lrs[10:], 0.0, atol=1e-9)
    assert lrs[4] > lrs[5] > lrs[6] > lrs[9] > 0


def _regression():
    cell = js.RNN(4)

    def loss_fn(params, carry, chunk, key):
        carry, ys = js.rollout(cell, params["cell"], chunk.inputs[..., None], carry)
        pred = js.nn.dense(params["head"], ys)[..., 0]
        return losses.mse(pred[..., None], chunk.targets[..., None], chunk.mask), (carry, {})

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"cell": cell.init(k1, 1), "head": js.nn.Dense(1).init(k2, 4)}

    return cell, loss_fn, init


def test_non_finite_batch_leaves_params_bit_identical(key):
    cell, loss_fn, init = _regression()
    opt = train.make_optimizer("adam", 1e-2)
    state = train.init_state(init(key), opt, key, cell.initial_carry((3,)))
    step = train.make_train_step(loss_fn, opt)
    x = np.ones((5, 3), np.float32)
    good = data.Chunk(x, x * 0.5, np.ones((5, 3), bool), np.zeros((5, 3), bool))
    state, _ = step(state, good)
    before = _copy(state)
    bad = good._replace(inputs=np.where(np.arange(5)[:, None] == 2, np.nan, x).astype(np.float32))
    state, m = step(state, bad)
    assert not bool(m["finite"]) and np.isnan(float(m["loss"]))
    assert _bits_equal(state.params, before.params)
    assert _bits_equal(state.opt_state, before.opt_state)
    assert _bits_equal(state.carry, before.carry)
    assert int(state.bad_steps) == 1 and int(state.bad_streak) == 1 and int(state.step) == 2
    state, m = step(state, good)
    assert bool(m["finite"]) and int(state.bad_streak) == 0 and int(state.bad_steps) == 1
    assert not _bits_equal(state.params, before.params)


def test_fit_stops_after_consecutive_non_finite_steps(key, tmp_path):
    model = _tiny_lm(num_layers=1)
    params = model.init(key)
    params = params._replace(head=params.head._replace(b=params.head.b.at[0].set(jnp.nan)))
    bt = data.StreamBatcher(np.arange(70) % 7, 2, 5)
    opt = train.make_optimizer("adam", 1e-2)
    state = train.init_state(params, opt, key, model.initial_carry((2,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt)
    with (
        pytest.warns(RuntimeWarning, match="step 1 had a non-finite"),
        pytest.raises(train.NonFiniteError, match="3 consecutive steps") as err,
    ):
        train.fit(step, state, bt, num_steps=20, max_bad_steps=3, out_dir=str(tmp_path), plot=False)
    # the causes, not only the learning rate
    for cause in ("out of range", "js.checked(step_fn)(state, batch)", "learning rate"):
        assert cause in str(err.value)
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["finite"] for r in recs] == [False] * 3


def _line_fit(bad_steps=(), num_steps=6, start=None):
    """fit on y = 3 x with NaN inputs at the given (1-based) steps; returns (state, info)."""

    def loss_fn(params, carry, batch, key):
        return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2), (carry, {})

    opt = train.make_optimizer("sgd", 0.2, max_norm=None)
    state = start or train.init_state({"w": jnp.zeros(())}, opt, jax.random.key(0))
    x = np.linspace(-1, 1, 8, dtype=np.float32)

    def batch_of(s):  # step s + 1 trains on this batch
        return {"x": np.full_like(x, np.nan) if s + 1 in bad_steps else x, "y": 3 * x}

    step = train.make_train_step(loss_fn, opt)
    return train.fit(step, state, batch_of, num_steps=num_steps, progress=False)


def test_fit_warns_once_at_the_first_skipped_step_naming_the_causes():
    with pytest.warns(RuntimeWarning) as caught:
        _, info = _line_fit(bad_steps=(3, 5))
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "step 3 had a non-finite loss or gradient and was skipped" in msgs[0]
    for cause in ("out of range", "js.checked(step_fn)(state, batch)", "learning rate"):
        assert cause in msgs[0]
    assert info["stopped"] == "steps"


def test_fit_returns_the_count_of_skipped_steps_over_the_run():
    with pytest.warns(RuntimeWarning):
        state, info = _line_fit(bad_steps=(2, 3, 6), num_steps=6)
    assert info["bad_steps"] == 3 == int(state.bad_steps)
    # a resumed call counts from step 0, as info["steps"] does
    with pytest.warns(RuntimeWarning):
        state, info = _line_fit(bad_steps=(8,), num_steps=10, start=state)
    assert (info["steps"], info["bad_steps"]) == (10, 4)
    _, info = _line_fit(num_steps=4)
    assert info["bad_steps"] == 0


_STEPS = {}  # one compiled step per chunks_per_call across the examples


@settings(max_examples=12, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=4), st.sampled_from([1, 2]))
def test_fit_counts_warns_and_fails_by_the_steps_it_skipped(bad, n):
    """Any pattern of skipped steps (under max_bad_steps): info counts them, the first
    warns naming its step, and the run fails exactly when none applied an update."""
    bad = bad * n  # a multiple of n steps, fewer than max_bad_steps=10
    steps = [s + 1 for s, b in enumerate(bad) if b]

    def loss_fn(params, carry, batch, key):
        return jnp.mean((batch["x"] * params["w"] - 1.0) ** 2), (carry, {})

    opt = train.make_optimizer("sgd", 0.1, max_norm=None)
    state = train.init_state({"w": jnp.zeros(())}, opt, jax.random.key(0))
    x = np.ones(4, np.float32)
    source = lambda s: {"x": x * np.float32(np.nan if s + 1 in steps else 1.0)}  # noqa: E731
    step = _STEPS.setdefault(n, train.make_train_step(loss_fn, opt, chunks_per_call=n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, info = train.fit(step, state, source, num_steps=len(bad), progress=False)
            failed = False
        except train.NonFiniteError as e:
            assert "applied no update" in str(e)
            failed = True
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert failed == all(bad)
    assert len(msgs) == (1 if steps else 0)
    if steps:
        assert f"step {steps[0]} had a non-finite" in msgs[0]
    if not failed:
        assert info["bad_steps"] == len(steps)


def test_fit_raises_when_every_step_was_skipped(tmp_path):
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(train.NonFiniteError, match="applied no update: all 4 steps") as err,
    ):
        _line_fit(bad_steps=range(1, 5), num_steps=4)  # fewer than max_bad_steps=10
    assert "out of range" in str(err.value) and "js.checked" in str(err.value)
    # one good step is an update: the run returns
    with pytest.warns(RuntimeWarning):
        _, info = _line_fit(bad_steps=(1, 2, 4), num_steps=4)
    assert info["stopped"] == "steps" and info["bad_steps"] == 3


def test_fit_logs_checkpoints_and_respects_bad_input_before_compiling(key, tmp_path):
    model = _tiny_lm(num_layers=1)
    bt = data.StreamBatcher(np.arange(110) % 7, 2, 6)
    opt = train.make_optimizer("adam", 1e-2)
    state = train.init_state(model.init(key), opt, key, model.initial_carry((2,)))
    step = train.make_train_step(train.lm_loss_fn(model), opt, chunks_per_call=2)
    with pytest.raises(ValueError, match=r"batch.inputs: expected a leading axis of n=2"):
        step(state, bt.chunk(0))
    with pytest.raises(ValueError, match="state.carry is for batch"):
        step(state, data.StreamBatcher(np.arange(110) % 7, 5, 6).stacked(0, 2))
    with pytest.raises(ValueError, match="multiples of chunks_per_call=2"):
        train.fit(step, state, bt, num_steps=5)
    with pytest.raises(ValueError, match="max_bad_steps: expected a positive int, got 0"):
        train.fit(step, state, bt, num_steps=4, max_bad_steps=0)
    assert step.traces == 0  # every error came before any trace
    ckpt = js.Checkpointer(tmp_path / "ckpt", keep=2)
    seen = []
    state, info = train.fit(
        step, state, bt, num_steps=12, out_dir=str(tmp_path), checkpointer=ckpt,
        checkpoint_every=4, eval_fn=lambda st: {"val_loss": 1.0}, eval_every=4,
        on_step=lambda s, m: seen.append(s),
    )  # fmt: skip
    assert step.traces == 1 and info["steps"] == 12 and seen == list(range(1, 13))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all({"loss", "grad_norm", "lr", "tokens_per_s"} <= set(r) for r in recs)
    evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert ckpt.all_steps() == [8, 12]  # keep=2
    assert (tmp_path / "curves.png").stat().st_size > 1000


_SHARDED = textwrap.dedent(
    """
    import json
    import chex

    chex.set_n_cpu_devices(8)  # before JAX starts its CPU backend; keeps the other XLA flags
    import jax, numpy as np
    import jaxseq as js

    assert jax.device_count() == 8, jax.devices()
    ids = np.random.default_rng(1).integers(0, 11, size=8 * 40).astype(np.int32)
    model = js.models.char_lm(11, num_layers=2, hidden_size=8, embedding_size=4)
    bt = js.data.StreamBatcher(ids, 8, 6)
    opt = js.make_optimizer("adam", 1e-2)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        key = jax.random.key(0)
        state = js.training.init_state(model.init(key), opt, key, model.initial_carry((8,)))
        mesh = js.training.make_mesh(devices)
        state = js.training.shard_state(state, mesh)
        step = js.make_train_step(js.training.lm_loss_fn(model), opt)
        ls = []
        for s in range(8):
            state, m = step(state, js.training.shard_batch(bt.at_step(s), mesh))
            ls.append(float(m["loss"]))
        out[name] = {"losses": ls, "carry_devices": len(state.carry[0].h.sharding.device_set),
                     "w": np.asarray(state.params.head.w).ravel().tolist()}
    print("RESULT" + json.dumps(out))
    """
)


def test_eight_simulated_devices_match_one_device(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(res["eight"]["losses"], res["one"]["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res["eight"]["w"], res["one"]["w"], rtol=1e-5, atol=1e-5)
    assert res["eight"]["carry_devices"] == 8 and res["one"]["carry_devices"] == 1


def test_adamw_decays_matrices_not_biases():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "emb": jnp.ones((5, 2))}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    for decay_biases, want_b in ((False, 1.0), (True, 1.0 - 0.1 * 0.5)):
        tx = train.make_optimizer(
            "adamw", 0.1, weight_decay=0.5, max_norm=None, decay_biases=decay_biases
        )
        upd, _ = tx.update(zeros, tx.init(params), params)
        new = optax.apply_updates(params, upd)
        np.testing.assert_allclose(new["w"], 1.0 - 0.1 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(new["emb"], 1.0 - 0.1 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(new["b"], want_b, rtol=1e-6)


def test_mesh_and_optimizer_errors():
    with pytest.raises(ValueError, match="name: expected one of"):
        train.make_optimizer("adagrad", 1e-3)
    with pytest.raises(ValueError, match="total_steps: expected more than warmup_steps"):
        train.make_optimizer("adam", 1e-3, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="weight_decay: only adamw"):
        train.make_optimizer("adam", 1e-3, weight_decay=0.1)
    mesh = train.make_mesh(jax.devices()[:1])
    with pytest.raises(TypeError, match="mesh: expected a 1-D"):
        train.shard_batch(data.StreamBatcher(np.arange(50), 2, 4).chunk(0), "mesh")
    assert mesh.axis_names == ("data",)


# -- evaluation with known answers --------------------------------------------------------


class _BigramLM:
    """A model whose logits are a table row per input token; the carry counts valid steps.

    ``apply`` follows the language-model interface ``evaluate_lm`` uses.
    """

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(batch_shape, dtype)

    def apply(self, params, carry, tokens, *, reset=None, lengths=None, key=None):
        assert key is None  # evaluation: no dropout key
        carry = jnp.where(jnp.asarray(reset)[0], 0.0, carry) + lengths.astype(jnp.float32)
        return carry, jnp.take(params, tokens, axis=0)


def test_eval_step_uniform_logits_give_log_v_per_valid_token():
    v, b, k = 6, 3, 4
    ids = np.arange(b * 11) % v  # 11 tokens per stream: 10 steps = chunks 4, 4, 2 (padded)
    bt = data.StreamBatcher(ids, b, k)
    assert bt.num_chunks == 3
    model = _BigramLM()
    ev = train.make_eval_step(model)
    params = jnp.zeros((v, v), jnp.float32)  # uniform: exactly log(V) nats per token
    last = bt.chunk(2)
    assert last.mask.sum() == 2 * b  # 2 valid steps of 4
    carry, s, c = ev(params, jnp.zeros((b,)), last)
    assert float(c) == 2 * b
    np.testing.assert_allclose(float(s), 2 * b * np.log(v), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(carry), [2.0] * b)  # lengths = valid steps
    got = train.evaluate_lm(model, params, bt)
    np.testing.assert_allclose(got, np.log(v), rtol=1e-6)


def test_evaluate_lm_equals_hand_computed_mean_over_valid_tokens():
    v, b, k = 5, 2, 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, v, size=b * 8)  # 8 per stream: 7 steps = chunks 4, 3 (padded)
    # the padded inputs/targets are token 0; make (0 -> 0) cost far more than any real pair
    table = rng.normal(size=(v, v)) * 2
    table[0] = [-30.0, 10.0, 10.0, 10.0, 10.0]
    ids = np.where(ids == 0, 1, ids)  # no real token 0, so every 0 is padding
    bt = data.StreamBatcher(ids, b, k)
    assert bt.num_chunks == 2 and not bt.chunk(1).mask.all()
    params = jnp.asarray(table, jnp.float32)
    # the reference: every (stream[t], stream[t+1]) pair once, in float64
    s = bt.streams
    lp = table - table.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    want = -lp[s[:-1], s[1:]].mean()
    got = train.evaluate_lm(_BigramLM(), params, bt)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # one chunk by hand: its sum of nats and its count of valid tokens
    ev = train.make_eval_step(_BigramLM())
    _, nats, count = ev(params, jnp.zeros((b,)), bt.chunk(1))
    assert float(count) == 3 * b
    np.testing.assert_allclose(float(nats), -lp[s[4:7], s[5:8]].sum(), rtol=1e-6)


def test_evaluate_lm_threads_the_carry_like_one_full_pass(key):
    model = _tiny_lm(num_layers=1)
    params = model.init(key)
    b, k = 2, 5
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 4), (b * 18,), 0, 7))
    bt = data.StreamBatcher(ids, b, k)  # 17 steps: chunks 5, 5, 5, 2
    streams = jnp.asarray(bt.streams)
    # per-token losses of a fresh pass, compiled once per length (not op by op)
    nll = jax.jit(lambda x, y: losses.token_cross_entropy(model.apply(params, None, x)[1], y))
    want = float(np.mean(nll(streams[:-1], streams[1:])))
    np.testing.assert_allclose(train.evaluate_lm(model, params, bt), want, rtol=1e-5)
    # with the carry reset at every chunk the answer is that of separate windows
    bt_r = data.StreamBatcher(ids, b, k, reset_every_chunk=True)
    parts = []
    for i in range(bt_r.num_chunks):
        ch = bt_r.chunk(i)
        n = int(ch.mask[:, 0].sum())
        parts.append(np.asarray(nll(jnp.asarray(ch.inputs[:n]), jnp.asarray(ch.targets[:n]))))
    want_r = float(np.concatenate(parts).mean())
    np.testing.assert_allclose(train.evaluate_lm(model, params, bt_r), want_r, rtol=1e-5)
    assert abs(want_r - want) > 1e-4


def test_evaluate_lm_on_a_one_device_mesh_equals_no_mesh():
    v, b, k = 5, 2, 4
    rng = np.random.default_rng(1)
    bt = data.StreamBatcher(rng.integers(1, v, size=b * 8), b, k)  # chunks 4, 3 (padded)
    params = jnp.asarray(rng.normal(size=(v, v)) * 2, jnp.float32)
    want = train.evaluate_lm(_BigramLM(), params, bt)
    mesh = train.make_mesh(jax.devices()[:1])
    got = train.evaluate_lm(_BigramLM(), params, bt, mesh=mesh)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_train_step_lower_compiles_to_the_same_step(key):
    cell, loss_fn, init = _regression()
    opt = train.make_optimizer("sgd", 1e-2)
    state = train.init_state(init(key), opt, key, cell.initial_carry((3,)))
    step = train.make_train_step(loss_fn, opt, donate=False)
    x = np.linspace(-1.0, 1.0, 15, dtype=np.float32).reshape(5, 3)
    chunk = data.Chunk(x, x * 0.5, np.ones((5, 3), bool), np.zeros((5, 3), bool))
    lowered = step.lower(state, chunk)
    assert isinstance(lowered, jax.stages.Lowered) and step.traces == 1
    new_c, m_c = lowered.compile()(state, chunk)
    new, m = step(state, chunk)
    assert _bits_equal(_copy(new_c), _copy(new)) and _bits_equal(m_c, m)
    assert int(new.step) == 1 and not _bits_equal(new.params, state.params)


def test_init_state_and_make_train_step_errors_name_the_argument():
    opt = train.make_optimizer("sgd", 1e-2)
    params = {"w": jnp.zeros((2, 2))}
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key"):
        train.init_state(params, opt, None)
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key"):
        train.init_state(params, opt, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"^optimizer: expected an optax.GradientTransformation"):
        train.init_state(params, "sgd", jax.random.key(0))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"^chunks_per_call: expected a positive int"):
            train.make_train_step(lambda *a: None, opt, chunks_per_call=bad)


def test_make_optimizer_defaults_and_adam_moments_are_honoured():
    opt = train.make_optimizer()  # documented defaults: adam, learning rate 1e-3
    params = {"w": jnp.zeros(3)}
    np.testing.assert_allclose(float(opt.init(params).hyperparams["learning_rate"]), 1e-3)
    grads = [{"w": jnp.array([0.1, -0.2, 0.05])}, {"w": jnp.array([-0.3, 0.1, 0.2])}]
    for kw in ({}, {"b2": 0.5}):
        opt = train.make_optimizer("adam", 1e-2, **kw)
        ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2, **kw))
        s_opt, s_ref = opt.init(params), ref.init(params)
        for g in grads:  # grad norms < 1: the clip is a no-op
            u, s_opt = opt.update(g, s_opt, params)
            r, s_ref = ref.update(g, s_ref, params)
        np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6)


def test_warmup_stable_decay_schedule_follows_its_formula():
    # written from the definition: linear warmup, the peak, then 1 - sqrt(progress) down
    # to the final value over the last cooldown_steps, constant after total_steps
    peak, warmup, total, cooldown, final = 2e-3, 5, 40, 10, 0.1

    def want(c):
        if c < warmup:
            return peak * c / warmup
        p = min(max((c - (total - cooldown)) / cooldown, 0.0), 1.0)
        return peak * final + (peak - peak * final) * (1.0 - p**0.5)

    opt = train.make_optimizer(
        "adamw", peak, warmup_steps=warmup, total_steps=total, cooldown_steps=cooldown,
        final_lr_ratio=final, weight_decay=0.1,
    )  # fmt: skip
    params = {"w": jnp.zeros((2, 2))}
    state = opt.init(params)
    got = []
    for _ in range(total + 5):  # the state holds the lr of the update just applied
        _, state = opt.update({"w": jnp.ones((2, 2))}, state, params)
        got.append(float(state.hyperparams["learning_rate"]))
    np.testing.assert_allclose(got, [want(c) for c in range(total + 5)], rtol=1e-5, atol=1e-12)
    assert got[warmup] == got[total - cooldown] == pytest.approx(peak)  # the stable part
    assert got[total - cooldown + 1] < peak and got[-1] == pytest.approx(peak * final)
    for kw, msg in (
        ({"cooldown_steps": 0}, r"^cooldown_steps: expected a positive int"),
        ({"cooldown_steps": 36}, r"^cooldown_steps: expected at most total_steps - warmup"),
        ({"cooldown_steps": 3, "total_steps": None}, r"^cooldown_steps: the end of a run"),
    ):
        kwargs = {"warmup_steps": warmup, "total_steps": total, **kw}
        with pytest.raises(ValueError, match=msg):
            train.make_optimizer("adam", peak, **kwargs)


def test_donating_train_step_consumes_the_input_state(key):
    cell, loss_fn, init = _regression()
    opt = train.make_optimizer("sgd", 1e-2)
    state = train.init_state(init(key), opt, key, cell.initial_carry((3,)))
    x = np.ones((5, 3), np.float32)
    chunk = data.Chunk(x, x * 0.5, np.ones((5, 3), bool), np.zeros((5, 3), bool))
    new, _ = train.make_train_step(loss_fn, opt)(state, chunk)  # donate=True by default
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(new.params))
