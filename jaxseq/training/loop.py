"""The training loop for any task: time budget, checkpoints, loggers (JSON lines,
TensorBoard, your own), progress bar, evaluation.

Batch sources, in the order :func:`fit` looks for them:

- an object with ``at_step(step) -> batch`` (resumable: the batch of global
  step s is always the same; :class:`jaxseq.data.StreamBatcher`,
  :class:`jaxseq.data.SeriesBatcher`, :class:`jaxseq.data.PaddedBatcher`).
  With ``chunks_per_call=n`` fit uses its ``stacked(step, n)`` when it has
  one, else stacks n batches of ``at_step``;
- a callable ``step -> batch`` (resumable the same way);
- any other iterable of batches, consumed in order from where it stands
  (with ``chunks_per_call=n``, n at a time). On resume nothing is skipped: the
  first batch drawn trains step ``state.step``. To resume at the same data
  position, pass an iterator advanced by ``state.step`` batches (e.g.
  ``itertools.islice(make_batches(), int(state.step), None)``). A run whose
  iterable runs out stops early with ``info["stopped"] == "data"``.

Steps count the whole run: ``num_steps`` is the total, not the number still
to do, so a run restored at step s continues to ``num_steps``; a larger
``num_steps`` than the first run's extends it (see
:func:`jaxseq.training.make_optimizer` for what a schedule does past its
``total_steps``), and a ``num_steps`` already reached returns at once.

**Several processes** (after :func:`jaxseq.training.init_distributed`): every
process runs the same ``fit`` with the same arguments. The mesh (``mesh``, by
default :func:`jaxseq.training.make_mesh` over every process's devices) holds
the global arrays: the state is placed on it (params and optimizer state
replicated, the carry split by stream) unless it already is, and each process
feeds its own rows of every batch (its streams, its examples) through
:func:`jaxseq.training.shard_batch`. The source gives the whole batch, the same
on every process, or with ``local_batches=True`` only this process's rows.
Checkpoints are written and restored by all processes together; the loggers (the
JSON lines), the plot and the progress bar come from process 0 alone; ``eval_fn`` and
``on_step`` run on every process (an evaluation over the mesh is collective too).
The time budget is process 0's (it decides for all); an iterable source must
yield the same number of batches on every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxseq import _checks
from jaxseq.training.checkpoint import _short
from jaxseq.training.loggers import JsonlLogger, Logger, _check_loggers, _scalars
from jaxseq.training.sharding import _is_global, make_mesh, replicate, shard_batch, shard_state
from jaxseq.training.step import TrainState, TrainStep

__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "PROCESS_LOST_EXIT_STATUS",
    "BatchSourceError",
    "NonFiniteError",
    "Preempted",
    "fit",
]

PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM: what a shell reports for a process SIGTERM ended
PROCESS_LOST_EXIT_STATUS = 75  # EX_TEMPFAIL: a temporary failure, to be retried (resumed)


class NonFiniteError(RuntimeError):
    """Raised by :func:`fit` when the non-finite guard keeps skipping steps.

    After ``max_bad_steps`` consecutive skipped steps, or at the end of a call in
    which every step was skipped (no update applied). The message names the
    likely causes: a label or token id out of range (NaN under ``jit``; found by
    running a step under :func:`jaxseq.checked`), NaN or Inf in the data, or a
    learning rate too high.

    >>> import jaxseq as js
    >>> issubclass(js.NonFiniteError, RuntimeError)
    True
    """


class Preempted(SystemExit):
    """Raised by :func:`fit` after a preemption notice, once the state is checkpointed.

    A notice is SIGTERM (what SLURM, Kubernetes and preemptible or spot VMs send
    before they stop a job; with several processes, the notice JAX's distributed
    runtime spreads to all of them). ``fit`` finishes the call in flight, writes a
    checkpoint at that step (every process at the same step), logs it and raises
    this. It is a ``SystemExit`` with ``code`` :data:`PREEMPTED_EXIT_STATUS` (143),
    so a script that does not catch it exits with that status; ``step`` is the step
    reached and ``checkpoint_step`` the step of the checkpoint written (None without
    a checkpointer). Resuming from that checkpoint continues with exactly the losses
    of an uninterrupted run.

    >>> import jaxseq as js
    >>> e = js.training.Preempted(12, 12)
    >>> isinstance(e, SystemExit), e.code, e.step, e.checkpoint_step
    (True, 143, 12, 12)
    """

    def __init__(self, step: int, checkpoint_step: int | None):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.step = step
        self.checkpoint_step = checkpoint_step

    def __str__(self) -> str:
        saved = (
            f"checkpoint at step {self.checkpoint_step}"
            if self.checkpoint_step is not None
            else "no checkpointer, nothing saved"
        )
        return f"preempted (SIGTERM) at step {self.step}; {saved}"


class BatchSourceError(RuntimeError):
    """Raised by :func:`fit` when the batch source raises; the original is its ``__cause__``.

    ``step`` is the step whose batch could not be made (1-based, as in the logs);
    the state after the step before it, the last good one, is checkpointed first
    (on one process; with several, the others are already waiting in the step's
    collectives, so nothing is saved and the run resumes from its last periodic
    checkpoint).

    >>> import jaxseq as js
    >>> issubclass(js.training.BatchSourceError, RuntimeError)
    True
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _Preemption:
    """Whether a preemption notice has come, agreed by every process.

    One process: a SIGTERM handler (installed while ``fit`` runs, from the main
    thread) sets a flag. Several: JAX's preemption sync manager, which catches
    SIGTERM on any process and names one step at which all of them stop (a Python
    handler would replace its own); when it is disabled, the handler's flags are
    gathered from all processes every step."""

    def __init__(self, multi: bool):
        self.multi = multi
        self.flag = False
        self.installed = False
        # with several processes, JAX's preemption service (on unless turned off) has
        # its own SIGTERM handler, which a Python one would replace
        self.sync = multi and bool(jax.config.jax_enable_preemption_service)  # type: ignore[attr-defined]
        if not self.sync and threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._handler)
            self.installed = True

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def requested(self, call: int) -> bool:
        """Whether to stop after call number ``call`` (the same on every process)."""
        if not self.multi:
            return self.flag
        from jax.experimental import multihost_utils

        if self.sync:
            return bool(multihost_utils.reached_preemption_sync_point(call))
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))

    def close(self) -> None:
        if self.installed:
            previous = self.previous if self.previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            self.installed = False


