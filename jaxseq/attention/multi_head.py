"""Multi-head attention: projections to K heads, attention per head by ``vmap``, an output projection."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import add_bias, einsum_acc, matmul_f32
from jaxseq.attention.blockwise import blockwise_attention
from jaxseq.attention.dot_product import (
    _check_lengths_arg,
    _keep_rows,
    _per_head_arg,
    attention_weights,
)
from jaxseq.masks import CAUSAL_ALIGNMENTS, causal_mask, combine_masks, length_mask
from jaxseq.nn.dropout import dropout

__all__ = [
    "MultiHeadAttention",
    "MultiHeadAttentionParams",
    "multi_head_attention",
]


class MultiHeadAttentionParams(NamedTuple):
    """Projections of multi-head attention; biases are ``None`` when built without them."""

    w_q: jax.Array  # [Dq, K, Dk]
    w_k: jax.Array  # [Dc, K, Dk]
    w_v: jax.Array  # [Dc, K, Dv]
    w_o: jax.Array  # [K, Dv, Do]
    b_q: jax.Array | None  # [K, Dk]
    b_k: jax.Array | None  # [K, Dk]
    b_v: jax.Array | None  # [K, Dv]
    b_o: jax.Array | None  # [Do]


@dataclasses.dataclass(frozen=True)
class MultiHeadAttention:
    """Multi-head attention (Vaswani et al. 2017) for ONE example; ``jax.vmap`` it over a batch.

    Args:
      num_heads: ``K``.
      key_size: ``Dk`` per head (queries and keys).
      value_size: ``Dv`` per head (default ``key_size``).
      output_size: ``Do`` (default the query size given to ``init``).
      use_bias: biases on the four projections (zeros at init).

    ``init(key, query_size, context_size=None, dtype)`` returns
    :class:`MultiHeadAttentionParams` (LeCun-normal weights; ``context_size`` is ``Dc``,
    the size of the inputs keys and values come from, default ``query_size``:
    self-attention). ``apply(params, x, context=None, mask=None, **options)`` is
    :func:`multi_head_attention` (``causal``, ``bias``, ``q_lengths``, ``k_lengths``,
    ``blockwise``, ``dropout_rate`` with ``key``, ``return_weights``): ``x: [Tq, Dq]``
    -> ``[Tq, Do]``.

    >>> mha = MultiHeadAttention(num_heads=2, key_size=8)
    >>> p = mha.init(jax.random.key(0), 16)
    >>> p.w_q.shape, p.w_o.shape, p.b_o.shape
    ((16, 2, 8), (2, 8, 16), (16,))
    >>> xs = jnp.ones((3, 5, 16))  # [B, T, D]: vmap over the batch
    >>> jax.vmap(lambda x: mha.apply(p, x, causal=True))(xs).shape
    (3, 5, 16)
    """

    num_heads: int
    key_size: int
    value_size: int | None = None
    output_size: int | None = None
    use_bias: bool = True

    def __post_init__(self):
        _checks.check_positive_int("num_heads", self.num_heads)
        _checks.check_positive_int("key_size", self.key_size)
        if self.value_size is not None:
            _checks.check_positive_int("value_size", self.value_size)
        if self.output_size is not None:
            _checks.check_positive_int("output_size", self.output_size)

    def init(
        self, key, query_size: int, context_size: int | None = None, dtype=jnp.float32
    ) -> MultiHeadAttentionParams:
        """Parameters for queries from ``[Tq, Dq]`` (``Dq = query_size``) and keys and values
        from ``[Tk, Dc]`` (``Dc = context_size``, default ``Dq``)."""
        _checks.check_key("key", key)
        dq = _checks.check_positive_int("query_size", query_size)
        dc = (
            dq if context_size is None else _checks.check_positive_int("context_size", context_size)
        )
        nh, dk = self.num_heads, self.key_size
        dv = dk if self.value_size is None else self.value_size
        do = dq if self.output_size is None else self.output_size
        kq, kk, kv, ko = jax.random.split(key, 4)
        init = inits.lecun_normal()
        w_q = init(kq, (dq, nh * dk), dtype).reshape(dq, nh, dk)
        w_k = init(kk, (dc, nh * dk), dtype).reshape(dc, nh, dk)
        w_v = init(kv, (dc, nh * dv), dtype).reshape(dc, nh, dv)
        w_o = init(ko, (nh * dv, do), dtype).reshape(nh, dv, do)
        if self.use_bias:
            zeros = lambda *shape: jnp.zeros(shape, dtype)
            b: tuple = (zeros(nh, dk), zeros(nh, dk), zeros(nh, dv), zeros(do))
        else:
            b = (None,) * 4
        return MultiHeadAttentionParams(w_q, w_k, w_v, w_o, *b)

    def apply(self, params: MultiHeadAttentionParams, x, context=None, mask=None, **options):
        """:func:`multi_head_attention` with params of this config's heads and sizes."""
        _, _, nh, dk, dv, do = _check_mha_params(params)
        want = dict(num_heads=(nh, self.num_heads), key_size=(dk, self.key_size))
        if self.value_size is not None:
            want["value_size"] = (dv, self.value_size)
        if self.output_size is not None:
            want["output_size"] = (do, self.output_size)
        for name, (got, expected) in want.items():
            if got != expected:
                raise ValueError(
                    f"params: expected {name}={expected} (this MultiHeadAttention), "
                    f"got params with {name}={got}"
                )
        return multi_head_attention(params, x, context, mask, **options)


