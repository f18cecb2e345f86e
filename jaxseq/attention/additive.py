"""Attention of one decoder query over encoder states: additive (Bahdanau) and
multiplicative (Luong), with a length or a mask over the encoder steps.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import add_bias, masked_softmax, matmul_f32
from jaxseq.attention.dot_product import _keep_rows, _weighted_values
from jaxseq.masks import combine_masks, length_mask

__all__ = [
    "AdditiveAttention",
    "AdditiveAttentionParams",
    "LuongAttention",
    "LuongAttentionParams",
    "additive_attention",
    "additive_attention_keys",
    "luong_attention",
]


def _encoder_args(query, keys, values, lengths, mask):
    if not hasattr(query, "shape") or not hasattr(keys, "shape"):
        raise TypeError("query, keys: expected arrays")
    _checks.check_floating("query", query)
    _checks.check_floating("keys", keys)
    if query.ndim not in (1, 2):
        raise ValueError(
            f"query: expected shape [Dq] or [Tq, Dq] (one example), got {_checks.describe(query)}"
        )
    _checks.check_ndim("keys", keys, 2, "[Tk, Dk] (encoder states of one example)")
    tk = keys.shape[0]
    if values is None:
        values = keys
    else:
        _checks.check_floating("values", values)
        _checks.check_ndim("values", values, 2, "[Tk, Dv]")
        _checks.check_shape("values", values, (tk, None), ("Tk", "Dv"))
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        _checks.check_bool("mask", mask)
        _checks.check_shape("mask", mask, (tk,), ("Tk",))
    if lengths is not None:
        lengths = _checks.as_array("lengths", lengths)
        _checks.check_integer("lengths", lengths)
        _checks.check_shape("lengths", lengths, ())
        mask = combine_masks(length_mask(lengths, tk), mask)
    if mask is not None:
        # masked (padded) steps are zeroed before any product: NaN there reaches no
        # context and no gradient
        keys, values = _keep_rows(keys, mask), _keep_rows(values, mask)
    return keys, values, mask


class AdditiveAttentionParams(NamedTuple):
    """Additive attention: ``w_q: [Dq, A]``, ``w_k: [Dk, A]``, ``b: [A]``, ``v: [A]``."""

    w_q: jax.Array  # [Dq, A]
    w_k: jax.Array  # [Dk, A]
    b: jax.Array  # [A]
    v: jax.Array  # [A]


@dataclasses.dataclass(frozen=True)
class AdditiveAttention:
    """Additive attention (Bahdanau et al. 2015) of decoder queries over encoder states,
    for ONE example: ``e_j = v . tanh(W_q q + W_k k_j + b)``.

    ``attention_size``: ``A``, the hidden size of the score. ``init(key, query_size,
    key_size, dtype)`` returns :class:`AdditiveAttentionParams` (LeCun-normal, zero
    ``b``); ``apply(params, query, keys, values=None, **options)`` is
    :func:`additive_attention` (``lengths``, ``mask``, ``projected_keys``) and
    ``project_keys`` is :func:`additive_attention_keys` (once per source sequence).

    >>> att = AdditiveAttention(5)
    >>> p = att.init(jax.random.key(0), 6, 4)
    >>> p.w_q.shape, p.w_k.shape, p.v.shape
    ((6, 5), (4, 5), (5,))
    >>> ctx, w = att.apply(p, jnp.ones(6), jnp.ones((3, 4)), lengths=2)
    >>> ctx.shape, w.round(3).tolist()
    ((4,), [0.5, 0.5, 0.0])
    """

    attention_size: int

    def __post_init__(self):
        _checks.check_positive_int("attention_size", self.attention_size)

    def init(
        self, key, query_size: int, key_size: int, dtype=jnp.float32
    ) -> AdditiveAttentionParams:
        """``w_q: [Dq, A]``, ``w_k: [Dk, A]``, ``b: [A]``, ``v: [A]``."""
        _checks.check_key("key", key)
        dq = _checks.check_positive_int("query_size", query_size)
        dk = _checks.check_positive_int("key_size", key_size)
        a = self.attention_size
        kq, kk, kv = jax.random.split(key, 3)
        init = inits.lecun_normal()
        return AdditiveAttentionParams(
            init(kq, (dq, a), dtype),
            init(kk, (dk, a), dtype),
            jnp.zeros((a,), dtype),
            init(kv, (a, 1), dtype).reshape(a),
        )

    def _check(self, params):
        if isinstance(params, AdditiveAttentionParams):
            _checks.check_shape("params.v", params.v, (self.attention_size,), ("A",))

    def apply(self, params: AdditiveAttentionParams, query, keys, values=None, **options):
        """``(context, weights)``: :func:`additive_attention`."""
        self._check(params)
        return additive_attention(params, query, keys, values, **options)

    def project_keys(self, params: AdditiveAttentionParams, keys, *, lengths=None, mask=None):
        """``keys @ W_k``, ``[Tk, Dk] -> float32[Tk, A]``: :func:`additive_attention_keys`."""
        self._check(params)
        return additive_attention_keys(params, keys, lengths=lengths, mask=mask)


def additive_attention(
    params: AdditiveAttentionParams,
    query,
    keys,
    values=None,
    *,
    lengths=None,
    mask=None,
    projected_keys=None,
):
    """Bahdanau attention for ONE example: ``e_j = v . tanh(W_q q + W_k k_j + b)`` (the
    pure function under :meth:`AdditiveAttention.apply`).

    Args:
      query: ``[Dq]`` (a decoder state) or ``[Tq, Dq]``.
      keys: ``[Tk, Dk]`` encoder states; values ``[Tk, Dv]`` default ``keys``.
      lengths: source length of this example (int scalar): keys ``j >= lengths``
        are masked.
      mask: optional ``bool[Tk]``.
      projected_keys: ``keys @ W_k`` ``[Tk, A]`` precomputed once per source
        sequence (see :func:`additive_attention_keys`) for use in a decoder loop.

    Returns ``(context [Dv] or [Tq, Dv], weights float32[Tk] or [Tq, Tk])``; with
    every key masked the weights and context are zeros. Masked steps of ``keys``,
    ``values`` and ``projected_keys`` are never read (NaN there changes no result
    and no gradient; their gradients are zero).

    >>> p = AdditiveAttention(5).init(jax.random.key(0), 6, 4)
    >>> ctx, w = additive_attention(p, jnp.ones(6), jnp.ones((3, 4)), lengths=2)
    >>> ctx.shape, w.round(3).tolist()
    ((4,), [0.5, 0.5, 0.0])
    """
    if not isinstance(params, AdditiveAttentionParams):
        raise TypeError(f"params: expected AdditiveAttentionParams, got {type(params).__name__}")
    keys, values, mask = _encoder_args(query, keys, values, lengths, mask)
    dq, a = params.w_q.shape
    _checks.check_shape("query", query, query.shape[:-1] + (dq,))
    tk = keys.shape[0]
    if projected_keys is None:
        _checks.check_shape("keys", keys, (tk, params.w_k.shape[0]), ("Tk", "Dk"))
        projected_keys = additive_attention_keys(params, keys)
    else:
        _checks.check_shape("projected_keys", projected_keys, (tk, a), ("Tk", "A"))
        if mask is not None:
            projected_keys = _keep_rows(projected_keys, mask)
    qp = add_bias(matmul_f32(query, params.w_q), params.b)  # [..., A]
    h = jnp.tanh(
        qp[..., None, :]
        + projected_keys.astype(jnp.float32).reshape((1,) * (query.ndim - 1) + (tk, a))
    )  # [..., Tk, A]
    scores = matmul_f32(h, params.v.astype(jnp.float32).reshape(a, 1))[..., 0]  # [..., Tk]
    if mask is not None:
        mask = mask.reshape((1,) * (query.ndim - 1) + (tk,))
    w = masked_softmax(scores, mask)
    return _weighted_values(w, values), w


def additive_attention_keys(params: AdditiveAttentionParams, keys, *, lengths=None, mask=None):
    """``keys @ W_k``: ``[Tk, Dk] -> float32[Tk, A]``, computed once per source sequence.

    ``lengths`` (int scalar) / ``mask`` (``bool[Tk]``) as in :func:`additive_attention`:
    masked steps are zeroed before the product, so NaN in padded keys reaches neither
    the projection nor the gradient of ``W_k``.

    >>> p = AdditiveAttention(5).init(jax.random.key(0), 6, 4)
    >>> additive_attention_keys(p, jnp.ones((3, 4))).shape
    (3, 5)
    >>> pk = additive_attention_keys(p, jnp.ones((3, 4)).at[2].set(jnp.nan), lengths=2)
    >>> pk[2].tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if not isinstance(params, AdditiveAttentionParams):
        raise TypeError(f"params: expected AdditiveAttentionParams, got {type(params).__name__}")
    if not hasattr(keys, "shape") or not hasattr(keys, "dtype"):
        raise TypeError(f"keys: expected an array [Tk, Dk], got {type(keys).__name__}")
    _checks.check_floating("keys", keys)
    _checks.check_ndim("keys", keys, 2, "[Tk, Dk]")
    _checks.check_shape("keys", keys, (None, params.w_k.shape[0]), ("Tk", "Dk"))
    if lengths is not None or mask is not None:
        keys = _encoder_args(keys[0], keys, None, lengths, mask)[0]
    return matmul_f32(keys, params.w_k)