class _Beats:
    """Signs of life between the processes of a multi-process run, through the
    distributed runtime's key-value store: every process counts up its own key twice a
    second from a thread and watches the next process's (a ring), so a process whose
    count stops is named even while the others wait in a collective that never ends.
    A process that leaves ``fit`` writes "done" instead, which is not a death."""

    PERIOD_S = 0.5

    def __init__(self, run, silent_s: float):
        from orbax.checkpoint import multihost

        self.run = run
        self.client = multihost.get_jax_distributed_client()
        self.me, self.n = jax.process_index(), jax.process_count()
        self.watched = (self.me + 1) % self.n
        self.silent_s = silent_s
        self.count = 0
        self.stop = threading.Event()
        self._beat()
        self.thread = threading.Thread(target=self._run, name="jaxseq-beats", daemon=True)
        self.thread.start()

    def _key(self, j: int) -> str:
        return f"jaxseq/beat/{j}"

    def _beat(self, value: str | None = None) -> None:
        value = str(self.count) if value is None else value
        self.client.key_value_set(self._key(self.me), value, allow_overwrite=True)

    def _get(self, j: int):
        """Process ``j``'s count, None before its first; raises when the store is gone."""
        try:
            return self.client.key_value_try_get(self._key(j))
        except Exception as e:  # noqa: BLE001
            if "NOT_FOUND" in str(e):
                return None
            raise

    def _run(self) -> None:
        seen, since = None, time.monotonic()
        while not self.stop.wait(self.PERIOD_S):
            self.count += 1
            try:
                self._beat()
                now_seen = self._get(self.watched)
            except Exception as e:  # noqa: BLE001 - the store is gone with process 0
                if not self.stop.is_set() and self.me != 0:
                    _exit_process_lost(self.run, e, [0])
                return
            now = time.monotonic()
            if now_seen == "done" or seen == "done":  # it left fit: beat on, stop watching
                seen = "done"
                continue
            if now_seen != seen or seen is None:
                seen, since = now_seen, now
            elif now - since > self.silent_s and not self.stop.is_set():
                reason = f"its count has not moved for {now - since:.1f} s"
                _exit_process_lost(self.run, reason, [self.watched])
                return

    def lost(self, wait_s: float = 4 * PERIOD_S, limit_s: float = 20.0) -> list[int]:
        """The processes whose count stops over ``wait_s`` (``[0]`` when the store
        itself, which process 0 holds, cannot be reached); empty when none is found
        within ``limit_s``."""
        found: list[int] = []
        others = [j for j in range(self.n) if j != self.me]

        def probe():
            try:
                first = {j: self._get(j) for j in others}
                time.sleep(wait_s)
                second = {j: self._get(j) for j in others}
            except Exception:  # noqa: BLE001
                found.append(0)
                return
            found.extend(j for j in others if first[j] == second[j] != "done")

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(limit_s)
        return sorted(j for j in set(found) if j != self.me)

    def close(self) -> None:
        self.stop.set()
        try:
            self._beat("done")
        except Exception:  # noqa: BLE001 - nothing to tell a store that is gone
            pass


