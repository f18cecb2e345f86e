"""The optimizer factory: global-norm clipping, then Adam/AdamW/SGD/RMSprop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxseq import _checks

__all__ = [
    "Optimizer",
    "make_optimizer",
]


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


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