def _check_mha_params(params):
    if not isinstance(params, MultiHeadAttentionParams):
        raise TypeError(f"params: expected MultiHeadAttentionParams, got {type(params).__name__}")
    _checks.check_ndim("params.w_q", params.w_q, 3, "[Dq, K, Dk]")
    dq, nh, dk = params.w_q.shape
    _checks.check_ndim("params.w_k", params.w_k, 3, "[Dc, K, Dk]")
    dc = params.w_k.shape[0]
    _checks.check_shape("params.w_k", params.w_k, (dc, nh, dk), ("Dc", "K", "Dk"))
    _checks.check_ndim("params.w_v", params.w_v, 3, "[Dc, K, Dv]")
    dv = params.w_v.shape[2]
    _checks.check_shape("params.w_v", params.w_v, (dc, nh, dv), ("Dc", "K", "Dv"))
    _checks.check_ndim("params.w_o", params.w_o, 3, "[K, Dv, Do]")
    do = params.w_o.shape[2]
    _checks.check_shape("params.w_o", params.w_o, (nh, dv, do), ("K", "Dv", "Do"))
    for name, b, shape in (
        ("b_q", params.b_q, (nh, dk)),
        ("b_k", params.b_k, (nh, dk)),
        ("b_v", params.b_v, (nh, dv)),
        ("b_o", params.b_o, (do,)),
    ):
        if b is not None:
            _checks.check_shape(f"params.{name}", b, shape)
    return dq, dc, nh, dk, dv, do


def _project_heads(x, w, b):
    """``x: [T, D] @ w: [D, K, E] (+ b: [K, E]) -> f32[T, K, E]`` as one matmul."""
    d, nh, e = w.shape
    y = matmul_f32(x, w.reshape(d, nh * e))
    if b is not None:
        y = add_bias(y, b.reshape(nh * e))
    return y.reshape(x.shape[0], nh, e)


