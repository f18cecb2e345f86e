"""Rollouts: run a cell over a sequence with ``jax.lax.scan`` (or a Python loop).

Time-major everywhere: ``xs: [T, *B, D] -> ys: [T, *B, H]``; ``*B`` is any
number of batch dims, none for per-example use under ``jax.vmap``.

Semantics shared by :func:`rollout` and :func:`rollout_unrolled`:

* ``lengths: int[*B]`` (right padding): steps ``t >= lengths[b]`` leave that
  sequence's carry unchanged and output zeros, so the returned carry is the one
  after its last valid step (PyTorch packed-sequence semantics). A length of 0
  is valid: the initial carry comes back with all-zero outputs.
* ``reset: bool[T, *B]``: ``reset[t, b]`` marks step ``t`` as the first step of
  a new episode/document: the carry of sequence ``b`` is set back to zeros
  (the cell's ``initial_carry``) before step ``t``. Flags at padded steps are
  ignored.
* ``reverse=True`` runs each sequence backwards over its valid part only
  (from ``lengths[b] - 1`` down to 0) and returns outputs in the original time
  order, so a bidirectional layer is correct under padding. Episode boundaries
  keep their forward-time meaning: the backward carry is reset when it crosses
  from step ``t`` to ``t - 1`` where ``reset[t]`` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks

__all__ = ["rollout", "rollout_unrolled"]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _prepare(cell, params, xs, carry, lengths, reset):
    """Validates the rollout arguments; returns (xs, batch_shape, T, carry, lengths, reset)."""
    for method in ("init", "initial_carry", "step"):
        if not callable(getattr(cell, method, None)):
            raise TypeError(
                f"cell: expected a cell with init/initial_carry/step methods, "
                f"got {type(cell).__name__} without '{method}'"
            )
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs: expected an array [T, *B, D], got {type(xs).__name__}")
    _checks.check_floating("xs", xs)
    _checks.check_min_ndim("xs", xs, 2, "[T, *B, D]")
    if hasattr(cell, "check_params"):
        cell.check_params(params)
        cell.check_input(params, xs, name="xs", min_ndim=2)
    t = xs.shape[0]
    batch_shape = tuple(xs.shape[1:-1])

    if carry is None:
        carry = cell.initial_carry(batch_shape)
    elif hasattr(cell, "check_carry"):
        cell.check_carry(carry, batch_shape)
    else:
        ref = jax.eval_shape(lambda: cell.initial_carry(batch_shape))
        _checks.check_tree_matches("carry", carry, ref, "the cell's carry")

    if lengths is not None:
        lengths = _checks.as_array("lengths", lengths)
        _checks.check_integer("lengths", lengths)
        if tuple(lengths.shape) != batch_shape:
            raise ValueError(
                f"lengths: expected shape {list(batch_shape)} (the batch dims of xs "
                f"{_checks.describe(xs)}), got {_checks.describe(lengths)}"
            )
        if _is_concrete(lengths):
            lv = np.asarray(lengths)
            if lv.size and (lv.min() < 0 or lv.max() > t):
                raise ValueError(
                    f"lengths: expected values in [0, T={t}], got min {lv.min()} max {lv.max()}"
                )
        lengths = lengths.astype(jnp.int32)

    if reset is not None:
        reset = _checks.as_array("reset", reset)
        _checks.check_bool("reset", reset)
        if tuple(reset.shape) != (t, *batch_shape):
            raise ValueError(
                f"reset: expected shape {[t, *batch_shape]} ([T, *B] of xs "
                f"{_checks.describe(xs)}), got {_checks.describe(reset)}"
            )
    return xs, batch_shape, t, carry, lengths, reset


def _expand(mask, leaf):
    """``mask: [*B]`` -> broadcastable against ``leaf: [*B, H]``."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def _select(mask, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(_expand(mask, n), n, o), new, old)


def processing_resets(reset, lengths, reverse: bool):
    """Reset flags in processing order: ``out[t]`` resets the carry before step ``t``.

    Flags at padded steps are dropped; in reverse, the flag of step ``t`` resets
    the carry before step ``t - 1`` (the episode boundary keeps its forward meaning).
    """
    if reset is None:
        return None
    if lengths is not None:
        t = reset.shape[0]
        steps = jnp.arange(t, dtype=jnp.int32).reshape((t,) + (1,) * lengths.ndim)
        reset = reset & (steps < lengths[None])
    if reverse:
        reset = jnp.concatenate([reset[1:], jnp.zeros_like(reset[:1])], axis=0)
    return reset


