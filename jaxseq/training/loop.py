"""The training loop: time budget, checkpoints, JSON-lines logs, progress bar, evaluation."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxseq import _checks
from jaxseq.data.streams import StreamBatcher
from jaxseq.training.sharding import shard_batch
from jaxseq.training.step import TrainState, TrainStep

__all__ = [
    "NonFiniteError",
    "fit",
]


class NonFiniteError(RuntimeError):
    """Raised by :func:`fit` after too many consecutive non-finite steps."""


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


def _tqdm(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


def fit(
    step_fn: TrainStep,
    state: TrainState,
    batcher: StreamBatcher,
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
):
    """Trains until ``state.step == num_steps`` (or the time budget is spent).

    Args:
      step_fn: from :func:`make_train_step`.
      state: the start state (fresh, or restored from a checkpoint).
      batcher: gives the chunk of each global step (the data position is ``state.step``).
      num_steps: the total number of steps of the run (not the number still to do).
      max_seconds: stop once the training time (eval and checkpoint time excluded)
        reaches this, counting ``elapsed_s`` already spent by an earlier run.
      out_dir: writes ``metrics.jsonl`` (one line per step: step, loss, grad_norm, lr,
        finite, train_s, tokens_per_s), ``eval.jsonl`` and ``curves.png``. On resume,
        lines after ``state.step`` are dropped, so the log matches an uninterrupted run.
      checkpointer: a :class:`jaxseq.checkpoint.Checkpointer`; saves every
        ``checkpoint_every`` steps and at exit (also on Ctrl-C and non-finite stop).
      checkpoint_meta: extra JSON metadata for each checkpoint, from the state.
      eval_fn: ``state -> dict`` of metrics (e.g. ``{"val_loss": ...}``), every
        ``eval_every`` steps and at the end.
      max_bad_steps: consecutive non-finite steps that stop training.
      mesh: when given, chunks are sharded over it (:func:`shard_batch`).
      progress: tqdm bar (default: when stderr is a terminal).
      on_step: ``(step, metrics)`` callback after every step.

    Returns:
      ``(state, info)`` with ``info``: ``train_s``, ``steps``, ``tokens_per_s``,
      ``stopped`` ("steps", "time", "interrupted"), ``evals`` (list of dicts).
    """
    if not isinstance(batcher, StreamBatcher):
        raise TypeError(
            f"batcher: expected jaxseq.data.StreamBatcher, got {type(batcher).__name__}"
        )
    num_steps = _checks.check_positive_int("num_steps", num_steps)
    n = step_fn.chunks_per_call
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
    tokens_per_step = batcher.chunk_len * batcher.num_streams
    metrics_path = eval_path = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        eval_path = os.path.join(out_dir, "eval.jsonl")
        for p in (metrics_path, eval_path):
            _filter_jsonl(p, start)
    if progress is None:
        progress = sys.stderr.isatty()

    info = {"steps": start, "train_s": float(elapsed_s), "stopped": "steps", "evals": []}
    mf = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 - closed in finally
    bar = _tqdm(num_steps, start, progress)

    def save(st):
        if checkpointer is not None:
            meta = {"train_s": info["train_s"]}
            meta["data_position"] = list(batcher.position(int(st.step)))
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
        while step < num_steps:
            if max_seconds is not None and info["train_s"] >= max_seconds:
                stopped = "time"
                break
            t0 = time.perf_counter()
            batch = batcher.at_step(step) if n == 1 else batcher.stacked(step, n)
            if mesh is not None:
                batch = shard_batch(batch, mesh)
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            info["train_s"] += dt
            tokens_run += n * tokens_per_step
            tps = tokens_run / max(info["train_s"] - elapsed_s, 1e-9)
            for j in range(n):
                m = {k: (np.asarray(v)[j] if n > 1 else np.asarray(v)) for k, v in metrics.items()}
                rec = {"step": step + j + 1}
                for k, v in m.items():
                    rec[k] = (
                        bool(v) if v.dtype == bool else (float(v) if v.ndim == 0 else v.tolist())
                    )
                rec["train_s"] = round(info["train_s"], 4)
                rec["tokens_per_s"] = round(tps, 1)
                if mf is not None:
                    mf.write(json.dumps(rec) + "\n")
                if on_step is not None:
                    on_step(step + j + 1, rec)
            if mf is not None:
                mf.flush()
            step += n
            info["steps"] = step
            bar.update(n)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
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
    info["tokens_per_s"] = (
        done * tokens_per_step / max(info["train_s"] - elapsed_s, 1e-9) if done else 0.0
    )
    if plot and out_dir is not None:
        from jaxseq.training.diagnostics import plot_training_curves

        plot_training_curves(metrics_path, os.path.join(out_dir, "curves.png"), eval_path=eval_path)
    return state, info
