"""Positional encodings: sinusoidal (Vaswani et al. 2017), learned, rotary (RoPE, Su et al. 2021).

Shapes: ``T`` positions, ``D`` model (or head) size. Every function works on
one example; positions default to ``0..T-1`` and may be any ``int[T]`` (e.g.
offsets when decoding step by step, or per-example positions under ``vmap``).

* :func:`sinusoidal` returns ``[T, D]`` to add to the embeddings:
  ``PE[t, 2i] = sin(t / base^(2i/D))``, ``PE[t, 2i+1] = cos(t / base^(2i/D))``.
* :class:`LearnedPositions` keeps a trainable table ``[T_max, D]`` (:func:`learned`
  reads its rows).
* :func:`rotary` rotates queries and keys (not values) before the dot product:
  feature pairs ``(x[i], x[i + D/2])`` (the "rotate half" layout) are rotated by
  the angle ``t * base^(-2i/D)``. Rotations preserve norms, and
  ``rotary(q, m) . rotary(k, n)`` depends only on ``m - n``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "LearnedPositions",
    "learned",
    "rotary",
    "rotary_angles",
    "sinusoidal",
]


def _positions(positions, length, name="positions"):
    if positions is None:
        return jnp.arange(length, dtype=jnp.float32)
    positions = _checks.as_array(name, positions)
    _checks.check_ndim(name, positions, 1, "[T]")
    if length is not None and positions.shape[0] != length:
        raise ValueError(f"{name}: expected shape [T={length}], got {_checks.describe(positions)}")
    return positions.astype(jnp.float32)


def sinusoidal(
    length: int, dim: int, *, positions=None, base: float = 10000.0, dtype=jnp.float32
) -> jax.Array:
    """Sinusoidal encodings ``[T, D]`` (interleaved sin/cos, Vaswani et al. 2017).

    Args:
      length: ``T``.
      dim: ``D`` (odd ``D`` drops the last cosine column).
      positions: optional ``int[T]`` or ``float[T]`` positions (default ``0..T-1``).
      base: the wavelength base (10000 in the paper).

    >>> sinusoidal(3, 4).round(3).tolist()[1]
    [0.841, 0.54, 0.01, 1.0]
    """
    length = _checks.check_positive_int("length", length)
    dim = _checks.check_positive_int("dim", dim)
    pos = _positions(positions, length)
    half = (dim + 1) // 2
    inv_freq = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / dim)  # [ceil(D/2)]
    ang = pos[:, None] * inv_freq[None, :]  # [T, ceil(D/2)]
    pe = jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1).reshape(length, 2 * half)
    return pe[:, :dim].astype(dtype)


@dataclasses.dataclass(frozen=True)
class LearnedPositions:
    """A trainable position table ``[T_max, D]``, added to the embeddings.

    Args:
      max_length: ``T_max``, the longest sequence (positions past it were never trained).
      stddev: the table is drawn from ``N(0, stddev^2)`` (default 0.02).

    ``init(key, input_size, dtype)`` returns the table ``[T_max, D]`` for
    ``D = input_size``; ``apply(table, length=None, *, positions=None)`` is
    :func:`learned`: its first ``length`` rows, or the rows at ``positions``.

    >>> pos = LearnedPositions(16)
    >>> table = pos.init(jax.random.key(0), 4)
    >>> table.shape, pos.apply(table, 3).shape
    ((16, 4), (3, 4))
    """

    max_length: int
    stddev: float = 0.02

    def __post_init__(self):
        _checks.check_positive_int("max_length", self.max_length)

    def init(self, key, input_size: int, dtype=jnp.float32) -> jax.Array:
        """The table ``[T_max, D]``, drawn in float32 and cast to ``dtype``."""
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        table = jax.random.normal(key, (self.max_length, d), jnp.float32)
        return (self.stddev * table).astype(dtype)

    def apply(self, table, length: int | None = None, *, positions=None) -> jax.Array:
        """``[T, D]`` rows of ``table`` (:func:`learned`)."""
        _checks.check_ndim("table", table, 2, "[T_max, D]")
        _checks.check_shape("table", table, (self.max_length, None), ("T_max", "D"))
        return learned(table, length, positions=positions)


def learned(table, length: int | None = None, *, positions=None) -> jax.Array:
    """Rows of a learned table: ``table[:length]`` or ``table[positions]`` -> ``[T, D]``
    (the pure function under :meth:`LearnedPositions.apply`).

    Raises if ``length`` exceeds the table (positions beyond it were never trained).

    >>> table = jnp.arange(8.0).reshape(4, 2)
    >>> learned(table, 2).tolist(), learned(table, positions=jnp.array([3])).tolist()
    ([[0.0, 1.0], [2.0, 3.0]], [[6.0, 7.0]])
    """
    _checks.check_ndim("table", table, 2, "[T_max, D]")
    t_max = table.shape[0]
    if positions is not None:
        positions = _checks.as_array("positions", positions)
        _checks.check_integer("positions", positions)
        _checks.check_ndim("positions", positions, 1, "[T]")
        return jnp.take(table, positions, axis=0, mode="clip")
    if length is None:
        raise ValueError("length: expected an int when positions is None, got None")
    length = _checks.check_positive_int("length", length)
    if length > t_max:
        raise ValueError(f"length: expected at most T_max={t_max} (table rows), got {length}")
    return table[:length]


def rotary_angles(length: int, dim: int, *, positions=None, base: float = 10000.0):
    """``(cos, sin)``, each ``float32[T, D/2]``: angle ``t * base^(-2i/D)`` of pair ``i``.

    >>> cos, sin = rotary_angles(3, 4)
    >>> cos.shape, sin.round(3).tolist()[1]
    ((3, 2), [0.841, 0.01])
    """
    length = _checks.check_positive_int("length", length)
    dim = _checks.check_positive_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim: rotary encodings need an even size, got {dim}")
    pos = _positions(positions, length)
    inv_freq = base ** (-2.0 * jnp.arange(dim // 2, dtype=jnp.float32) / dim)
    ang = pos[:, None] * inv_freq[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def rotary(x, *, positions=None, base: float = 10000.0) -> jax.Array:
    """Applies rotary position embeddings to ``x: [T, D]`` (or ``[T, K, D]`` per head).

    Pair ``i`` is ``(x[..., i], x[..., i + D/2])``; at position ``t`` it is rotated
    by ``t * base^(-2i/D)``. Computed in float32, returned in ``x``'s dtype.
    Apply it to queries and keys (with their own positions), not to values.

    >>> x = jnp.ones((3, 4))
    >>> y = rotary(x)
    >>> y.shape, bool(jnp.allclose(jnp.linalg.norm(y, axis=-1), 2.0))  # norms kept
    ((3, 4), True)
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array [T, D] or [T, K, D], got {type(x).__name__}")
    _checks.check_floating("x", x)
    if x.ndim not in (2, 3):
        raise ValueError(f"x: expected shape [T, D] or [T, K, D], got {_checks.describe(x)}")
    t, d = x.shape[0], x.shape[-1]
    if d % 2:
        raise ValueError(f"x: rotary encodings need an even last dim D, got {_checks.describe(x)}")
    cos, sin = rotary_angles(t, d, positions=positions, base=base)  # [T, D/2]
    if x.ndim == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
