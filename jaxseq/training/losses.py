"""Losses and metrics for sequence models.

Shapes: ``logits: [*N, V]`` (any leading dims, e.g. time-major ``[T, B, V]``),
``targets: int[*N]``, ``mask: bool[*N]`` (True = counts). ``lengths: int[B]``
is the time-major shorthand for a mask over ``[T, B]``: step ``t`` of sequence
``b`` counts when ``t < lengths[b]``. V is the vocabulary size.

Numerics: log-softmax in float32 (stable for any logit scale and for
bfloat16 inputs), float32 sums; the mean is over valid tokens only, and a
batch with no valid token gives 0, not NaN.

Masked positions never matter: logits, predictions and targets there are
replaced (``jnp.where``) before any arithmetic, so padding with ``-100``, NaN
or inf changes neither the loss nor its gradient (the gradient there is 0).

Target ids must lie in ``[0, V)`` at valid positions. Concrete targets out of
range raise ``ValueError``; under ``jax.jit`` the check is a checkify check,
enforced by :func:`jaxseq.checked` and skipped by plain ``jit``, where JAX's
gather gives NaN for an id >= V or < -V and counts a negative id from the end.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.masks import lengths_to_mask

__all__ = [
    "accuracy",
    "bits_per_token",
    "cross_entropy",
    "mse",
    "nats_to_bits",
    "token_cross_entropy",
]


LN2 = math.log(2.0)


def _resolve_mask(name_shape, shape, mask, lengths):
    if mask is not None and lengths is not None:
        raise ValueError("mask, lengths: give at most one of them, got both")
    if lengths is not None:
        lengths = _checks.as_array("lengths", lengths)
        _checks.check_integer("lengths", lengths)
        if len(shape) < 1 or tuple(lengths.shape) != tuple(shape[1:]):
            raise ValueError(
                f"lengths: expected shape {list(shape[1:])} (the batch dims of {name_shape} "
                f"[T, *B] = {list(shape)}), got {_checks.describe(lengths)}"
            )
        return lengths_to_mask(lengths, shape[0])
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(
                f"mask: expected shape {list(shape)} (the shape of {name_shape}), "
                f"got {_checks.describe(mask)}"
            )
        return mask.astype(jnp.bool_)
    return None


def _check_logits_targets(logits, targets):
    logits = _checks.as_array("logits", logits)
    targets = _checks.as_array("targets", targets)
    _checks.check_floating("logits", logits)
    _checks.check_min_ndim("logits", logits, 1, "[*N, V]")
    _checks.check_integer("targets", targets)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {list(logits.shape[:-1])} (logits {_checks.describe(logits)} "
            f"without the vocabulary axis), got {_checks.describe(targets)}"
        )
    return logits, targets


def _check_targets(targets, v: int) -> None:
    """Target ids in ``[0, V)`` (ValueError now, or a checkify check when traced)."""
    if targets.size:
        _checks.check_in_range("targets", targets, 0, v - 1, f" (class ids, V={v})")


def _select_valid(mask, logits, targets):
    """Masked positions get logits 0 and target 0 before any arithmetic (None: unchanged)."""
    if mask is None:
        return logits, targets
    logits = jnp.where(mask[..., None], logits, jnp.zeros((), logits.dtype))
    return logits, jnp.where(mask, targets, jnp.zeros((), targets.dtype))


def _token_xent(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)
    return -picked[..., 0]


def _masked_mean(values, mask):
    """float32 mean of ``values`` over ``mask`` (all when None); 0 when nothing is valid."""
    values = values.astype(jnp.float32)
    if mask is None:
        return jnp.mean(values) if values.size else jnp.zeros((), jnp.float32)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask.astype(jnp.float32))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def token_cross_entropy(logits, targets) -> jax.Array:
    """Per-token ``-log softmax(logits)[target]`` in float32: ``[*N, V], int[*N] -> [*N]``.

    Every target must be in ``[0, V)`` (there is no mask here: select padded
    positions away first, or use :func:`cross_entropy` with ``mask``). Out of
    range: ``ValueError`` for concrete targets; under ``jit`` only
    :func:`jaxseq.checked` raises, plain ``jit`` gives NaN (id >= V) or wraps a
    negative id.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    >>> js.training.token_cross_entropy(logits, jnp.array([0, 2])).round(4).tolist()
    [0.6931, 0.2231]
    """
    logits, targets = _check_logits_targets(logits, targets)
    _check_targets(targets, logits.shape[-1])
    return _token_xent(logits, targets)


def cross_entropy(logits, targets, mask=None, *, lengths=None) -> jax.Array:
    """Softmax cross-entropy in nats, averaged over valid tokens.

    Args:
      logits: ``[*N, V]`` floating.
      targets: ``int[*N]`` class ids in ``[0, V)`` at valid positions; masked
        positions may hold anything (e.g. ``-100``).
      mask: optional ``bool[*N]``; False entries do not count (their logits and
        targets are selected away before any arithmetic: NaN there is harmless).
      lengths: optional ``int[B]`` for time-major ``[T, B]`` inputs (instead of ``mask``).

    Returns:
      float32 scalar: mean over valid tokens (0 when there are none).

    Raises:
      ValueError: a target at a valid position outside ``[0, V)`` (concrete
        targets; under ``jit`` only with :func:`jaxseq.checked`, plain ``jit``
        gives NaN or a wrapped id there).

    >>> import jax.numpy as jnp, jaxseq as js
    >>> logits = jnp.zeros((3, 2, 4))                 # [T, B, V]: uniform, log 4 nats
    >>> targets = jnp.zeros((3, 2), jnp.int32)
    >>> round(float(js.cross_entropy(logits, targets, lengths=jnp.array([3, 1]))), 4)
    1.3863
    """
    logits, targets = _check_logits_targets(logits, targets)
    mask = _resolve_mask("targets", targets.shape, mask, lengths)
    logits, targets = _select_valid(mask, logits, targets)
    _check_targets(targets, logits.shape[-1])
    return _masked_mean(_token_xent(logits, targets), mask)


def accuracy(logits, targets, mask=None, *, lengths=None) -> jax.Array:
    """Fraction of valid tokens whose argmax equals the target (float32 scalar).

    ``logits: [*N, V]``, ``targets: int[*N]``, ``mask: bool[*N]`` or ``lengths: int[B]``
    (time-major ``[T, B]``). Targets at valid positions must be in ``[0, V)``
    (checked as :func:`cross_entropy`); masked positions may hold anything.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> logits = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    >>> float(js.training.accuracy(logits, jnp.array([1, 1, 0]), jnp.array([True, True, False])))
    0.5
    """
    logits, targets = _check_logits_targets(logits, targets)
    mask = _resolve_mask("targets", targets.shape, mask, lengths)
    logits, targets = _select_valid(mask, logits, targets)
    _check_targets(targets, logits.shape[-1])
    hit = jnp.argmax(logits, axis=-1) == targets
    return _masked_mean(hit, mask)


def nats_to_bits(nats):
    """Converts a loss in nats to bits (divides by ln 2).

    >>> import math, jaxseq as js
    >>> js.training.nats_to_bits(math.log(8.0))
    3.0
    """
    return nats / LN2


def bits_per_token(logits, targets, mask=None, *, lengths=None) -> jax.Array:
    """:func:`cross_entropy` in bits per token (bits per character for a char model).

    >>> import jax.numpy as jnp, jaxseq as js
    >>> round(float(js.training.bits_per_token(jnp.zeros((5, 8)), jnp.zeros(5, jnp.int32))), 4)
    3.0
    """
    return nats_to_bits(cross_entropy(logits, targets, mask, lengths=lengths))


def mse(predictions, targets, mask=None, *, lengths=None) -> jax.Array:
    """Mean squared error over valid positions, float32.

    ``predictions, targets: [*N, D]`` (same shape); ``mask: bool[*N]`` masks
    whole positions (all D features); the mean is over valid positions and features.
    Masked positions are selected away before the subtraction, so NaN, inf or
    sentinel values there reach neither the loss nor its gradient.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> pred = jnp.zeros((3, 2, 1))                   # [T, B, D]
    >>> targets = jnp.array([[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], [6.0]]])
    >>> float(js.training.mse(pred, targets, lengths=jnp.array([1, 2])))  # (1 + 4 + 16) / 3
    7.0
    """
    predictions = _checks.as_array("predictions", predictions)
    targets = _checks.as_array("targets", targets)
    _checks.check_floating("predictions", predictions)
    _checks.check_min_ndim("predictions", predictions, 1, "[*N, D]")
    if tuple(targets.shape) != tuple(predictions.shape):
        raise ValueError(
            f"targets: expected shape {list(predictions.shape)} (the shape of predictions), "
            f"got {_checks.describe(targets)}"
        )
    mask = _resolve_mask("predictions[..., 0]", predictions.shape[:-1], mask, lengths)
    if mask is not None:
        keep = mask[..., None]
        predictions = jnp.where(keep, predictions, jnp.zeros((), predictions.dtype))
        targets = jnp.where(keep, targets, jnp.zeros((), targets.dtype))
    err = jnp.mean(
        jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32)), axis=-1
    )
    return _masked_mean(err, mask)