def resolve_unroll(unroll, t: int) -> int:
    """Turns the ``unroll`` argument into a positive int for ``lax.scan``."""
    if unroll is True:
        return max(t, 1)
    if unroll == "auto":
        from jaxseq import kernels  # local import: kernels sits above rollout's helpers

        return kernels.auto_unroll(t)
    if isinstance(unroll, bool) or not isinstance(unroll, int | np.integer) or unroll < 1:
        raise ValueError(f"unroll: expected a positive int, True or 'auto', got {unroll!r}")
    return int(unroll)


def _make_step(cell, params, lengths, hoisted: bool):
    """Body of one time step with lengths/reset handling; ``inp = (x_or_xp, t, reset_t)``."""

    def body(carry, inp):
        x_t, t, r_t, zero_carry = inp
        prev = carry
        if r_t is not None:
            carry = _select(r_t, zero_carry, carry)
        if hoisted:
            new, y = cell.recur(params, carry, x_t)
        else:
            new, y = cell.step(params, carry, x_t)
        if lengths is not None:
            valid = t < lengths
            new = _select(valid, new, prev)
            y = jnp.where(_expand(valid, y), y, jnp.zeros_like(y))
        return new, y

    return body


def rollout(cell, params, xs, carry=None, *, lengths=None, reset=None, reverse=False, unroll=1):
    """Runs ``cell`` over ``xs`` with ``jax.lax.scan``.

    Args:
      cell: a cell (``js.RNN``/``js.LSTM``/``js.GRU`` or any object with
        ``init``/``initial_carry``/``step``). Cells that also have
        ``project``/``recur`` get their input projection hoisted out of the
        loop: one ``[T*B, D] x [D, G*H]`` matmul before the scan.
      params: the cell's parameters.
      xs: ``[T, *B, D]`` floating inputs, time-major.
      carry: initial carry for batch ``*B``; zeros when None.
      lengths: optional ``int[*B]`` valid lengths (see module docstring).
      reset: optional ``bool[T, *B]`` episode starts (see module docstring).
      reverse: run backwards over each sequence's valid part; outputs stay in
        original time order.
      unroll: ``lax.scan`` unroll factor: a positive int, ``True`` (fully), or
        ``"auto"``.

    Returns:
      ``(final_carry, ys)`` with ``ys: [T, *B, H]``; zeros at padded steps.
    """
    xs, batch_shape, t, carry, lengths, reset = _prepare(cell, params, xs, carry, lengths, reset)
    n_unroll = resolve_unroll(unroll, t)
    hoisted = callable(getattr(cell, "project", None)) and callable(getattr(cell, "recur", None))
    inputs = cell.project(params, xs) if hoisted else xs
    reset_p = processing_resets(reset, lengths, reverse)
    zero_carry = jax.tree_util.tree_map(jnp.zeros_like, carry)
    body = _make_step(cell, params, lengths, hoisted)

    def scan_body(c, inp):
        x_t, step_idx, r_t = inp
        return body(c, (x_t, step_idx, r_t, zero_carry))

    steps = jnp.arange(t, dtype=jnp.int32)
    carry, ys = jax.lax.scan(
        scan_body, carry, (inputs, steps, reset_p), reverse=reverse, unroll=min(n_unroll, max(t, 1))
    )
    return carry, ys


def rollout_unrolled(cell, params, xs, carry=None, *, lengths=None, reset=None, reverse=False):
    """Same semantics as :func:`rollout`, as a Python loop calling ``cell.step``.

    The reference implementation (and the "unrolled" contender in the
    benchmarks): under ``jit`` it traces ``T`` copies of the step, so compile
    time grows with ``T``.
    """
    xs, batch_shape, t, carry, lengths, reset = _prepare(cell, params, xs, carry, lengths, reset)
    reset_p = processing_resets(reset, lengths, reverse)
    zero_carry = jax.tree_util.tree_map(jnp.zeros_like, carry)
    body = _make_step(cell, params, lengths, hoisted=False)
    ys = [None] * t
    order = range(t - 1, -1, -1) if reverse else range(t)
    for i in order:
        r_t = None if reset_p is None else reset_p[i]
        carry, ys[i] = body(carry, (xs[i], jnp.int32(i), r_t, zero_carry))
    if t == 0:
        probe = jnp.zeros(xs.shape[1:], xs.dtype)
        y_shape = jax.eval_shape(lambda: cell.step(params, carry, probe))[1]
        return carry, jnp.zeros((0, *y_shape.shape), y_shape.dtype)
    return carry, jnp.stack(ys)
