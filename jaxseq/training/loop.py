"""The training loop for any task: time budget, checkpoints, JSON-lines logs, progress
bar, evaluation.

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
Checkpoints are written and restored by all processes together; the JSON lines,
the plot and the progress bar come from process 0 alone; ``eval_fn`` and
``on_step`` run on every process (an evaluation over the mesh is collective too).
The time budget is process 0's (it decides for all); an iterable source must
yield the same number of batches on every process.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxseq import _checks
from jaxseq.training.sharding import _is_global, make_mesh, shard_batch, shard_state
from jaxseq.training.step import TrainState, TrainStep

__all__ = [
    "NonFiniteError",
    "fit",
]


class NonFiniteError(RuntimeError):
    """Raised by :func:`fit` after too many consecutive non-finite steps.

    >>> import jaxseq as js
    >>> issubclass(js.NonFiniteError, RuntimeError)
    True
    """


def _stack(batches):
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


class _Source:
    """One interface over the three kinds of batch source: ``get(step, n)``."""

    def __init__(self, batches, n: int):
        self.obj = batches
        self.n = n
        self.iterator = None
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


def _filter_jsonl(path, max_step: int) -> None:
    """Keeps the lines of a JSON-lines log whose ``step`` is <= max_step (for resumes)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= max_step:
                keep.append(json.dumps(rec))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


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
    progress: bool | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    plot: bool = True,
    local_batches: bool = False,
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
        ``eval.jsonl`` and ``curves.png``. On resume, lines after ``state.step`` are
        dropped, so the log matches an uninterrupted run.
      checkpointer: a :class:`jaxseq.checkpoint.Checkpointer`; saves every
        ``checkpoint_every`` steps and at exit (also on Ctrl-C and non-finite stop).
      checkpoint_meta: extra JSON metadata for each checkpoint, from the state.
      eval_fn: ``state -> dict`` of metrics (e.g. ``{"val_loss": ...}``), every
        ``eval_every`` steps and at the end.
      max_bad_steps: consecutive non-finite steps that stop training.
      mesh: when given, batches are split over it with :func:`shard_batch` along
        the source's ``batch_axes`` (1, time-major, when it has none; plus one
        when stacked).
      progress: tqdm bar (default: when stderr is a terminal).
      on_step: ``(step, record)`` callback after every step. A ``KeyboardInterrupt``
        it raises ends the run after that step (``stopped == "interrupted"``): the
        returned ``state.step``, ``info["steps"]`` and the checkpoint saved at exit
        all count that step. Any other exception propagates.
      plot: write ``curves.png`` at the end (with ``out_dir``).
      local_batches: with several processes, the source yields only this process's
        rows of each batch (``process_slice``), not the whole batch.

    Returns:
      ``(state, info)`` with ``info``: ``train_s``, ``steps``, ``steps_per_s``,
      ``tokens_per_s`` (0.0 when batches have no mask), ``stopped`` ("steps", "time",
      "data", "interrupted"), ``evals`` (list of dicts).

    >>> import jax, jax.numpy as jnp, numpy as np, jaxseq as js
    >>> def loss_fn(params, carry, batch, key):
    ...     return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2), (carry, {})
    >>> opt = js.make_optimizer("sgd", 0.2, max_norm=None)
    >>> state = js.init_state({"w": jnp.zeros(())}, opt, jax.random.key(0))
    >>> step = js.make_train_step(loss_fn, opt)
    >>> x = np.linspace(-1, 1, 8, dtype=np.float32)
    >>> batch_of = lambda s: {"x": x, "y": 3 * x}  # the batch of step s
    >>> state, info = js.fit(step, state, batch_of, num_steps=50, progress=False)
    >>> info["steps"], info["stopped"], round(float(state.params["w"]), 2)
    (50, 'steps', 3.0)
    """
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
    multi = jax.process_count() > 1
    main = jax.process_index() == 0  # the one process that writes logs and plots
    if multi:
        mesh = make_mesh() if mesh is None else mesh
        if not all(_is_global(x) for x in jax.tree_util.tree_leaves(state)):
            state = shard_state(state, mesh)
    metrics_path = eval_path = None
    if out_dir is not None and main:
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        eval_path = os.path.join(out_dir, "eval.jsonl")
        for p in (metrics_path, eval_path):
            _filter_jsonl(p, start)
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and main

    info = {"steps": start, "train_s": float(elapsed_s), "stopped": "steps", "evals": []}
    if start >= num_steps:  # already done: nothing to train, nothing to save
        info.update(steps_per_s=0.0, tokens_per_s=0.0)
        return state, info
    axes = source.batch_axes() if n == 1 else _shift_axes(source.batch_axes(), 1)
    mf = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 - closed in finally
    bar = _tqdm(num_steps, start, progress)

    def save(st):
        if checkpointer is not None:
            meta = {"train_s": info["train_s"]}
            pos = source.position(int(st.step))
            if pos is not None:
                meta["data_position"] = pos
            if checkpoint_meta is not None:
                meta.update(checkpoint_meta(st))
            checkpointer.save(st, meta)

    def run_eval(st):
        if eval_fn is None:
            return
        rec = {"step": int(st.step), "train_s": round(info["train_s"], 3), **eval_fn(st)}
        info["evals"].append(rec)
        if eval_path:
            with open(eval_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.set_postfix_str(f"val {rec.get('val_loss', float('nan')):.4f}", refresh=False)

    last_saved = start
    stopped = "steps"
    try:
        step = start
        tokens_run = 0
        tps = None
        while step < num_steps:
            if max_seconds is not None and _out_of_time(info["train_s"] >= max_seconds, multi):
                stopped = "time"
                break
            t0 = time.perf_counter()
            batch = source.get(step)
            if batch is None:
                stopped = "data"
                break
            tokens = _count_tokens(batch, n)
            if tokens is not None and multi and local_batches:
                tokens *= jax.process_count()
            if mesh is not None:
                batch = shard_batch(batch, mesh, axes, local=local_batches)
            state, metrics = step_fn(state, batch)
            # One truth for the step count from here on: ``state`` has taken these n
            # steps, so ``info["steps"]`` (and a checkpoint saved on any exit, e.g. an
            # interrupt raised by ``on_step`` below) says so too.
            first = step
            step += n
            info["steps"] = step
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            info["train_s"] += dt
            run_s = max(info["train_s"] - elapsed_s, 1e-9)
            sps = (step - start) / run_s
            if tokens is not None:
                tokens_run += n * tokens
                tps = tokens_run / run_s
            recs = []
            for j in range(n):
                m = {k: (np.asarray(v)[j] if n > 1 else np.asarray(v)) for k, v in metrics.items()}
                rec = {"step": first + j + 1}
                for k, v in m.items():
                    rec[k] = (
                        bool(v) if v.dtype == bool else (float(v) if v.ndim == 0 else v.tolist())
                    )
                rec["train_s"] = round(info["train_s"], 4)
                rec["steps_per_s"] = round(sps, 3)
                if tps is not None:
                    rec["tokens_per_s"] = round(tps, 1)
                recs.append(rec)
            if mf is not None:  # the log holds every step taken before any callback runs
                mf.write("".join(json.dumps(r) + "\n" for r in recs))
                mf.flush()
            bar.update(n)
            if on_step is not None:
                for r in recs:
                    on_step(r["step"], r)
            rate = {"tok_s": f"{tps:,.0f}"} if tps is not None else {"step_s": f"{sps:,.1f}"}
            bar.set_postfix(loss=f"{rec['loss']:.4f}", **rate, refresh=False)
            if rec["bad_streak"] >= max_bad_steps:
                raise NonFiniteError(
                    f"training stopped: {int(rec['bad_streak'])} consecutive steps with a "
                    f"non-finite loss or gradient (last at step {step}); params and optimizer "
                    f"state are those of the last finite step. Lower the learning rate, check "
                    f"the data, or raise max_bad_steps."
                )
            if eval_every and step % eval_every == 0 and step < num_steps:
                run_eval(state)
            if checkpoint_every and step % checkpoint_every == 0:
                save(state)
                last_saved = step
        run_eval(state)
    except KeyboardInterrupt:
        stopped = "interrupted"
    except NonFiniteError:
        save(state)
        raise
    finally:
        bar.close()
        if mf is not None:
            mf.close()
    info["stopped"] = stopped
    if info["steps"] != last_saved or stopped != "steps":
        try:
            save(state)
        except RuntimeError as e:  # interrupted inside a call that had donated the state
            if stopped != "interrupted":
                raise
            print(f"fit: no checkpoint at exit ({e})", file=sys.stderr)
    done = info["steps"] - start
    run_s = max(info["train_s"] - elapsed_s, 1e-9)
    info["steps_per_s"] = done / run_s if done else 0.0
    info["tokens_per_s"] = tokens_run / run_s if done else 0.0
    if plot and out_dir is not None and main:
        from jaxseq.training.diagnostics import plot_training_curves

        plot_training_curves(metrics_path, os.path.join(out_dir, "curves.png"), eval_path=eval_path)
    return state, info