def multi_head_attention(
    params: MultiHeadAttentionParams,
    x,
    context=None,
    mask=None,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    bias=None,
    dropout_rate: float = 0.0,
    key=None,
    return_weights: bool = False,
    blockwise: bool = False,
    q_lengths=None,
    k_lengths=None,
):
    """Multi-head attention for ONE example (``jax.vmap`` it over a batch): the pure
    function under :meth:`MultiHeadAttention.apply`.

    ``q = x W_q``, ``k = context W_k``, ``v = context W_v`` per head; each head
    runs :func:`attention_weights` (heads by ``vmap``); the heads' outputs are
    concatenated and projected by ``W_o``.

    Args:
      params: :class:`MultiHeadAttentionParams` from :meth:`MultiHeadAttention.init`
        (``K`` heads and the sizes are read from the shapes).
      x: ``[Tq, Dq]`` queries' inputs.
      context: ``[Tk, Dc]`` keys'/values' inputs; ``None`` for self-attention (``x``).
      mask: optional ``bool[Tq, Tk]`` or per head ``bool[K, Tq, Tk]`` (True = attend).
      causal: mask keys after the query position.
      causal_alignment: ``"top_left"`` (default) or ``"bottom_right"`` (the queries
        are the last ``Tq`` of the ``Tk`` positions: decoding with a cache), as
        :func:`~jaxseq.masks.causal_mask`.
      bias: optional score bias ``[Tq, Tk]`` or ``[K, Tq, Tk]``.
      dropout_rate, key: dropout on the attention weights, only when ``key`` is given.
      return_weights: also return the weights ``float32[K, Tq, Tk]`` (after masking,
        before dropout) for plotting.
      blockwise: use :func:`blockwise_attention` (long sequences; no ``mask``,
        ``bias``, dropout or weights then: padding by ``q_lengths``/``k_lengths``).
      q_lengths, k_lengths: optional valid lengths of this example (int scalars in
        ``[0, Tq]`` and ``[0, Tk]``): query rows and keys past them are padding, as
        ``mask=padding_mask(q_lengths, k_lengths, Tq, Tk)``, on both paths.

    Returns ``[Tq, Do]`` in the dtype of ``x`` (and the weights when asked).

    Padding: rows of ``x`` that may attend no key and rows of ``context`` that no
    query (of any head) may attend are zeroed before the projections, so whatever
    they hold (NaN, inf) reaches no output and no gradient; a query row that sees no
    key gets zero attention, so its output is ``b_o`` (zeros without biases).

    >>> p = MultiHeadAttention(num_heads=2, key_size=8).init(jax.random.key(0), 16)
    >>> y, w = multi_head_attention(p, jnp.ones((5, 16)), causal=True, return_weights=True)
    >>> y.shape, w.shape, w[0, 0].tolist()
    ((5, 16), (2, 5, 5), [1.0, 0.0, 0.0, 0.0, 0.0])

    Padding by lengths, on the blockwise path too (NaN in the padded rows):

    >>> x = jnp.ones((5, 16)).at[3:].set(jnp.nan)
    >>> y = multi_head_attention(p, x, q_lengths=3, k_lengths=3, blockwise=True)
    >>> bool(jnp.isfinite(y).all())
    True
    """
    dq, dc, nh, dk, dv, do = _check_mha_params(params)
    x, ctx = _check_inputs(x, context, dq, dc)
    tq, tk = x.shape[0], ctx.shape[0]
    dropout_rate = _checks.check_rate("dropout_rate", dropout_rate)
    _checks.check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    one = "one example; vmap over a batch"
    q_lengths = _check_lengths_arg("q_lengths", q_lengths, (), tq, "Tq", one)
    k_lengths = _check_lengths_arg("k_lengths", k_lengths, (), tk, "Tk", one)
    if not _checks.any_tracer(params, x, ctx, mask, bias, key, q_lengths, k_lengths):
        # outside jit: this function again as one compiled program (checked again,
        # on tracers), instead of op-by-op dispatch
        options = dict(causal=bool(causal), causal_alignment=causal_alignment, bias=bias)
        options.update(dropout_rate=dropout_rate, key=key, return_weights=bool(return_weights))
        options.update(blockwise=bool(blockwise), q_lengths=q_lengths, k_lengths=k_lengths)
        return _compiled(params, x, None if context is None else ctx, mask, **options)
    q_valid = None if q_lengths is None else length_mask(q_lengths, tq)  # bool[Tq]
    k_valid = None if k_lengths is None else length_mask(k_lengths, tk)  # bool[Tk]
    dtype = x.dtype
    if blockwise:
        if (
            mask is not None
            or bias is not None
            or return_weights
            or (key is not None and dropout_rate > 0)
        ):
            raise ValueError(
                "blockwise: supports only causal masking and padding by q_lengths/k_lengths, "
                "without mask, bias, dropout or returned weights"
            )
        # padded rows zeroed before the projections, so NaN there reaches no gradient
        x = x if q_valid is None else _keep_rows(x, q_valid)
        ctx = ctx if k_valid is None else _keep_rows(ctx, k_valid)
    else:
        mask, m_ax, bias, b_ax, full = _dense_masks(
            mask, bias, q_valid, k_valid, causal, causal_alignment, nh, tq, tk
        )
        if full is not None:
            # padding: query rows that see no key and keys no query sees (in any head)
            # are zeroed before the projections, so NaN there reaches no gradient
            ctx = _keep_rows(ctx, jnp.any(full, axis=(0, 1)))
            x = _keep_rows(x, jnp.any(full, axis=(0, 2)))
    q = _project_heads(x, params.w_q, params.b_q).astype(dtype)  # [Tq, K, Dk]
    k = _project_heads(ctx, params.w_k, params.b_k).astype(dtype)  # [Tk, K, Dk]
    v = _project_heads(ctx, params.w_v, params.b_v).astype(dtype)  # [Tk, K, Dv]
    if blockwise:
        o, w = _blockwise_heads(q, k, v, causal, causal_alignment, q_lengths, k_lengths), None
    else:
        weights_fn = jax.vmap(
            lambda q1, k1, m1, b1: attention_weights(
                q1, k1, m1, bias=b1, causal=causal, causal_alignment=causal_alignment
            ),
            in_axes=(1, 1, m_ax, b_ax),
        )
        w = weights_fn(q, k, mask, bias)  # f32[K, Tq, Tk]
        wd = w if key is None else dropout(key, w, dropout_rate)
        o = einsum_acc("kqt,tkd->qkd", wd.astype(dtype), v)
    out = matmul_f32(o.reshape(tq, nh * dv).astype(dtype), params.w_o.reshape(nh * dv, do))
    if params.b_o is not None:
        out = add_bias(out, params.b_o)
    out = out.astype(dtype)
    return (out, w) if return_weights else out


