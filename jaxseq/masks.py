"""Boolean masks (``True`` = valid / may attend) from lengths and causality.

The one place the package builds a mask from lengths: rollouts, losses, models
and attention all use these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "causal_mask",
    "combine_masks",
    "length_mask",
    "lengths_to_mask",
    "padding_mask",
]


def causal_mask(tq: int, tk: int | None = None) -> jax.Array:
    """``bool[Tq, Tk]``: query ``i`` may attend to key ``j`` iff ``j <= i`` (top-left aligned)."""
    tq = _checks.check_positive_int("tq", tq)
    tk = tq if tk is None else _checks.check_positive_int("tk", tk)
    return jnp.arange(tq)[:, None] >= jnp.arange(tk)[None, :]


def length_mask(length, max_length: int) -> jax.Array:
    """``bool[*B, T]``: position ``t`` is valid iff ``t < length`` (right padding).

    ``length: int[*B]`` (a scalar for one example).
    """
    max_length = _checks.check_positive_int("max_length", max_length)
    length = _checks.as_array("length", length)
    _checks.check_integer("length", length)
    pos = jnp.arange(max_length).reshape((1,) * length.ndim + (max_length,))
    return pos < length[..., None]


def padding_mask(q_length, k_length, tq: int, tk: int) -> jax.Array:
    """``bool[*B, Tq, Tk]``: valid query rows times valid key columns.

    ``q_length`` may be ``None`` (every query row valid); ``k_length: int[*B]``.
    """
    k_valid = length_mask(k_length, tk)  # [*B, Tk]
    if q_length is None:
        q_valid = jnp.ones(k_valid.shape[:-1] + (tq,), bool)
    else:
        q_valid = length_mask(q_length, tq)
    if q_valid.shape[:-1] != k_valid.shape[:-1]:
        raise ValueError(
            f"q_length: expected the batch shape of k_length {list(k_valid.shape[:-1])}, "
            f"got {list(q_valid.shape[:-1])}"
        )
    return q_valid[..., :, None] & k_valid[..., None, :]


def combine_masks(*masks) -> jax.Array | None:
    """Logical AND of boolean masks of one shape; ``None`` entries are ignored."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for i, m in enumerate(masks[1:], start=1):
        _checks.check_bool(f"masks[{i}]", m)
        if m.shape != out.shape:
            raise ValueError(
                f"masks[{i}]: expected shape {list(out.shape)}, got {_checks.describe(m)}"
            )
        out = out & m
    return out


def lengths_to_mask(lengths, t: int) -> jax.Array:
    """``lengths: int[*B]`` -> ``bool[T, *B]`` with ``mask[t, b] = t < lengths[b]`` (time-major)."""
    lengths = _checks.as_array("lengths", lengths)
    _checks.check_integer("lengths", lengths)
    steps = jnp.arange(t, dtype=jnp.int32).reshape((t,) + (1,) * lengths.ndim)
    return steps < lengths[None].astype(jnp.int32)
