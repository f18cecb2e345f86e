"""Tests of fit's loggers: the JSON lines (unchanged), TensorBoard, a user's own logger."""

import json
import os
import signal
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jaxseq as js
from jaxseq import training as train

_X = np.linspace(-1, 1, 8, dtype=np.float32)
_OPT = train.make_optimizer("sgd", 0.2, max_norm=None)


def _loss_fn(params, carry, batch, key):
    err = batch["x"] * params["w"] - batch["y"]
    return jnp.mean(err**2), (carry, {"abs_err": jnp.mean(jnp.abs(err)), "err": err[:2]})


_STEP = train.make_train_step(_loss_fn, _OPT)  # one compiled step for the whole file


def _state():
    return train.init_state({"w": jnp.zeros(())}, _OPT, jax.random.key(0))


def _copy(state):
    """A copy of a state (fit donates the one it is given)."""
    return jax.tree_util.tree_map(lambda x: x.copy(), state)


def _batch_of(slope=3.0):
    return lambda s: {"x": _X, "y": slope * _X}  # the batch of step s + 1


def _fit(state=None, num_steps=6, slope=3.0, **kw):
    kw.setdefault("eval_fn", lambda st: {"val_loss": float(st.params["w"])})
    return train.fit(
        _STEP, _state() if state is None else state, _batch_of(slope), num_steps=num_steps,
        progress=False, plot=False, **kw,
    )  # fmt: skip


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _scalars(log_dir, tag):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class Recorder:
    """A user's logger that keeps what it is given."""

    def __init__(self, fail_at=None):
        self.steps, self.evals, self.started, self.closed = [], [], [], 0
        self.fail_at = fail_at

    def on_start(self, step):
        self.started.append(step)

    def log_metrics(self, step, metrics):
        if step == self.fail_at:
            raise RuntimeError("the tracking service is down")
        self.steps.append((step, metrics))

    def log_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def close(self):
        self.closed += 1


class Minimal:
    """The three methods alone (no on_start)."""

    def __init__(self):
        self.seen, self.closed = [], 0

    def log_metrics(self, step, metrics):
        self.seen.append(step)

    def log_eval(self, step, metrics):
        pass

    def close(self):
        self.closed += 1


# ---- the default: metrics.jsonl and eval.jsonl as before ------------------------------