class LuongAttentionParams(NamedTuple):
    """Multiplicative attention: ``w: [Dq, Dk]`` (``score="general"``) or ``None`` (``"dot"``)."""

    w: jax.Array | None  # [Dq, Dk] for score="general"; None for score="dot"


@dataclasses.dataclass(frozen=True)
class LuongAttention:
    """Multiplicative attention (Luong et al. 2015) for ONE example.

    ``score="dot"``: ``e_j = q . k_j`` (no parameters; needs ``Dq == Dk``).
    ``score="general"``: ``e_j = q^T W k_j`` with ``W: [Dq, Dk]`` (LeCun normal).
    ``init(key, query_size, key_size, dtype)`` returns :class:`LuongAttentionParams`
    (``key`` may be ``None`` for ``"dot"``); ``apply(params, query, keys,
    values=None, **options)`` is :func:`luong_attention`.

    >>> LuongAttention().init(jax.random.key(0), 6, 4).w.shape
    (6, 4)
    >>> att = LuongAttention(score="dot")
    >>> p = att.init(None, 2, 2)
    >>> keys = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    >>> ctx, w = att.apply(p, jnp.array([1.0, 0.0]), keys, lengths=2)
    >>> p.w is None, w.round(3).tolist()
    (True, [0.731, 0.269, 0.0])
    """

    score: str = "general"

    def __post_init__(self):
        _checks.check_choice("score", self.score, ("dot", "general"))

    def init(self, key, query_size: int, key_size: int, dtype=jnp.float32) -> LuongAttentionParams:
        """``w: [Dq, Dk]`` (``"general"``) or ``None`` (``"dot"``)."""
        dq = _checks.check_positive_int("query_size", query_size)
        dk = _checks.check_positive_int("key_size", key_size)
        if self.score == "dot":
            if dq != dk:
                raise ValueError(
                    f"key_size: score='dot' needs key_size == query_size={dq}, got {dk}"
                )
            return LuongAttentionParams(None)
        _checks.check_key("key", key)
        return LuongAttentionParams(inits.lecun_normal()(key, (dq, dk), dtype))

    def apply(self, params: LuongAttentionParams, query, keys, values=None, **options):
        """``(context, weights)``: :func:`luong_attention`, params of this ``score``."""
        if isinstance(params, LuongAttentionParams) and (params.w is None) != (self.score == "dot"):
            got = "None" if params.w is None else _checks.describe(params.w)
            raise ValueError(
                f"params.w: expected {'None' if self.score == 'dot' else '[Dq, Dk]'} "
                f"for score={self.score!r}, got {got}"
            )
        return luong_attention(params, query, keys, values, **options)


