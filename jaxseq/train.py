"""Training: optimizer factory, train state, a jitted train step with a
non-finite guard, the truncated-BPTT carry loop, and data-parallel sharding.

The pieces::

    opt = make_optimizer("adam", 2e-3, max_norm=1.0, warmup_steps=100, total_steps=5000)
    state = init_state(params, opt, key, carry=model.initial_carry((B,)))
    step = make_train_step(lm_loss_fn(model), opt)          # jitted, donates the state
    state, metrics = step(state, batcher.at_step(int(state.step)))

or the whole loop, with logging, checkpoints and a time budget::

    state = fit(step, state, batcher, num_steps=5000, out_dir="out", checkpointer=ckpt)

**Truncated BPTT.** A :class:`jaxseq.data.StreamBatcher` cuts B parallel
streams into chunks of K steps. The step runs the model over one chunk from
the carry the previous chunk left (``state.carry``), backpropagates through
those K steps only (the incoming carry is a constant: ``stop_gradient``), and
stores the new carry for the next chunk. ``Chunk.reset`` zeroes a stream's
carry at document boundaries and at each epoch start. Every chunk has the same
shape (the last one is padded and masked), so the step compiles once.
``chunks_per_call=n`` scans over n chunks inside one jitted call.

**Non-finite guard.** A step whose loss or gradient norm is NaN/Inf keeps the
previous params, optimizer state and carry bit for bit, adds one to
``state.bad_steps`` and ``state.bad_streak`` (reset by the next good step) and
reports ``finite = False`` in its metrics. :func:`fit` stops with
:class:`NonFiniteError` after ``max_bad_steps`` consecutive bad steps.

**Sharding.** :func:`make_mesh` builds a 1-D ``jax.sharding.Mesh`` named
``"data"`` over the devices; :func:`shard_state` replicates params and
optimizer state and splits the carry along the stream axis;
:func:`shard_batch` splits chunks along the stream axis. The same jitted step
runs on one device or many (XLA inserts the gradient all-reduce); across hosts
call :func:`init_distributed` first.

Shapes: K chunk length (time), B streams (batch), V vocabulary, H hidden.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import _checks, losses
from jaxseq.data import Chunk, StreamBatcher

__all__ = [
    "NonFiniteError",
    "Optimizer",
    "TrainState",
    "TrainStep",
    "evaluate_lm",
    "fit",
    "init_distributed",
    "init_state",
    "lm_loss_fn",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "shard_batch",
    "shard_state",
]

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


class NonFiniteError(RuntimeError):
    """Raised by :func:`fit` after too many consecutive non-finite steps."""


# -- optimizer ------------------------------------------------------------------------


class Optimizer(NamedTuple):
    """An optax transformation and the learning-rate schedule it uses (for reporting)."""

    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    max_norm: float | None


def make_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    *,
    max_norm: float | None = 1.0,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    decay_biases: bool = False,
    momentum: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> Optimizer:
    """``optax.chain(clip_by_global_norm(max_norm), <name>)`` with an optional schedule.

    Args:
      name: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"rmsprop"``.
      learning_rate: peak learning rate.
      max_norm: clip the global gradient norm to this (None: no clipping).
      warmup_steps: linear warmup from 0 to ``learning_rate`` over this many steps.
      total_steps: when given, cosine decay to ``final_lr_ratio * learning_rate``
        at ``total_steps`` (after the warmup); when None, constant after warmup.
      weight_decay: decoupled weight decay (adamw only), on the weight matrices and
        embeddings (leaves with 2 or more dimensions); biases (the LSTM forget-gate
        bias among them) and other vectors are not decayed unless ``decay_biases``.
      momentum: for sgd (0: plain) and rmsprop.
      b1, b2, eps: Adam/AdamW moments.
    """
    _checks.check_choice("name", name, OPTIMIZERS)
    if not (isinstance(learning_rate, int | float) and learning_rate > 0):
        raise ValueError(f"learning_rate: expected a positive number, got {learning_rate!r}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm: expected a positive number or None, got {max_norm!r}")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected a non-negative int, got {warmup_steps!r}")
    if weight_decay and name != "adamw":
        raise ValueError(f"weight_decay: only adamw uses it, got {weight_decay!r} with {name!r}")
    lr = float(learning_rate)
    if total_steps is not None:
        total = _checks.check_positive_int("total_steps", total_steps)
        if total <= warmup_steps:
            raise ValueError(
                f"total_steps: expected more than warmup_steps={warmup_steps}, got {total}"
            )
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, int(warmup_steps), total, end_value=lr * float(final_lr_ratio)
        )
    elif warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, int(warmup_steps)), optax.constant_schedule(lr)],
            [int(warmup_steps)],
        )
    else:
        schedule = optax.constant_schedule(lr)
    if name == "adam":
        base = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    elif name == "adamw":
        mask = None if decay_biases else _matrices_mask
        base = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "sgd":
        base = optax.sgd(schedule, momentum=momentum or None)
    else:
        base = optax.rmsprop(schedule, momentum=momentum)
    parts = [] if max_norm is None else [optax.clip_by_global_norm(float(max_norm))]
    return Optimizer(optax.chain(*parts, base), schedule, max_norm)


def _matrices_mask(params):
    """True for the leaves weight decay applies to: those with at least 2 dimensions."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