_EXITING = threading.Lock()


def _exit_process_lost(run, error, lost=None) -> None:
    """A process of a multi-process run is gone (a collective failed, or the watch
    saw its count stop): names it, says where to resume, and ends this process (the
    distributed runtime's own teardown would wait on the lost process or abort)."""
    if not _EXITING.acquire(blocking=False):  # the other thread is already at it
        time.sleep(60)
        os._exit(PROCESS_LOST_EXIT_STATUS)
    if lost is None:
        lost = run.beats.lost() if run.beats is not None else []
    who = (
        "process " + ", ".join(map(str, lost)) + (" is" if len(lost) == 1 else " are") + " gone"
        if lost
        else "another process is gone"
    )
    me, n = jax.process_index(), jax.process_count()
    resume = (
        f"the last complete checkpoint is step {run.last_saved}"
        if run.checkpointer is not None and run.last_saved > 0
        else "there is no checkpoint to resume from"
    )
    if isinstance(error, BaseException):
        text = _short(error, 300)
        how = f"an operation with the others failed at step {run.info['steps']} ({type(error).__name__}: {text})"
    else:
        how = f"{error}, at step {run.info['steps']}"
    print(
        f"fit: process {me} of {n}: {who} (killed, out of memory or its host lost): "
        f"{how}. Exiting with status {PROCESS_LOST_EXIT_STATUS}; restart every process to "
        f"resume: {resume}.",
        file=sys.stderr,
        flush=True,
    )
    for logger in run.loggers:
        flush = getattr(logger, "flush", None)
        if callable(flush):
            try:
                flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
    os._exit(PROCESS_LOST_EXIT_STATUS)


_CAUSES = (
    "Likely causes: a label or token id out of range (under jit an out-of-range id gives NaN, "
    "not an error: run one step under js.checked(step_fn)(state, batch) to find it), NaN or "
    "Inf in the data, or a learning rate too high (lower it, or clip the gradient norm)."
)


def _stack(batches):
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


class _Source:
    """One interface over the three kinds of batch source: ``get(step, n)``."""

    def __init__(self, batches, n: int):
        self.obj = batches
        self.n = n
        self.iterator: Any = None  # iter(batches) when kind is "iterable"
        if hasattr(batches, "at_step"):
            self.kind = "at_step"
        elif callable(batches):
            self.kind = "callable"
        elif isinstance(batches, Iterable) and not isinstance(batches, str | bytes | dict):
            self.kind = "iterable"
            self.iterator = iter(batches)
        else:
            raise TypeError(
                "batches: expected an object with at_step(step), a function step -> batch, or "
                f"an iterable of batches, got {type(batches).__name__}"
            )

    def get(self, step: int):
        """The batch (stacked ``[n, ...]`` when n > 1) of steps step..step+n-1, or None at the end."""
        n = self.n
        if self.kind == "at_step":
            if n == 1:
                return self.obj.at_step(step)
            if hasattr(self.obj, "stacked"):
                return self.obj.stacked(step, n)
            return _stack([self.obj.at_step(step + j) for j in range(n)])
        if self.kind == "callable":
            if n == 1:
                return self.obj(step)
            return _stack([self.obj(step + j) for j in range(n)])
        got = list(itertools.islice(self.iterator, n))
        if len(got) < n:
            return None
        return got[0] if n == 1 else _stack(got)

    def position(self, step: int):
        pos = getattr(self.obj, "position", None)
        return list(pos(step)) if callable(pos) else None

    def batch_axes(self):
        return getattr(self.obj, "batch_axes", 1)


def _count_tokens(batch, n: int):
    """Entries of the batch's ``mask`` (a field or key), per step; None when it has none."""
    mask = batch.get("mask") if isinstance(batch, dict) else getattr(batch, "mask", None)
    if mask is None or not hasattr(mask, "shape"):
        return None
    return int(np.prod(np.shape(mask))) // n


def _shift_axes(axes, by: int):
    return jax.tree_util.tree_map(lambda a: a + by, axes)


SPLITS = ("batch", "time")


