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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import _checks
from jaxseq.data.streams import Chunk
from jaxseq.training.optimizer import Optimizer

__all__ = [
    "TrainState",
    "TrainStep",
    "init_state",
    "make_train_step",
]


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
        raise TypeError(
            f"optimizer: expected js.training.Optimizer, got {type(optimizer).__name__}"
        )
    _checks.check_key("key", key)
    z = jnp.zeros((), jnp.int32)
    state = TrainState(params, optimizer.tx.init(params), z, key, carry, z, z)
    # distinct buffers for every leaf (shared zeros cannot be donated twice)
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)


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
        raise TypeError(
            f"optimizer: expected js.training.Optimizer, got {type(optimizer).__name__}"
        )
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
