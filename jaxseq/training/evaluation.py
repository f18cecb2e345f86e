"""Evaluation of any model over a batch source: per-example metrics, means over real examples.

:func:`evaluate` runs a jitted ``apply_fn(params, batch)`` over every batch of
a source (a batcher, a list, a generator), turns its output into per-example
metric values with the metrics given, and returns each metric's mean over the
real examples: a batch's ``"example_mask"`` (the duplicates that
:class:`jaxseq.data.PaddedBatcher` adds to fill its last batches are False)
weights every value, so each example counts once.

Shapes: B batch (the examples of one batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "evaluate",
]


def evaluate(
    apply_fn: Callable,
    params,
    batches: Iterable,
    metrics: Mapping[str, Callable] | Callable | None = None,
) -> dict[str, float]:
    """Means of per-example metrics over the real examples of every batch of ``batches``.

    Args:
      apply_fn: ``apply_fn(params, batch) -> outputs`` (e.g. logits); run under
        ``jax.jit``, compiled once per batch shape (and reused by later calls
        given the same ``apply_fn`` and ``metrics`` objects).
      params: the parameters, passed to ``apply_fn``.
      batches: an iterable of batch pytrees: a :class:`jaxseq.data.PaddedBatcher`
        (one epoch, in order), a list, a generator. A batch that is a mapping (or
        has an attribute) with ``"example_mask": bool[B]`` has its examples
        weighted by it: an example where it is False counts zero.
      metrics: how to score the outputs, one of

        - a dict ``{name: fn(outputs, batch) -> value}``;
        - a function ``fn(outputs, batch) -> {name: value}``;
        - ``None``: ``apply_fn`` itself returns ``{name: value}``.

        Each ``value`` is per example: ``[B]`` (the metric is the mean of the
        values over the real examples), or a pair ``(total [B], count [B])``
        (the metric is ``sum(total) / sum(count)`` over the real examples: a
        per-token metric of a tagger or seq2seq model sums over each example's
        tokens and counts them). Booleans count as 0 and 1.

    Returns:
      ``{name: float}``, each the mean over the real examples of all batches
      (float32 per batch, summed over batches in float64); NaN for a metric whose
      count over the real examples is zero.

    Raises:
      TypeError, ValueError: ``batches`` is one batch (a dict) or holds no batch;
        a metric is not per example (not ``[B]``, e.g. already a batch mean), or
        its total and count differ in shape; ``example_mask`` is not ``[B]``.

    A classifier (logits ``[B, C]``): the last batch of 3 examples in batches of 2
    holds a duplicate, which the mean leaves out.

    >>> import jax.numpy as jnp, numpy as np, jaxseq as js
    >>> bt = js.data.PaddedBatcher(
    ...     {"tokens": [np.arange(n) for n in (2, 3, 4)], "label": [0, 1, 1]}, 2, shuffle=False)
    >>> def apply_fn(params, batch):                  # logits [B, 2] from the lengths
    ...     return batch["tokens_lengths"][:, None] * params[None, :]
    >>> metrics = {
    ...     "accuracy": lambda logits, batch: jnp.argmax(logits, -1) == batch["label"],
    ...     "loss": lambda logits, batch: js.training.token_cross_entropy(logits, batch["label"]),
    ... }
    >>> out = js.training.evaluate(apply_fn, jnp.array([-1.0, 1.0]), bt, metrics)
    >>> {k: round(v, 4) for k, v in out.items()}      # 2 of the 3 examples right
    {'accuracy': 0.6667, 'loss': 1.3403}
    """
    if isinstance(batches, Mapping):
        raise TypeError(
            "batches: expected an iterable of batches (a batcher, a list, a generator), got one "
            "batch (a mapping); pass [batch]"
        )
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(
            "batches: expected an iterable of batches (a batcher, a list, a generator), got "
            f"{type(batches).__name__}"
        ) from None
    static_metrics: Mapping | tuple | Callable | None = metrics
    if metrics is not None and not callable(metrics):
        if not isinstance(metrics, Mapping) or not metrics:
            raise TypeError(
                "metrics: expected a non-empty dict name -> fn(outputs, batch), a function "
                f"fn(outputs, batch) -> dict, or None, got {type(metrics).__name__}"
            )
        static_metrics = tuple(metrics.items())  # hashable: the jitted function's static argument
    sums = []
    for batch in iterator:
        sums.append(_batch_sums(apply_fn, static_metrics, params, batch, _example_mask(batch)))
    if not sums:
        raise ValueError("batches: expected at least one batch, got none")
    sums = jax.device_get(sums)
    out = {}
    for name in sums[0]:
        total = sum(np.float64(s[name][0]) for s in sums)
        count = sum(np.float64(s[name][1]) for s in sums)
        out[name] = float(total / count) if count != 0 else float("nan")
    return out


def _example_mask(batch):
    """The batch's ``example_mask`` (a key of a mapping or an attribute), else None."""
    if isinstance(batch, Mapping):
        return batch.get("example_mask")
    return getattr(batch, "example_mask", None)


@functools.partial(jax.jit, static_argnames=("apply_fn", "metrics"))
def _batch_sums(apply_fn, metrics, params, batch, mask):
    """``{name: (sum of totals, sum of counts)}`` (float32) over the real examples of a batch."""
    outputs = apply_fn(params, batch)
    if metrics is None:
        values = outputs
        source = "apply_fn (metrics=None)"
    elif callable(metrics):
        values = metrics(outputs, batch)
        source = "metrics"
    else:
        values = {name: fn(outputs, batch) for name, fn in metrics}
        source = None
    if not isinstance(values, Mapping) or not values:
        raise TypeError(
            f"{source}: expected a non-empty dict name -> per-example values [B], got "
            f"{type(values).__name__}"
        )
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim != 1:
            raise ValueError(
                f"example_mask: expected shape [B], got {mask.dtype}{list(mask.shape)}"
            )
        mask = mask.astype(jnp.bool_)
    out = {}
    for name, value in values.items():
        where = f"metrics[{name!r}]" if source is None else f"{source}[{name!r}]"
        total, count = _total_count(where, value, None if mask is None else mask.shape[0])
        keep = jnp.ones(total.shape, jnp.bool_) if mask is None else mask
        # values of examples that do not count are selected away, never multiplied by 0
        out[name] = (
            jnp.sum(jnp.where(keep, total, 0.0)),
            jnp.sum(jnp.where(keep, count, 0.0)),
        )
    return out


def _total_count(where: str, value, batch_size: int | None):
    """``(total float32[B], count float32[B])`` of one metric value, shapes checked."""
    if isinstance(value, tuple) and len(value) == 2:
        total, count = jnp.asarray(value[0]), jnp.asarray(value[1])
    else:
        total = jnp.asarray(value)
        count = jnp.ones(total.shape, jnp.float32)
    if total.ndim != 1 or (batch_size is not None and total.shape[0] != batch_size):
        b = "B" if batch_size is None else f"B={batch_size}"
        raise ValueError(
            f"{where}: expected per-example values [{b}] (not a batch mean), got "
            f"{total.dtype}{list(total.shape)}"
        )
    if count.shape != total.shape:
        raise ValueError(
            f"{where}: expected (total, count) of one shape {list(total.shape)}, got count "
            f"{count.dtype}{list(count.shape)}"
        )
    return total.astype(jnp.float32), count.astype(jnp.float32)