def _auto_axes(mesh):
    """``mesh`` with Auto axes (None stays None): batches split along ``T`` on it leave
    XLA's partitioner to split the pointwise parts (an embedding lookup of ids split
    over an Explicit axis would need an ``out_sharding``); the stack's rollout splits
    ``T`` over the model's own mesh either way."""
    if mesh is None:
        return None
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _time_axes(axes):
    """The time axis of each field from its batch axis (``split="time"``): the axis just
    before it, as in time-major ``[T, B, ...]`` fields; a field whose batch axis is 0
    (no time axis before it: lengths, per-example labels) is a ``ValueError``."""

    def time_axis(a):
        if isinstance(a, bool) or not isinstance(a, int | np.integer) or a < 1:
            raise ValueError(
                "split: 'time' splits the time axis of time-major fields ([T, B, ...], "
                "batch_axes 1), so every field needs a batch axis >= 1; the batch source's "
                f"batch_axes are {axes!r}: use split='batch' for a source with per-example "
                "fields"
            )
        return int(a) - 1

    return jax.tree_util.tree_map(time_axis, axes)


def _silent_s() -> float:
    """Seconds without a sign of life after which a process counts as lost: a third of
    the runtime's heartbeat timeout (so this names it before the runtime's own abort),
    at least 2."""
    from jaxseq.training import distributed

    return max(2.0, distributed.heartbeat_timeout_s() / 3)


def _out_of_time(local: bool, multi: bool) -> bool:
    """Whether to stop for time: with several processes, process 0 decides for all (their
    clocks differ, and a process that stopped alone would leave the others waiting)."""
    if not multi:
        return local
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(local)))


