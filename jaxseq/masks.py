"""Boolean masks (``True`` = valid / may attend) from lengths and causality.

The one place the package builds a mask from lengths: rollouts, losses, models
and attention all use these. :func:`length_mask` is the single implementation
(batch-major ``bool[*B, T]``, the layout attention uses); :func:`lengths_to_mask`
is its time-major layout ``bool[T, *B]`` (rollouts, losses, models), the same
values with the time axis moved to the front.

Invariants: ``mask[..., t]`` is True iff ``0 <= t < lengths[...]`` (right
padding; a length <= 0 gives an all-False row, a length >= T an all-True row);
lengths are compared as int32, so int64 lengths under x64 give the same masks.
Shapes: ``T`` time (``Tq``/``Tk`` queries and keys), ``B`` batch (any number of dims).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "CAUSAL_ALIGNMENTS",
    "causal_mask",
    "causal_offset",
    "combine_masks",
    "length_mask",
    "lengths_to_mask",
    "padding_mask",
]


#: The placements of a causal diagonal when ``Tq != Tk`` (see :func:`causal_mask`).
CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def causal_offset(tq: int, tk: int, alignment: str = "top_left", name: str = "alignment") -> int:
    """The diagonal of a causal mask: query ``i`` may attend key ``j`` iff ``j <= i + offset``.

    ``0`` for ``"top_left"``, ``tk - tq`` for ``"bottom_right"`` (see :func:`causal_mask`);
    ``name`` is the argument named in the ``ValueError`` for any other ``alignment``.
    A kernel that masks block by block (never forming the ``[Tq, Tk]`` mask) uses it.

    >>> causal_offset(1, 10, "bottom_right"), causal_offset(4, 4)
    (9, 0)
    """
    _checks.check_choice(name, alignment, CAUSAL_ALIGNMENTS)
    return 0 if alignment == "top_left" else tk - tq


def causal_mask(tq: int, tk: int | None = None, *, alignment: str = "top_left") -> jax.Array:
    """``bool[Tq, Tk]``: query ``i`` may attend to key ``j`` iff ``j <= i + offset``.

    ``tk`` defaults to ``tq``. ``alignment`` places the diagonal when ``Tq != Tk``:

    * ``"top_left"`` (default; ``offset = 0``): the first query sees the first key,
      as ``jax.nn.dot_product_attention(is_causal=True)`` and PyTorch's
      ``is_causal``. Keys past ``Tq - 1`` are seen by no query.
    * ``"bottom_right"`` (``offset = Tk - Tq``): the last query sees every key, as
      when the queries are the newest ``Tq`` positions of a ``Tk``-long sequence
      (decoding with a key/value cache; FlashAttention 2.1+). With ``Tq > Tk`` the
      first ``Tq - Tk`` rows see no key.

    The two agree when ``Tq == Tk``.

    >>> causal_mask(3).astype(int)
    Array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]], dtype=int32)
    >>> causal_mask(2, 4, alignment="bottom_right").astype(int)
    Array([[1, 1, 1, 0],
           [1, 1, 1, 1]], dtype=int32)
    """
    tq = _checks.check_positive_int("tq", tq)
    tk = tq if tk is None else _checks.check_positive_int("tk", tk)
    offset = causal_offset(tq, tk, alignment)
    return jnp.arange(tq)[:, None] + offset >= jnp.arange(tk)[None, :]


def length_mask(lengths, max_length: int) -> jax.Array:
    """``bool[*B, T]`` (batch-major): position ``t`` is valid iff ``t < lengths`` (right padding).

    Args:
      lengths: ``int[*B]`` valid lengths (a scalar for one example).
      max_length: ``T``.

    >>> length_mask(jnp.array([0, 2, 5]), 3).astype(int)
    Array([[0, 0, 0],
           [1, 1, 0],
           [1, 1, 1]], dtype=int32)
    """
    max_length = _checks.check_positive_int("max_length", max_length)
    lengths = _checks.as_array("lengths", lengths)
    _checks.check_integer("lengths", lengths)
    steps = jnp.arange(max_length, dtype=jnp.int32).reshape((1,) * lengths.ndim + (max_length,))
    return steps < lengths.astype(jnp.int32)[..., None]


def lengths_to_mask(lengths, max_length: int) -> jax.Array:
    """``bool[T, *B]`` (time-major): ``mask[t, b] = t < lengths[b]``.

    The time-major layout of :func:`length_mask` (``lengths: int[*B]``, ``max_length``
    is ``T``), for rollouts, losses and models over ``[T, *B, ...]`` sequences.

    >>> lengths_to_mask(jnp.array([1, 3]), 3).astype(int)
    Array([[1, 1],
           [0, 1],
           [0, 1]], dtype=int32)
    """
    return jnp.moveaxis(length_mask(lengths, max_length), -1, 0)


def padding_mask(q_lengths, k_lengths, tq: int, tk: int) -> jax.Array:
    """``bool[*B, Tq, Tk]``: valid query rows times valid key columns.

    Args:
      q_lengths: ``int[*B]`` query lengths, or ``None`` (every query row valid).
      k_lengths: ``int[*B]`` key lengths.
      tq, tk: ``Tq`` and ``Tk``.

    >>> padding_mask(jnp.array(1), jnp.array(2), 2, 3).astype(int)
    Array([[1, 1, 0],
           [0, 0, 0]], dtype=int32)
    """
    k_valid = length_mask(k_lengths, tk)  # [*B, Tk]
    if q_lengths is None:
        q_valid = jnp.ones(k_valid.shape[:-1] + (tq,), bool)
    else:
        q_valid = length_mask(q_lengths, tq)
    if q_valid.shape[:-1] != k_valid.shape[:-1]:
        raise ValueError(
            f"q_lengths: expected the batch shape of k_lengths {list(k_valid.shape[:-1])}, "
            f"got {list(q_valid.shape[:-1])}"
        )
    return q_valid[..., :, None] & k_valid[..., None, :]


def combine_masks(*masks) -> jax.Array | None:
    """Logical AND of boolean masks of one shape; ``None`` entries are ignored.

    Returns ``None`` when every entry is ``None``.

    >>> combine_masks(causal_mask(2), None, jnp.array([[True, False], [False, True]])).astype(int)
    Array([[1, 0],
           [0, 1]], dtype=int32)
    """
    masks = tuple(m for m in masks if m is not None)
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