# -- state ----------------------------------------------------------------------------


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32[]: steps taken (good and bad); the data position
    key: jax.Array  # PRNG key; the step's dropout key is fold_in(key, step)
    carry: Any  # recurrent state carried from chunk to chunk, [B, H] leaves
    bad_steps: jax.Array  # int32[]: non-finite steps so far (skipped)
    bad_streak: jax.Array  # int32[]: consecutive non-finite steps up to now


def init_state(params, optimizer: Optimizer, key, carry=None) -> TrainState:
    """A fresh :class:`TrainState` at step 0."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected js.train.Optimizer, got {type(optimizer).__name__}")
    _checks.check_key("key", key)
    z = jnp.zeros((), jnp.int32)
    state = TrainState(params, optimizer.tx.init(params), z, key, carry, z, z)
    # distinct buffers for every leaf (shared zeros cannot be donated twice)
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)


# -- train step -----------------------------------------------------------------------


def lm_loss_fn(model, *, use_lengths: bool = True):
    """The loss of a language model on a :class:`jaxseq.data.Chunk`, for :func:`make_train_step`.

    ``loss_fn(params, carry, chunk, key) -> (loss, (new_carry, aux))``: mean
    masked cross-entropy (nats/token) of ``model.apply`` over the chunk from
    ``carry``, with ``chunk.reset`` applied. With ``use_lengths`` the carry
    after a padded (partial) chunk is the one after its last valid step.
    """

    def loss_fn(params, carry, chunk, key):
        lengths = None
        if use_lengths:
            lengths = jnp.sum(chunk.mask.astype(jnp.int32), axis=0)
        carry, logits = model.apply(
            params, carry, chunk.inputs, reset=chunk.reset, lengths=lengths, key=key
        )
        loss = losses.cross_entropy(logits, chunk.targets, chunk.mask)
        return loss, (carry, {})

    return loss_fn


def _check_chunk(batch, carry_batch: tuple | None, stacked: int | None):
    if not isinstance(batch, Chunk):
        raise TypeError(f"batch: expected a jaxseq.data.Chunk, got {type(batch).__name__}")
    ref = np.shape(batch.inputs)
    want_ndim = 2 if stacked is None else 3
    for f in batch._fields:
        arr = getattr(batch, f)
        if np.ndim(arr) != want_ndim:
            lay = "[K, B]" if stacked is None else f"[n={stacked}, K, B]"
            raise ValueError(
                f"batch.{f}: expected rank {want_ndim} {lay}, got shape {list(np.shape(arr))}"
            )
        if np.shape(arr) != ref:
            raise ValueError(
                f"batch.{f}: expected shape {list(ref)} (the shape of batch.inputs), "
                f"got {list(np.shape(arr))}"
            )
    if stacked is not None and ref[0] != stacked:
        raise ValueError(
            f"batch: expected {stacked} stacked chunks [n, K, B] (chunks_per_call), got {list(ref)}"
        )
    if carry_batch is not None and tuple(ref[-1:]) != tuple(carry_batch):
        raise ValueError(
            f"batch: {ref[-1]} streams (last axis of {list(ref)}) but state.carry is for "
            f"batch {list(carry_batch)}"
        )


def _carry_batch(carry):
    leaves = jax.tree_util.tree_leaves(carry)
    return tuple(leaves[0].shape[:-1]) if leaves else None


class TrainStep:
    """The jitted train step made by :func:`make_train_step`.

    ``step(state, batch) -> (state, metrics)``; validates ``batch`` in Python
    before calling the compiled function; ``traces`` counts how often it traced.
    """

    def __init__(self, fn, chunks_per_call: int, donate: bool):
        self.chunks_per_call = chunks_per_call
        self.traces = 0

        def counted(state, batch):
            self.traces += 1
            return fn(state, batch)

        self._jitted = jax.jit(counted, donate_argnums=(0,) if donate else ())

    def __call__(self, state: TrainState, batch: Chunk):
        if not isinstance(state, TrainState):
            raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
        n = self.chunks_per_call
        _check_chunk(batch, _carry_batch(state.carry), None if n == 1 else n)
        return self._jitted(state, batch)

    def lower(self, state, batch):
        return self._jitted.lower(state, batch)


def _tree_select(ok, new, old):
    return jax.tree_util.tree_map(lambda n, o: jax.lax.select(ok, n, o), new, old)


def make_train_step(
    loss_fn, optimizer: Optimizer, *, chunks_per_call: int = 1, donate: bool = True
) -> TrainStep:
    """A jitted TBPTT train step over one chunk (or ``chunks_per_call`` stacked chunks).

    Args:
      loss_fn: ``(params, carry, batch, key) -> (loss, (new_carry, aux_metrics))``,
        e.g. :func:`lm_loss_fn`. ``key`` is the step's dropout key.
      optimizer: from :func:`make_optimizer`.
      chunks_per_call: scan over this many chunks (``batch`` fields ``[n, K, B]``)
        inside one call; metrics come back with a leading ``[n]`` axis.
      donate: donate the input state's buffers (do not reuse ``state`` after the call).

    Metrics: ``loss``, ``grad_norm`` (global norm before clipping), ``lr`` (of the
    update), ``finite`` (False: skipped by the guard), ``bad_streak``, plus ``aux``.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected js.train.Optimizer, got {type(optimizer).__name__}")
    n = _checks.check_positive_int("chunks_per_call", chunks_per_call)
    tx, schedule = optimizer.tx, optimizer.schedule

    def one(state: TrainState, batch: Chunk):
        key = jax.random.fold_in(state.key, state.step)
        carry_in = jax.lax.stop_gradient(state.carry)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (carry, aux)), grads = grad_fn(state.params, carry_in, batch, key)
        carry = jax.lax.stop_gradient(carry)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = schedule(state.step - state.bad_steps)
        new = TrainState(
            params=_tree_select(ok, params, state.params),
            opt_state=_tree_select(ok, opt_state, state.opt_state),
            step=state.step + 1,
            key=state.key,
            carry=_tree_select(ok, carry, state.carry),
            bad_steps=state.bad_steps + jnp.where(ok, 0, 1).astype(jnp.int32),
            bad_streak=jnp.where(ok, 0, state.bad_streak + 1).astype(jnp.int32),
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": grad_norm.astype(jnp.float32),
            "lr": jnp.asarray(lr, jnp.float32),
            "finite": ok,
            "bad_streak": new.bad_streak,
            **aux,
        }
        return new, metrics

    if n == 1:
        fn = one
    else:

        def fn(state, batch):
            return jax.lax.scan(one, state, batch)

    return TrainStep(fn, n, donate)