def _tqdm(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


def _check_fit_args(step_fn, state, batches, num_steps, checkpoint_every):
    """Validates fit's arguments; returns ``(num_steps, source, start step)``."""
    num_steps = _checks.check_positive_int("num_steps", num_steps)
    if not isinstance(step_fn, TrainStep):
        raise TypeError(
            f"step_fn: expected a TrainStep (make_train_step), got {type(step_fn).__name__}"
        )
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
    n = step_fn.chunks_per_call
    source = _Source(batches, n)
    start = int(state.step)
    if num_steps % n or start % n:
        raise ValueError(
            f"num_steps: {num_steps} (and the start step {start}) must be multiples of "
            f"chunks_per_call={n}"
        )
    if checkpoint_every and checkpoint_every % n:
        raise ValueError(
            f"checkpoint_every: {checkpoint_every} must be a multiple of chunks_per_call={n}"
        )
    return num_steps, source, start


def _run_loggers(loggers: list, out_dir, main: bool) -> list:
    """The loggers of this process: none off process 0; on it, a :class:`JsonlLogger`
    in ``out_dir`` (unless ``loggers`` holds one there) before the given ones."""
    if not main:
        return []
    if out_dir is not None:
        where = os.path.abspath(os.fspath(out_dir))
        mine = [g for g in loggers if isinstance(g, JsonlLogger)]
        if not any(os.path.abspath(g.out_dir) == where for g in mine):
            loggers = [JsonlLogger(out_dir), *loggers]
    return loggers


def _close_loggers(loggers: list, raising: bool) -> None:
    """Closes every logger; the first error of a ``close`` is raised after all are closed
    (a warning instead while another exception leaves fit, which it would hide)."""
    errors = []
    for logger in loggers:
        try:
            logger.close()
        except Exception as e:  # noqa: BLE001 - close the others first
            errors.append((logger, e))
    for k, (logger, error) in enumerate(errors):
        if k == 0 and not raising:
            continue
        warnings.warn(f"fit: {logger!r}.close() raised {type(error).__name__}: {error}",
                      RuntimeWarning, stacklevel=5)  # the caller of fit  # fmt: skip
    if errors and not raising:
        raise errors[0][1]


@contextlib.contextmanager
def _closing(loggers: list):
    """Closes the loggers when fit ends: on a return, an exception or a preemption."""
    try:
        yield
    except BaseException:
        _close_loggers(loggers, raising=True)
        raise
    _close_loggers(loggers, raising=False)


@dataclasses.dataclass
class _Run:
    """One call of :func:`fit`: the state it advances, its counters, logs and bar."""

    step_fn: TrainStep
    source: _Source
    state: TrainState
    start: int
    num_steps: int
    info: dict
    elapsed_s: float
    max_seconds: float | None
    multi: bool
    main: bool
    mesh: Any
    local_batches: bool
    split: str
    checkpointer: Any
    checkpoint_every: int
    checkpoint_meta: Callable | None
    eval_fn: Callable | None
    eval_every: int
    loggers: list
    max_bad_steps: int
    on_step: Callable | None
    bar: Any = None
    tokens_run: int = 0
    tps: float | None = None
    sps: float = 0.0
    skipped: int = 0  # non-finite steps of this call
    last_saved: int = -1
    preemption: Any = None
    beats: Any = None

    def __post_init__(self):
        self.n = self.step_fn.chunks_per_call
        axes = self.source.batch_axes()
        self.batch_mesh = self.mesh
        if self.split == "time":
            axes = _time_axes(axes)
            self.batch_mesh = _auto_axes(self.mesh)
        self.axes = axes if self.n == 1 else _shift_axes(axes, 1)
        self.last_saved = self.start

    def save(self, st) -> None:
        if self.checkpointer is not None:
            meta = {"train_s": self.info["train_s"]}
            pos = self.source.position(int(st.step))
            if pos is not None:
                meta["data_position"] = pos
            if self.checkpoint_meta is not None:
                meta.update(self.checkpoint_meta(st))
            self.checkpointer.save(st, meta)

    def run_eval(self, st) -> None:
        if self.eval_fn is None:
            return
        rec = {"step": int(st.step), "train_s": round(self.info["train_s"], 3), **self.eval_fn(st)}
        self.info["evals"].append(rec)
        for logger in self.loggers:  # JSON lines: the record as it is; the others: floats
            if isinstance(logger, JsonlLogger):
                logger.log_eval(rec["step"], {k: v for k, v in rec.items() if k != "step"})
            else:
                logger.log_eval(rec["step"], _scalars(rec))
        self.bar.set_postfix_str(f"val {rec.get('val_loss', float('nan')):.4f}", refresh=False)

    def train(self) -> str:
        """Runs the steps; returns why they stopped ("steps", "time", "data",
        "interrupted", "preempted")."""
        stopped = "steps"
        self.preemption = _Preemption(self.multi)
        try:
            stopped = self._loop()
            if stopped != "preempted":
                self.run_eval(self.state)
        except KeyboardInterrupt:
            stopped = "interrupted"
        except NonFiniteError:
            self.save(self.state)
            raise
        finally:
            self.preemption.close()
            self.bar.close()
        return stopped

    def _loop(self) -> str:
        step = self.start
        while step < self.num_steps:
            if self.max_seconds is not None and _out_of_time(
                self.info["train_s"] >= self.max_seconds, self.multi
            ):
                return "time"
            t0 = time.perf_counter()
            batch = self._batch(step)
            if batch is None:
                return "data"
            metrics, tokens = self._call(batch)
            # One truth for the step count from here on: ``state`` has taken these n
            # steps, so ``info["steps"]`` (and a checkpoint saved on any exit, e.g. an
            # interrupt raised by ``on_step`` below) says so too.
            first = step
            step += self.n
            self.info["steps"] = step
            metrics = jax.device_get(metrics)
            self.info["train_s"] += time.perf_counter() - t0
            recs = self._records(metrics, first, step, tokens)
            self._count_skipped(recs)
            self._report(recs)
            self._check_streak(recs[-1], step)
            if self.preemption.requested(step // self.n):
                return "preempted"  # the exit checkpoint is written by finish
            if self.eval_every and step % self.eval_every == 0 and step < self.num_steps:
                self.run_eval(self.state)
            if self.checkpoint_every and step % self.checkpoint_every == 0:
                self.save(self.state)
                self.last_saved = step
        return "steps"

    def _batch(self, step: int):
        """The batch (stacked: n) after ``step``; an exception from the source is
        re-raised as :class:`BatchSourceError` once the last good state is saved."""
        try:
            return self.source.get(step)
        except Exception as e:  # noqa: BLE001 - any failure of the user's source
            saved = None
            if self.checkpointer is not None and not self.multi:
                try:
                    if step != self.last_saved:
                        self.save(self.state)
                        self.last_saved = step
                    saved = step
                except Exception as save_error:  # noqa: BLE001 - keep the source's error
                    print(f"fit: no checkpoint after the batch source failed ({save_error})",
                          file=sys.stderr)  # fmt: skip
            kept = (
                f"the state after step {step} is in the checkpoint of step {saved}"
                if saved is not None
                else "nothing was saved"
                + (" (several processes: the others wait in the step)" if self.multi else "")
            )
            raise BatchSourceError(
                f"fit: the batch source raised {type(e).__name__} making the batch of step "
                f"{step + 1}: {e}; {kept}",
                step + 1,
            ) from e

    def _call(self, batch):
        """Runs the step on one batch (stacked: n); returns its metrics and tokens per step."""
        tokens = _count_tokens(batch, self.n)
        if tokens is not None and self.multi and self.local_batches:
            tokens *= jax.process_count()
        if self.mesh is not None:
            batch = shard_batch(batch, self.batch_mesh, self.axes, local=self.local_batches)
        self.state, metrics = self.step_fn(self.state, batch)
        return metrics, tokens

    def _records(self, metrics, first: int, step: int, tokens) -> list:
        """One JSON-ready record per step of the last call: its metrics, time and rates."""
        n = self.n
        run_s = max(self.info["train_s"] - self.elapsed_s, 1e-9)
        self.sps = (step - self.start) / run_s
        if tokens is not None:
            self.tokens_run += n * tokens
            self.tps = self.tokens_run / run_s
        recs = []
        for j in range(n):
            rec: dict = {"step": first + j + 1}
            for k, v in metrics.items():
                v = np.asarray(v)[j] if n > 1 else np.asarray(v)
                rec[k] = bool(v) if v.dtype == bool else (float(v) if v.ndim == 0 else v.tolist())
            rec["train_s"] = round(self.info["train_s"], 4)
            rec["steps_per_s"] = round(self.sps, 3)
            if self.tps is not None:
                rec["tokens_per_s"] = round(self.tps, 1)
            recs.append(rec)
        return recs

    def _count_skipped(self, recs) -> None:
        """Counts the steps the non-finite guard skipped; warns at the first of the call."""
        bad = [r["step"] for r in recs if not r["finite"]]
        if bad and not self.skipped and self.main:
            warnings.warn(
                f"fit: step {bad[0]} had a non-finite loss or gradient and was skipped (params, "
                f"optimizer state and carry kept). {_CAUSES}",
                RuntimeWarning,
                stacklevel=5,  # the caller of fit
            )
        self.skipped += len(bad)

    def _report(self, recs) -> None:
        """Writes the records to the loggers, the bar and ``on_step``."""
        self._log(recs)  # the logs hold every step before any callback runs
        self.bar.update(self.n)
        if self.on_step is not None:
            for r in recs:
                self.on_step(r["step"], r)
        if self.tps is not None:
            rate = {"tok_s": f"{self.tps:,.0f}"}
        else:
            rate = {"step_s": f"{self.sps:,.1f}"}
        self.bar.set_postfix(loss=f"{recs[-1]['loss']:.4f}", **rate, refresh=False)

    def _log(self, recs) -> None:
        """Each record to each logger: a :class:`JsonlLogger` writes the records as they
        are (bools, lists) in one write; the others get the scalars as floats."""
        floats = None
        for logger in self.loggers:
            if isinstance(logger, JsonlLogger):
                logger.log_records(recs)
                continue
            if floats is None:
                floats = [(r["step"], _scalars(r)) for r in recs]
            for step, metrics in floats:
                logger.log_metrics(step, dict(metrics))

    def _check_streak(self, rec, step: int) -> None:
        if rec["bad_streak"] >= self.max_bad_steps:
            raise NonFiniteError(
                f"training stopped: {int(rec['bad_streak'])} consecutive steps with a "
                f"non-finite loss or gradient (last at step {step}); params and optimizer "
                f"state are those of the last finite step. {_CAUSES} Or raise max_bad_steps."
            )

    def finish(self, stopped: str) -> dict:
        """Saves the exit checkpoint and completes ``info`` (rates, ``bad_steps``)."""
        info = self.info
        info["stopped"] = stopped
        if info["steps"] != self.last_saved:
            try:
                self.save(self.state)
                self.last_saved = info["steps"]
            except RuntimeError as e:  # interrupted inside a call that had donated the state
                if stopped != "interrupted":
                    raise
                print(f"fit: no checkpoint at exit ({e})", file=sys.stderr)
        done = info["steps"] - self.start
        run_s = max(info["train_s"] - self.elapsed_s, 1e-9)
        info["steps_per_s"] = done / run_s if done else 0.0
        info["tokens_per_s"] = self.tokens_run / run_s if done else 0.0
        info["bad_steps"] += self.skipped
        return info

    def check_some_update(self, stopped: str) -> None:
        """Raises :class:`NonFiniteError` when every step of the call was skipped."""
        done = self.info["steps"] - self.start
        if done and self.skipped == done and stopped not in ("interrupted", "preempted"):
            raise NonFiniteError(
                f"training applied no update: all {done} steps of this run (steps "
                f"{self.start + 1} to {self.info['steps']}) had a non-finite loss or gradient "
                f"and were skipped, so the params are those it started with. {_CAUSES}"
            )


def fit(
    step_fn: TrainStep,
    state: TrainState,
    batches,
    *,
    num_steps: int,
    max_seconds: float | None = None,
    elapsed_s: float = 0.0,
    out_dir=None,
    checkpointer=None,
    checkpoint_every: int = 0,
    checkpoint_meta: Callable[[TrainState], dict] | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    eval_every: int = 0,
    max_bad_steps: int = 10,
    mesh=None,
    split: str = "batch",
    progress: bool | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    plot: bool = True,
    local_batches: bool = False,
    loggers: Iterable[Logger] | None = None,
):
    """Trains until ``state.step == num_steps`` (or the time budget is spent).

    Args:
      step_fn: from :func:`make_train_step`.
      state: the start state (fresh, or restored from a checkpoint).
      batches: the batch source: an object with ``at_step(step)``, a function
        ``step -> batch`` or an iterable of batches (see the module docstring;
        the data position of an ``at_step`` source is ``state.step``).
      num_steps: the total number of steps of the run (not the number still to do).
      max_seconds: stop once the training time (eval and checkpoint time excluded)
        reaches this, counting ``elapsed_s`` already spent by an earlier run.
      out_dir: writes ``metrics.jsonl`` (one line per step: step, the step's metrics
        (loss, grad_norm, lr, finite, ...), train_s, steps_per_s, and tokens_per_s
        when the batch has a ``mask``: its entries per step, padding included),
        ``eval.jsonl`` (a :class:`jaxseq.training.JsonlLogger`, there whatever
        ``loggers`` holds) and ``curves.png``. On resume, lines after ``state.step``
        are dropped, so the log matches an uninterrupted run.
      checkpointer: a :class:`jaxseq.Checkpointer`; saves every
        ``checkpoint_every`` steps and at exit (also on Ctrl-C, a preemption notice,
        a failing batch source and a non-finite stop).
      checkpoint_meta: extra JSON metadata for each checkpoint, from the state.
      eval_fn: ``state -> dict`` of metrics (e.g. ``{"val_loss": ...}``), every
        ``eval_every`` steps and at the end.
      max_bad_steps: consecutive non-finite steps that stop training
        (:class:`NonFiniteError`). The first step the non-finite guard skips
        gives a ``RuntimeWarning`` naming the likely causes, and a run in which
        every step was skipped (no update applied) raises :class:`NonFiniteError`
        at its end instead of returning.
      mesh: when given, batches are split over it with :func:`shard_batch` along
        the source's ``batch_axes`` (1, time-major, when it has none; plus one
        when stacked), or along time with ``split="time"``.
      split: which axis of every batch ``mesh`` splits: ``"batch"`` (default: data
        parallelism, the source's ``batch_axes``) or ``"time"``: the time axis of
        time-major fields, the one before the batch axis (0 for ``[K, B, ...]``
        chunks, 1 when stacked ``[n, K, B, ...]``), for a model that runs its stack
        split along ``T`` over the same mesh (sequence parallelism, e.g.
        ``js.models.char_lm(..., sequence_parallel=(mesh, "seq"))``); the carry
        between chunks stays whole (replicated). Every field must be time-major.
      progress: tqdm bar (default: when stderr is a terminal).
      on_step: ``(step, record)`` callback after every step. A ``KeyboardInterrupt``
        it raises ends the run after that step (``stopped == "interrupted"``): the
        returned ``state.step``, ``info["steps"]`` and the checkpoint saved at exit
        all count that step. Any other exception propagates.
      plot: write ``curves.png`` at the end (with ``out_dir``).
      local_batches: with several processes, the source yields only this process's
        rows of each batch (``process_slice``), not the whole batch.
      loggers: a list of loggers (:class:`jaxseq.training.Logger`: ``log_metrics``,
        ``log_eval``, ``close``; e.g. :class:`jaxseq.training.TensorBoardLogger`),
        added to the JSON lines of ``out_dir`` (a :class:`jaxseq.training.JsonlLogger`
        in ``out_dir`` among them is not added twice). Called on process 0 only, with
        each step's scalars as Python floats (already on the host), and closed when
        fit ends, also on an exception or a preemption; a resumed run logs the steps
        after ``state.step`` only (their optional ``on_start(step)`` is told it).

    Returns:
      ``(state, info)`` with ``info``: ``train_s``, ``steps``, ``steps_per_s``,
      ``tokens_per_s`` (0.0 when batches have no mask), ``stopped`` ("steps", "time",
      "data", "interrupted"), ``evals`` (list of dicts), ``bad_steps`` (steps skipped
      by the non-finite guard over the whole run, ``state.bad_steps``: counted like
      ``steps``, from step 0).

    Raises:
      Preempted: on SIGTERM (a preemption notice; several processes: on any of
        them), after the call in flight and a checkpoint at the step it reached,
        every process at the same step. A ``SystemExit`` with status 143: uncaught,
        the script exits with it, and a resume continues with exactly the losses of
        an uninterrupted run. SIGINT (Ctrl-C) instead returns, ``stopped ==
        "interrupted"``.
      BatchSourceError: when the batch source raises (the original is its
        ``__cause__``; the message names the step), after checkpointing the last
        good state.
      NonFiniteError: after ``max_bad_steps`` consecutive skipped steps, or at the
        end of a call whose every step was skipped (e.g. a label or token id out of
        range, which under ``jit`` gives NaN rather than an error; run a step under
        :func:`jaxseq.checked` to find it). The state is checkpointed first.

    >>> import jax, jax.numpy as jnp, numpy as np, jaxseq as js
    >>> def loss_fn(params, carry, batch, key):
    ...     return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2), (carry, {})
    >>> opt = js.make_optimizer("sgd", 0.2, max_norm=None)
    >>> state = js.init_state({"w": jnp.zeros(())}, opt, jax.random.key(0))
    >>> step = js.make_train_step(loss_fn, opt)
    >>> x = np.linspace(-1, 1, 8, dtype=np.float32)
    >>> batch_of = lambda s: {"x": x, "y": 3 * x}  # the batch of step s
    >>> state, info = js.fit(step, state, batch_of, num_steps=50, progress=False)
    >>> info["steps"], info["stopped"], info["bad_steps"], round(float(state.params["w"]), 2)
    (50, 'steps', 0, 3.0)
    """
    num_steps, source, start = _check_fit_args(step_fn, state, batches, num_steps, checkpoint_every)
    _checks.check_choice("split", split, SPLITS)
    if split == "time" and mesh is None and jax.process_count() == 1:
        raise ValueError("split: 'time' splits batches over a mesh, but mesh is None")
    loggers = _check_loggers(loggers)
    bad_start = int(state.bad_steps)
    multi = jax.process_count() > 1
    main = jax.process_index() == 0  # the one process that writes logs and plots
    if multi:
        mesh = make_mesh() if mesh is None else mesh
        if not all(_is_global(x) for x in jax.tree_util.tree_leaves(state)):
            state = shard_state(state, mesh) if split == "batch" else replicate(state, mesh)
    loggers = _run_loggers(loggers, out_dir, main)
    if progress is None:
        progress = sys.stderr.isatty()
    info = {"steps": start, "train_s": float(elapsed_s), "stopped": "steps", "evals": []}
    info["bad_steps"] = bad_start
    with _closing(loggers):
        for logger in loggers:  # e.g. drop what an earlier run logged after ``start``
            on_start = getattr(logger, "on_start", None)
            if callable(on_start):
                on_start(start)
        if start >= num_steps:  # already done: nothing to train, nothing to save
            info.update(steps_per_s=0.0, tokens_per_s=0.0)
            return state, info
        run = _Run(
            step_fn=step_fn, source=source, state=state, start=start, num_steps=num_steps,
            info=info, elapsed_s=elapsed_s, max_seconds=max_seconds, multi=multi, main=main,
            mesh=mesh, local_batches=local_batches, split=split, checkpointer=checkpointer,
            checkpoint_every=checkpoint_every, checkpoint_meta=checkpoint_meta, eval_fn=eval_fn,
            eval_every=eval_every, loggers=loggers, on_step=on_step,
            max_bad_steps=_checks.check_positive_int("max_bad_steps", max_bad_steps),
        )  # fmt: skip
        run.bar = _tqdm(num_steps, start, progress and main)
        run.beats = _Beats(run, _silent_s()) if multi else None
        try:
            stopped = run.train()
            info = run.finish(stopped)
        except Exception as e:
            # with several processes, an error from a collective (of a step, a checkpoint,
            # an evaluation) often means a process is gone: then say so and end
            if multi and not isinstance(e, NonFiniteError | BatchSourceError):
                lost = run.beats.lost()
                if lost:
                    _exit_process_lost(run, e, lost)
            raise
        finally:
            if run.beats is not None:
                run.beats.close()
        if plot and out_dir is not None and main:
            from jaxseq.training.diagnostics import plot_training_curves

            logs = [os.path.join(out_dir, f) for f in ("metrics.jsonl", "eval.jsonl")]
            plot_training_curves(logs[0], os.path.join(out_dir, "curves.png"), eval_path=logs[1])
        if stopped == "preempted":
            saved = run.last_saved if checkpointer is not None else None
            err = Preempted(info["steps"], saved)
            if main:
                print(f"fit: {err}; exiting with status {PREEMPTED_EXIT_STATUS}", file=sys.stderr)
            raise err
        run.check_some_update(stopped)
        return run.state, info