def test_out_dir_alone_writes_the_same_json_lines_as_before(tmp_path):
    _, info = train.fit(
        _STEP, _state(), _batch_of(), num_steps=6, out_dir=tmp_path, progress=False,
        eval_fn=lambda st: {"val_loss": 0.5}, eval_every=3,
    )  # fmt: skip
    recs = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    keys = ["step", "abs_err", "bad_streak", "err", "finite", "grad_norm", "loss", "lr"]
    assert list(recs[0]) == keys + ["train_s", "steps_per_s"]
    # flags stay JSON booleans and non-scalar metrics stay lists
    assert all(r["finite"] is True and len(r["err"]) == 2 for r in recs)
    assert _jsonl(tmp_path / "eval.jsonl") == [
        {"step": e["step"], "train_s": e["train_s"], "val_loss": 0.5} for e in info["evals"]
    ]
    assert [e["step"] for e in info["evals"]] == [3, 6]
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_loggers_are_added_to_the_json_lines_not_instead(tmp_path):
    rec = Recorder()
    _fit(out_dir=tmp_path, loggers=[rec, train.JsonlLogger(tmp_path)])  # out_dir's: once
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in _jsonl(tmp_path / "eval.jsonl")] == [6]
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4, 5, 6]
    # a JsonlLogger elsewhere, without out_dir: the same lines there
    _fit(loggers=[train.JsonlLogger(tmp_path / "other")])
    assert [r["step"] for r in _jsonl(tmp_path / "other" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "other" / "curves.png").exists()


# ---- a user's logger ------------------------------------------------------------------


def test_a_logger_gets_every_step_and_evaluation_as_floats_and_is_closed_once(tmp_path):
    rec, minimal = Recorder(), Minimal()
    _, info = _fit(num_steps=6, eval_every=2, out_dir=tmp_path, loggers=[rec, minimal])
    lines = _jsonl(tmp_path / "metrics.jsonl")
    assert [s for s, _ in rec.steps] == [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for (_, metrics), line in zip(rec.steps, lines):
        assert all(type(v) is float for v in metrics.values())
        # the JSON line's scalars, step and non-scalar metrics left out, flags as 1.0/0.0
        want = {k: float(v) for k, v in line.items() if k not in ("step", "err")}
        assert metrics == want and metrics["finite"] == 1.0
    assert [(s, m) for s, m in rec.evals] == [
        (e["step"], {"train_s": e["train_s"], "val_loss": e["val_loss"]}) for e in info["evals"]
    ]
    assert [s for s, _ in rec.evals] == [2, 4, 6]
    assert rec.started == [0] and rec.closed == 1
    assert minimal.seen == [1, 2, 3, 4, 5, 6] and minimal.closed == 1


def _stop_at(n, error):
    def on_step(step, record):
        if step == n:
            raise error

    return on_step


def test_a_logger_is_closed_once_when_fit_raises_or_is_preempted(tmp_path):
    rec = Recorder()
    with pytest.raises(ValueError, match="boom"):
        _fit(loggers=[rec], on_step=_stop_at(2, ValueError("boom")))
    assert [s for s, _ in rec.steps] == [1, 2] and rec.closed == 1  # logged before on_step

    rec = Recorder(fail_at=3)  # the logger itself fails: the error leaves fit, still closed
    with pytest.raises(RuntimeError, match="tracking service is down"):
        _fit(loggers=[rec])
    assert [s for s, _ in rec.steps] == [1, 2] and rec.closed == 1

    def failing(step):
        if step == 2:
            raise OSError("disk gone")
        return _batch_of()(step)

    rec = Recorder()
    with pytest.raises(train.BatchSourceError):
        train.fit(_STEP, _state(), failing, num_steps=6, progress=False, loggers=[rec])
    assert [s for s, _ in rec.steps] == [1, 2] and rec.closed == 1

    rec = Recorder()  # Ctrl-C from on_step: fit returns, the logger is closed
    _, info = _fit(loggers=[rec], on_step=_stop_at(4, KeyboardInterrupt()))
    assert info["stopped"] == "interrupted" and rec.closed == 1

    def sigterm(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    rec = Recorder()
    with pytest.raises(train.Preempted):
        _fit(loggers=[rec], on_step=sigterm)
    assert [s for s, _ in rec.steps] == [1, 2, 3] and rec.closed == 1


def test_a_close_that_raises_is_raised_after_the_others_are_closed():
    class BadClose(Minimal):
        def close(self):
            super().close()
            raise OSError("flush failed")

    bad, rec = BadClose(), Recorder()
    with pytest.raises(OSError, match="flush failed"):
        _fit(loggers=[bad, rec])
    assert bad.closed == rec.closed == 1
    # while another error leaves fit, a failing close is a warning, not a new error
    bad = BadClose()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="boom"):
            _fit(loggers=[bad], on_step=_stop_at(1, ValueError("boom")))
    assert any("flush failed" in str(w.message) for w in caught)


def test_on_resume_a_logger_gets_the_steps_after_the_restored_one(tmp_path):
    ckpt = js.Checkpointer(tmp_path / "ckpt", keep=3)
    first = Recorder()
    _fit(num_steps=6, out_dir=tmp_path, checkpointer=ckpt, checkpoint_every=3, loggers=[first])
    assert ckpt.all_steps() == [3, 6]
    restored, _ = ckpt.restore(_state(), step=3)
    again = Recorder()
    _fit(_copy(restored), num_steps=6, out_dir=tmp_path, loggers=[again])
    assert again.started == [3] and [s for s, _ in again.steps] == [4, 5, 6]
    assert [m["loss"] for _, m in again.steps] == [m["loss"] for _, m in first.steps[3:]]
    # the JSON lines hold each step once, as an uninterrupted run's
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in _jsonl(tmp_path / "eval.jsonl")] == [6]
    # a run already at num_steps logs nothing, and still closes
    done = Recorder()
    _fit(restored, num_steps=3, loggers=[done])
    assert done.steps == [] and done.evals == [] and done.closed == 1


def test_loggers_run_on_process_0_only(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    rec = Recorder()
    _fit(out_dir=tmp_path / "out", loggers=[rec])
    assert rec.steps == rec.evals == rec.started == [] and rec.closed == 0
    assert not (tmp_path / "out").exists()


def test_loggers_are_checked_before_anything_runs(tmp_path):
    class NoClose:
        def log_metrics(self, step, metrics):
            pass

        log_eval = 3  # not a method

    step = train.make_train_step(_loss_fn, _OPT)
    with pytest.raises(TypeError, match=r"loggers\[1\]: a NoClose has no method log_eval, close"):
        train.fit(step, _state(), _batch_of(), num_steps=2, loggers=[Minimal(), NoClose()])
    with pytest.raises(TypeError, match="loggers: expected a list of loggers.*got Minimal"):
        train.fit(step, _state(), _batch_of(), num_steps=2, loggers=Minimal())
    assert step.traces == 0 and not isinstance(NoClose(), train.Logger)
    assert isinstance(Minimal(), train.Logger)


# ---- TensorBoard ----------------------------------------------------------------------


def test_tensorboard_holds_the_scalars_of_every_step_and_evaluation(tmp_path):
    _, info = _fit(
        num_steps=6, eval_every=3, out_dir=tmp_path,
        loggers=[train.TensorBoardLogger(tmp_path / "tb")],
    )  # fmt: skip
    lines = _jsonl(tmp_path / "metrics.jsonl")
    for name in ("loss", "grad_norm", "lr", "abs_err", "finite", "steps_per_s"):
        got = _scalars(tmp_path / "tb", f"train/{name}")
        assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in got] == pytest.approx([float(r[name]) for r in lines], rel=1e-6)
    got = _scalars(tmp_path / "tb", "eval/val_loss")
    assert got == [(e["step"], pytest.approx(e["val_loss"], rel=1e-6)) for e in info["evals"]]
    assert [s for s, _ in got] == [3, 6]


def _tensorboard_resume(log_dir):
    """Steps 1-6, then a resume from step 3 on other data: TensorBoard shows steps 1-3
    of the first run and 4-6 of the second, each once."""
    state, _ = _fit(num_steps=3, loggers=[train.TensorBoardLogger(log_dir)])
    _fit(_copy(state), num_steps=6, loggers=[train.TensorBoardLogger(log_dir)])
    first = _scalars(log_dir, "train/loss")
    _fit(state, num_steps=6, slope=-1.0, loggers=[train.TensorBoardLogger(log_dir)])
    got = _scalars(log_dir, "train/loss")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got[:3] == first[:3] and all(a[1] != b[1] for a, b in zip(got[3:], first[3:]))
    assert [s for s, _ in _scalars(log_dir, "eval/val_loss")] == [3, 6]


def test_tensorboard_hides_what_an_earlier_run_logged_after_the_resumed_step(tmp_path):
    _tensorboard_resume(tmp_path)


def test_tensorboard_without_tensorboardx_or_torch_uses_tensorboards_writer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train.TensorBoardLogger(tmp_path)._writer_class.__name__ == "_EventWriter"
    _tensorboard_resume(tmp_path)


def test_tensorboard_without_tensorboardx_uses_torchs_writer(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert train.TensorBoardLogger(tmp_path)._writer_class.__module__.startswith("torch.")
    _tensorboard_resume(tmp_path)


def test_tensorboard_without_any_writer_says_what_to_install(monkeypatch):
    for name in (
        "tensorboardX",
        "torch.utils.tensorboard",
        "tensorboard.summary.writer.event_file_writer",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        train.TensorBoardLogger("unused")