_compiled = jax.jit(
    multi_head_attention,
    static_argnames=("causal", "causal_alignment", "dropout_rate", "return_weights", "blockwise"),
)


def _check_inputs(x, context, dq, dc):
    """Validates ``x: [Tq, Dq]`` and ``context: [Tk, Dc]`` (``None``: ``x``)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array [Tq, Dq], got {type(x).__name__}")
    _checks.check_floating("x", x)
    _checks.check_ndim("x", x, 2, "[Tq, Dq] (one example; vmap over a batch)")
    _checks.check_shape("x", x, (None, dq), ("Tq", "Dq"))
    ctx = x if context is None else context
    if context is not None:
        _checks.check_floating("context", context)
        _checks.check_ndim("context", context, 2, "[Tk, Dc] (one example)")
    _checks.check_shape("context" if context is not None else "x", ctx, (None, dc), ("Tk", "Dc"))
    return x, ctx


def _dense_masks(mask, bias, q_valid, k_valid, causal, alignment, nh, tq, tk):
    """The dense path's ``(mask, mask_axis, bias, bias_axis, full)``: the user's mask with
    the padding of ``q_valid``/``k_valid`` folded in, and ``full: bool[1 or K, Tq, Tk]``,
    that and the causal mask together (``None`` when nothing is masked)."""
    mask, m_ax, _ = _per_head_arg("mask", mask, (), nh, tq, tk)
    bias, b_ax, _ = _per_head_arg("bias", bias, (), nh, tq, tk)
    if mask is not None:
        _checks.check_bool("mask", mask)
    if q_valid is not None or k_valid is not None:
        qv = jnp.ones((tq,), bool) if q_valid is None else q_valid
        kv = jnp.ones((tk,), bool) if k_valid is None else k_valid
        pad = qv[:, None] & kv[None, :]
        mask = pad if mask is None else mask & (pad if m_ax is None else pad[None])
    full = combine_masks(
        None if mask is None else mask.reshape((-1, tq, tk)),
        causal_mask(tq, tk, alignment=alignment)[None] if causal else None,
    )
    return mask, m_ax, bias, b_ax, full


def _blockwise_heads(q, k, v, causal, alignment, q_lengths, k_lengths):
    """``q: [Tq, K, Dk]``, ``k, v: [Tk, K, D]`` through :func:`blockwise_attention` with the
    heads as its batch dim (lengths of this example shared by the heads) -> ``[Tq, K, Dv]``."""
    o = blockwise_attention(
        jnp.swapaxes(q, 0, 1),
        jnp.swapaxes(k, 0, 1),
        jnp.swapaxes(v, 0, 1),
        causal=causal,
        causal_alignment=alignment,
        q_lengths=q_lengths,
        k_lengths=k_lengths,
    )
    return jnp.swapaxes(o, 0, 1)
