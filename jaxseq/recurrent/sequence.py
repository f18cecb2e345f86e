"""The inputs of a rollout, validated once: :class:`Sequence` and :func:`prepare`.

:func:`jaxseq.rollout` checks its arguments here, at the boundary, and hands a
:class:`Sequence` down the route (layers, dispatcher, kernels), which trust it:

* ``xs: [T, *B, D]`` time-major, whatever layout the caller used (batch-major
  ``[*B, T, D]`` is transposed here, and only here);
* ``valid: bool[T, *B]`` the padding mask (right padding: ``valid[t, b]`` iff
  ``t < lengths[b]``), built once from ``lengths`` or taken from the caller's
  mask; ``None`` when nothing is padded, so no step does padded-step work;
* the inputs at padded steps set to zero (selected, never multiplied: whatever
  they held, NaN or inf, reaches no arithmetic, and their gradient is exactly 0);
* ``reset: bool[T, *B]`` episode starts, in forward time.

A user's whole-sequence layer (see :class:`jaxseq.protocols.SequenceLayer`)
receives the same :class:`Sequence`; :func:`prepare` is public so that code
outside a rollout can build one too.

Shapes: ``T`` time, ``*B`` any batch dims, ``D`` input size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.masks import lengths_to_mask

__all__ = [
    "Sequence",
    "prepare",
    "processing_resets",
    "valid_steps",
]


class Sequence(NamedTuple):
    """A validated, time-major rollout input (see the module docstring).

    Fields:
      xs: ``[T, *B, D]`` floating inputs, zero at padded steps.
      valid: ``bool[T, *B]`` padding mask (``t < lengths``), or None: nothing padded.
      lengths: ``int32[*B]`` valid lengths, or None (with ``valid``: always set).
      reset: ``bool[T, *B]`` episode starts in forward time, or None.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> seq = js.recurrent.prepare(js.GRU(4), None, jnp.ones((3, 2, 5)), lengths=jnp.array([3, 1]))
    >>> seq.xs[:, 1, 0].tolist(), seq.valid[:, 1].tolist(), seq.batch_shape
    ([1.0, 0.0, 0.0], [True, False, False], (2,))
    """

    xs: Any
    valid: Any = None
    lengths: Any = None
    reset: Any = None

    @property
    def t(self) -> int:
        """``T``, the number of steps."""
        return self.xs.shape[0]

    @property
    def batch_shape(self) -> tuple:
        """``*B``, the batch dims."""
        return tuple(self.xs.shape[1:-1])


def valid_steps(lengths, t: int):
    """``bool[T, *B]``: ``mask[t, b] = t < lengths[b]`` (time-major; ``T`` may be 0).

    >>> import jax.numpy as jnp
    >>> valid_steps(jnp.array([1, 3]), 3).astype(int)
    Array([[1, 1],
           [0, 1],
           [0, 1]], dtype=int32)
    """
    if t == 0:
        return jnp.zeros((0, *jnp.shape(lengths)), bool)
    return lengths_to_mask(lengths, t)


def processing_resets(reset, valid, reverse: bool):
    """Reset flags in processing order: ``out[t]`` resets the carry before step ``t``.

    Flags at padded steps (``valid`` False) are dropped; in reverse, the flag of
    step ``t`` resets the carry before step ``t - 1`` (an episode boundary keeps
    its forward meaning). ``reset, valid: bool[T, *B]`` or None.

    >>> import jax.numpy as jnp
    >>> reset = jnp.array([[False], [True], [True]])
    >>> valid = jnp.array([[True], [True], [False]])
    >>> processing_resets(reset, valid, reverse=False)[:, 0].tolist()
    [False, True, False]
    >>> processing_resets(reset, None, reverse=True)[:, 0].tolist()
    [True, True, False]
    """
    if reset is None:
        return None
    if valid is not None:
        reset = reset & valid
    if reverse:
        reset = jnp.concatenate([reset[1:], jnp.zeros_like(reset[:1])], axis=0)
    return reset


def _check_xs(layer, params, xs, time_major: bool) -> None:
    layout = "[T, *B, D]" if time_major else "[*B, T, D] (time_major=False)"
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs: expected an array {layout}, got {type(xs).__name__}")
    _checks.check_floating("xs", xs)
    _checks.check_min_ndim("xs", xs, 2, layout)
    if params is not None and callable(getattr(layer, "check_input", None)):
        if callable(getattr(layer, "check_params", None)):
            layer.check_params(params)
        layer.check_input(params, xs, name="xs", min_ndim=2)


def _check_time_major(time_major) -> bool:
    if not isinstance(time_major, bool | np.bool_):
        raise TypeError(
            f"time_major: expected a Python bool (True: xs [T, *B, D], False: xs [*B, T, D]), "
            f"got {type(time_major).__name__} {time_major!r}"
        )
    return bool(time_major)


def _check_steps(name, x, xs, batch_shape, t, time_major: bool):
    """A ``bool[T, *B]`` (``[*B, T]`` batch-major) argument, returned time-major."""
    want = (t, *batch_shape) if time_major else (*batch_shape, t)
    layout = "[T, *B]" if time_major else "[*B, T], batch-major"
    x = _checks.check_step_flags(name, x, want, layout, "xs", xs)
    return x if time_major else jnp.moveaxis(x, -1, 0)


def _padding(xs, lengths, mask, batch_shape, t, time_major):
    """``(valid, lengths)`` from whichever of ``lengths``/``mask`` the caller gave."""
    if lengths is not None and mask is not None:
        raise ValueError("lengths, mask: expected at most one of them (both describe the padding)")
    if mask is not None:
        valid = _check_steps("mask", mask, xs, batch_shape, t, time_major)
        return valid, jnp.sum(valid.astype(jnp.int32), axis=0)
    if lengths is None:
        return None, None
    lengths = _checks.check_step_lengths(lengths, batch_shape, t, xs)
    return valid_steps(lengths, t), lengths


def prepare(layer, params, xs, *, lengths=None, mask=None, reset=None, time_major=True):
    """Validates a rollout's inputs and returns them as a time-major :class:`Sequence`.

    What :func:`jaxseq.rollout` runs first; a whole-sequence layer receives its result.

    Args:
      layer: the cell or layer (its ``check_params``/``check_input``, when it has
        them, check ``params`` and the last dim of ``xs``).
      params: its parameters (None: skip those checks).
      xs: ``[T, *B, D]`` floating inputs (``[*B, T, D]`` when ``time_major=False``).
      lengths: optional ``int[*B]`` in ``[0, T]``, right padding.
      mask: optional ``bool[T, *B]`` (``[*B, T]`` batch-major) right-padding mask
        instead of ``lengths`` (each sequence's valid steps must come first; not
        checked under ``jit``).
      reset: optional ``bool[T, *B]`` (``[*B, T]`` batch-major) episode starts.
      time_major: the layout of ``xs``, ``mask`` and ``reset``.

    Returns:
      a :class:`Sequence`: ``xs`` time-major with padded steps set to zero, ``valid``
      (None without ``lengths`` and ``mask``), ``lengths`` and ``reset`` time-major.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> seq = js.recurrent.prepare(js.GRU(4), None, jnp.ones((2, 3, 5)), time_major=False)
    >>> seq.xs.shape, seq.valid is None
    ((3, 2, 5), True)
    >>> js.recurrent.prepare(js.GRU(4), None, jnp.ones((3, 2, 5)), lengths=jnp.array([1, 2, 3]))
    Traceback (most recent call last):
    ...
    ValueError: lengths: expected shape [2] (the batch dims of xs float32[3, 2, 5]), got int32[3]
    """
    time_major = _check_time_major(time_major)
    _check_xs(layer, params, xs, time_major)
    t = xs.shape[0] if time_major else xs.shape[-2]
    batch_shape = tuple(xs.shape[1:-1]) if time_major else tuple(xs.shape[:-2])
    valid, lengths = _padding(xs, lengths, mask, batch_shape, t, time_major)
    if reset is not None:
        reset = _check_steps("reset", reset, xs, batch_shape, t, time_major)
    if not time_major:
        xs = jnp.moveaxis(xs, -2, 0)
    if valid is not None:
        xs = jnp.where(valid[..., None], xs, jnp.zeros((), xs.dtype))
    return Sequence(xs, valid, lengths, reset)


def compute_dtype(params, xs):
    """The dtype a rollout computes its outputs and a zero carry in: the result type of
    ``xs`` and the floating leaves of ``params`` (all-bfloat16 gives bfloat16).

    >>> import jax.numpy as jnp
    >>> compute_dtype({"w": jnp.ones(2, jnp.bfloat16)}, jnp.ones(2, jnp.bfloat16))
    dtype(bfloat16)
    >>> compute_dtype({"w": jnp.ones(2)}, jnp.ones(2, jnp.bfloat16))
    dtype('float32')
    """
    leaves = [
        leaf.dtype
        for leaf in jax.tree_util.tree_leaves(params)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return jnp.dtype(jnp.result_type(xs.dtype, *leaves))
