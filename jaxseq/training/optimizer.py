"""The optimizer factory: global-norm clipping, then Adam/AdamW/SGD/RMSprop.

:func:`make_optimizer` returns a plain ``optax.GradientTransformation``. Its
learning rate (and, for AdamW, its weight decay) is injected with
``optax.inject_hyperparams``, so the state carries the value of the current
step in ``opt_state.hyperparams["learning_rate"]``: the train step reports it,
and a user may overwrite it between steps.

Schedule rule: a schedule is a function of the number of *applied* updates
(the optimizer's own count; steps skipped by the non-finite guard do not
count). A warmup + cosine schedule built with ``total_steps=N`` keeps its
shape when a run is extended past N: it stays at its final value
``final_lr_ratio * learning_rate``. For a new schedule over a longer run,
build a new optimizer with the new total and restore the parameters (and,
if wanted, the moments) from the checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import _checks

__all__ = [
    "OPTIMIZERS",
    "make_optimizer",
]


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


def _check_learning_rate(learning_rate):
    """A positive real scalar (Python, NumPy or JAX) as a float, or a schedule (callable)."""
    if callable(learning_rate):
        return learning_rate
    bad = ValueError(
        "learning_rate: expected a positive real scalar (Python, NumPy or JAX) or an optax "
        f"schedule (step -> lr), got {learning_rate!r}"
    )
    if isinstance(learning_rate, bool | np.bool_) or np.ndim(learning_rate) != 0:
        raise bad
    dtype = np.asarray(learning_rate).dtype if not hasattr(learning_rate, "dtype") else None
    dtype = learning_rate.dtype if dtype is None else dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise bad
    try:
        value = float(learning_rate)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            "learning_rate: expected a concrete scalar (make the optimizer outside jit), "
            f"got {learning_rate!r}"
        ) from None
    if not (np.isfinite(value) and value > 0):
        raise bad
    return value


def make_optimizer(
    name: str = "adam",
    learning_rate=1e-3,
    *,
    max_norm: float | None = 1.0,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_ratio: float = 0.0,
    cooldown_steps: int | None = None,
    weight_decay: float = 0.0,
    decay_biases: bool = False,
    momentum: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_norm)`` then ``<name>``, as one optax transformation.

    Args:
      name: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"rmsprop"`` (see ``OPTIMIZERS``).
      learning_rate: the peak learning rate, a positive Python, NumPy or JAX scalar;
        or any optax schedule (a callable ``count -> lr``), used as given.
      max_norm: clip the global gradient norm to this (None: no clipping).
      warmup_steps: linear warmup from 0 to ``learning_rate`` over this many steps
        (a number ``learning_rate`` only).
      total_steps: when given, cosine decay to ``final_lr_ratio * learning_rate``
        at ``total_steps`` (after the warmup), constant afterwards; when None,
        constant after the warmup (a number ``learning_rate`` only).
      final_lr_ratio: the end of the decay, as a fraction of ``learning_rate``.
      cooldown_steps: with ``total_steps``, a warmup-stable-decay schedule instead of
        the cosine: ``learning_rate`` from the end of the warmup to ``total_steps -
        cooldown_steps``, then down to ``final_lr_ratio * learning_rate`` at
        ``total_steps`` along ``1 - sqrt(progress)`` (the cooldown shape Hägele et
        al., 2024, found best), constant afterwards.
      weight_decay: decoupled weight decay (adamw only), on the weight matrices and
        embeddings (leaves with 2 or more dimensions); biases (the LSTM forget-gate
        bias among them) and other vectors are not decayed unless ``decay_biases``.
      decay_biases: decay every leaf, vectors included.
      momentum: for sgd (0: plain) and rmsprop.
      b1, b2, eps: Adam/AdamW moments.

    Returns:
      an ``optax.GradientTransformation`` whose state has ``hyperparams``
      (``"learning_rate"``, and ``"weight_decay"`` for adamw): the values of the
      last update (of step 0 right after ``init``).

    >>> import jax.numpy as jnp, numpy as np, optax
    >>> opt = make_optimizer("adam", np.float32(1e-2), warmup_steps=2, total_steps=10)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> float(state.hyperparams["learning_rate"])
    0.0
    >>> _, state = opt.update({"w": jnp.ones(3)}, state, params)
    >>> _, state = opt.update({"w": jnp.ones(3)}, state, params)
    >>> round(float(state.hyperparams["learning_rate"]), 4)  # step 1 of the warmup
    0.005
    >>> opt = make_optimizer("sgd", optax.exponential_decay(0.1, 1, 0.5))
    >>> _, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    >>> float(state.hyperparams["learning_rate"])
    0.1
    """
    _checks.check_choice("name", name, OPTIMIZERS)
    lr = _check_learning_rate(learning_rate)
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm: expected a positive number or None, got {max_norm!r}")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected a non-negative int, got {warmup_steps!r}")
    if weight_decay and name != "adamw":
        raise ValueError(f"weight_decay: only adamw uses it, got {weight_decay!r} with {name!r}")
    if cooldown_steps is not None and total_steps is None:
        raise ValueError(
            f"cooldown_steps: the end of a run of total_steps, got cooldown_steps="
            f"{cooldown_steps!r} without total_steps"
        )
    if callable(lr):
        if warmup_steps or total_steps is not None:
            raise ValueError(
                "warmup_steps, total_steps: apply to a number learning_rate only, got a "
                "schedule; put the warmup and decay in the schedule itself"
            )
        schedule = lr
    elif total_steps is not None:
        total = _checks.check_positive_int("total_steps", total_steps)
        if total <= warmup_steps:
            raise ValueError(
                f"total_steps: expected more than warmup_steps={warmup_steps}, got {total}"
            )
        if cooldown_steps is None:
            schedule = optax.warmup_cosine_decay_schedule(
                0.0, lr, int(warmup_steps), total, end_value=lr * float(final_lr_ratio)
            )
        else:
            schedule = _warmup_stable_decay(
                lr, int(warmup_steps), total, cooldown_steps, float(final_lr_ratio)
            )
    elif warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, int(warmup_steps)), optax.constant_schedule(lr)],
            [int(warmup_steps)],
        )
    else:
        schedule = lr  # a constant: stored once in the state, no schedule call per step
    clip = [] if max_norm is None else [optax.clip_by_global_norm(float(max_norm))]

    if name == "adamw":
        mask = None if decay_biases else _matrices_mask

        def adamw_factory(learning_rate, weight_decay):
            base = optax.adamw(
                learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
            )
            return optax.chain(*clip, base)

        return optax.inject_hyperparams(adamw_factory)(
            learning_rate=schedule, weight_decay=float(weight_decay)
        )

    def factory(learning_rate):
        if name == "adam":
            base = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
        elif name == "sgd":
            base = optax.sgd(learning_rate, momentum=momentum or None)
        else:
            base = optax.rmsprop(learning_rate, momentum=momentum)
        return optax.chain(*clip, base)

    return optax.inject_hyperparams(factory)(learning_rate=schedule)


def _warmup_stable_decay(lr: float, warmup: int, total: int, cooldown, final_ratio: float):
    """Linear warmup to ``lr``, ``lr`` until ``total - cooldown``, then ``1 - sqrt`` down to
    ``final_ratio * lr`` at ``total`` (constant afterwards)."""
    cooldown = _checks.check_positive_int("cooldown_steps", cooldown)
    if cooldown > total - warmup:
        raise ValueError(
            f"cooldown_steps: expected at most total_steps - warmup_steps = {total - warmup}, "
            f"got {cooldown}"
        )
    start, end = total - cooldown, lr * final_ratio

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        rise = lr * c / warmup if warmup else jnp.float32(lr)
        progress = jnp.clip((c - start) / cooldown, 0.0, 1.0)
        fall = end + (lr - end) * (1.0 - jnp.sqrt(progress))
        return jnp.where(c < warmup, rise, fall)

    return schedule


def _matrices_mask(params):
    """True for the leaves weight decay applies to: those with at least 2 dimensions."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)