# -- evaluation -----------------------------------------------------------------------


def make_eval_step(model):
    """Jitted ``(params, carry, chunk) -> (carry, nats_sum, count)`` for a language model (no dropout)."""

    @jax.jit
    def ev(params, carry, chunk):
        lengths = jnp.sum(chunk.mask.astype(jnp.int32), axis=0)
        carry, logits = model.apply(params, carry, chunk.inputs, reset=chunk.reset, lengths=lengths)
        tok = losses.token_cross_entropy(logits, chunk.targets)
        w = chunk.mask.astype(jnp.float32)
        return carry, jnp.sum(tok * w), jnp.sum(w)

    return ev


def evaluate_lm(model, params, batcher: StreamBatcher, *, eval_step=None, mesh=None) -> float:
    """Mean nats/token of ``model`` over one pass of ``batcher`` (carry threaded across chunks).

    With ``batcher.reset_every_chunk`` the carry starts from zeros at every chunk.
    """
    ev = eval_step or make_eval_step(model)
    carry = model.initial_carry((batcher.num_streams,))
    if mesh is not None:
        carry = _shard_tree(carry, mesh, 0)
    total, count = 0.0, 0.0
    for i in range(batcher.num_chunks):
        chunk = batcher.chunk(i)
        if mesh is not None:
            chunk = shard_batch(chunk, mesh)
        carry, s, c = ev(params, carry, chunk)
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)