def luong_attention(
    params: LuongAttentionParams, query, keys, values=None, *, lengths=None, mask=None
):
    """Luong attention for ONE example: ``e_j = q . k_j`` (dot) or ``q^T W k_j`` (general),
    the pure function under :meth:`LuongAttention.apply`.

    Args and returns as :func:`additive_attention`: ``query [Dq]`` or ``[Tq, Dq]``,
    ``keys [Tk, Dk]``, ``values [Tk, Dv]`` (default keys), ``lengths``/``mask`` over
    the source; returns ``(context, weights float32)``.

    >>> p = LuongAttention(score="dot").init(None, 2, 2)
    >>> keys = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    >>> ctx, w = luong_attention(p, jnp.array([1.0, 0.0]), keys, lengths=2)
    >>> w.round(3).tolist()
    [0.731, 0.269, 0.0]
    """
    if not isinstance(params, LuongAttentionParams):
        raise TypeError(f"params: expected LuongAttentionParams, got {type(params).__name__}")
    keys, values, mask = _encoder_args(query, keys, values, lengths, mask)
    tk, dk = keys.shape
    if params.w is None:
        if query.shape[-1] != dk:
            raise ValueError(
                f"query: expected last dim Dk={dk} (score='dot'), got {_checks.describe(query)}"
            )
        qw = query
    else:
        _checks.check_shape("params.w", params.w, (None, dk), ("Dq", "Dk"))
        dq = params.w.shape[0]
        if query.shape[-1] != dq:
            raise ValueError(f"query: expected last dim Dq={dq}, got {_checks.describe(query)}")
        qw = matmul_f32(query, params.w).astype(query.dtype)
    scores = lax.dot_general(
        qw, keys, (((qw.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [..., Tk]
    if mask is not None:
        mask = mask.reshape((1,) * (query.ndim - 1) + (tk,))
    w = masked_softmax(scores, mask)
    return _weighted_values(w, values), w