# -- sharding -------------------------------------------------------------------------


def init_distributed(**kwargs) -> None:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``) for multi-host runs.

    Keyword arguments go to ``jax.distributed.initialize`` (coordinator address,
    number of processes, process id; on managed clusters they are detected).
    """
    jax.distributed.initialize(**kwargs)


def make_mesh(devices=None, axis_name: str = "data") -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got none")
    return jax.sharding.Mesh(np.array(devices), (axis_name,))


def _axis_name(mesh):
    if not isinstance(mesh, jax.sharding.Mesh) or len(mesh.axis_names) != 1:
        raise TypeError(f"mesh: expected a 1-D jax.sharding.Mesh (make_mesh), got {mesh!r}")
    return mesh.axis_names[0]


def _put(x, sharding):
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)


def _shard_tree(tree, mesh, axis: int):
    name = _axis_name(mesh)
    ndev = mesh.devices.size

    def put(x):
        x = jnp.asarray(x) if not hasattr(x, "ndim") else x
        if x.shape[axis] % ndev:
            raise ValueError(
                f"batch: {x.shape[axis]} streams (axis {axis} of shape {list(x.shape)}) do not "
                f"split evenly over {ndev} devices"
            )
        spec = [None] * x.ndim
        spec[axis] = name
        return _put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh):
    """Puts every leaf of ``tree`` on all devices of ``mesh`` (replicated)."""
    _axis_name(mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, rep), tree)


def shard_state(state: TrainState, mesh) -> TrainState:
    """Replicates params, optimizer state, step and key; splits the carry ``[B, H]`` over streams."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
    rest = replicate(state._replace(carry=None), mesh)
    return rest._replace(carry=_shard_tree(state.carry, mesh, 0))


def shard_batch(batch: Chunk, mesh) -> Chunk:
    """Splits a chunk ``[K, B]`` (or stacked ``[n, K, B]``) over the stream axis B."""
    return _shard_tree(batch, mesh, np.ndim(batch.inputs) - 1)


# -- the loop -------------------------------------------------------------------------


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
        from jaxseq.diagnostics import plot_training_curves

        plot_training_curves(metrics_path, os.path.join(out_dir, "curves.png"), eval_path=eval_path)
    return state, info
