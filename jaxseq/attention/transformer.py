"""A pre-LayerNorm Transformer block for ONE example (``jax.vmap`` it over a batch).

::

    h = x + Attention(LN_1(x))          # multi-head (causal) self-attention
    y = h + W_2 gelu(W_1 LN_2(h))       # position-wise MLP

(Pre-LN as in GPT-2 / Xiong et al. 2020: the residual stream is never
normalised, which trains without warm-up tricks; put a final
:class:`~jaxseq.nn.LayerNorm` after the last block.) Shapes: ``T`` time, ``D``
model size, ``K`` heads, ``Dh = D / K``, ``F`` MLP hidden size. Time-major
batches ``[T, B, D]`` are run with ``jax.vmap(fn, in_axes=(None, 1), out_axes=1)``.
:meth:`TransformerBlock.apply_with_attention` runs the same block around a
caller's attention core (a key/value cache, a sliding window) on any leading dims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq._numerics import add_bias, matmul_f32
from jaxseq.attention.multi_head import (
    MultiHeadAttention,
    MultiHeadAttentionParams,
    multi_head_attention,
)
from jaxseq.masks import length_mask
from jaxseq.nn.dense import Dense, DenseParams, dense
from jaxseq.nn.dropout import dropout
from jaxseq.nn.norm import LayerNorm, LayerNormParams, layer_norm

__all__ = [
    "TransformerBlock",
    "TransformerBlockParams",
    "transformer_block",
]


class TransformerBlockParams(NamedTuple):
    """One pre-LN block: two layer norms ``[D]``, attention, and the MLP ``[D, F]``, ``[F, D]``."""

    ln1: LayerNormParams
    attn: MultiHeadAttentionParams
    ln2: LayerNormParams
    mlp_in: DenseParams  # [D, F]
    mlp_out: DenseParams  # [F, D]


@dataclasses.dataclass(frozen=True)
class TransformerBlock:
    """A pre-LN Transformer block (see the module docstring) for ONE example ``[T, D]``.

    Args:
      num_heads: ``K`` (a divisor of the model size ``D`` given to ``init``).
      mlp_size: ``F`` (default ``4 * D``).
      causal: causal self-attention (default True, for language models).
      dropout_rate: dropout on the attention weights and on both residual branches,
        only when ``apply`` gets a ``key``.

    ``init(key, input_size, dtype)`` returns :class:`TransformerBlockParams`;
    ``apply(params, x, ...)`` is :func:`transformer_block` with this config's
    ``causal`` and ``dropout_rate``.

    >>> block = TransformerBlock(num_heads=2)
    >>> p = block.init(jax.random.key(0), 8)
    >>> p.attn.w_q.shape, p.mlp_in.w.shape
    ((8, 2, 4), (8, 32))
    >>> block.apply(p, jnp.ones((5, 8)), lengths=3).shape
    (5, 8)
    """

    num_heads: int
    mlp_size: int | None = None
    causal: bool = True
    dropout_rate: float = 0.0

    def __post_init__(self):
        _checks.check_positive_int("num_heads", self.num_heads)
        if self.mlp_size is not None:
            _checks.check_positive_int("mlp_size", self.mlp_size)
        _checks.check_rate("dropout_rate", self.dropout_rate)

    def init(self, key, input_size: int, dtype=jnp.float32) -> TransformerBlockParams:
        """Parameters of one block: ``D = input_size`` split into ``K`` heads of ``D/K``.

        The output projections of the attention and the MLP are scaled down by
        ``1/sqrt(2)`` so the two residual branches start small next to the stream.
        """
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        nh = self.num_heads
        if d % nh:
            raise ValueError(f"num_heads: expected a divisor of input_size={d}, got {nh}")
        f = 4 * d if self.mlp_size is None else self.mlp_size
        ka, k1, k2 = jax.random.split(key, 3)
        attn = MultiHeadAttention(nh, d // nh).init(ka, d, dtype=dtype)
        attn = attn._replace(w_o=(attn.w_o * (0.5**0.5)).astype(dtype))
        mlp_out = Dense(d).init(k2, f, dtype)
        mlp_out = mlp_out._replace(w=(mlp_out.w * (0.5**0.5)).astype(dtype))
        ln1, ln2 = (LayerNorm().init(None, d, dtype) for _ in range(2))
        return TransformerBlockParams(ln1, attn, ln2, Dense(f).init(k1, d, dtype), mlp_out)

    def apply(
        self,
        params: TransformerBlockParams,
        x,
        *,
        mask=None,
        lengths=None,
        key=None,
        blockwise: bool = False,
        return_weights: bool = False,
    ):
        """``x: [T, D] -> [T, D]`` (one example): :func:`transformer_block`."""
        return transformer_block(
            params,
            x,
            mask=mask,
            lengths=lengths,
            causal=self.causal,
            key=key,
            dropout_rate=self.dropout_rate,
            blockwise=blockwise,
            return_weights=return_weights,
        )

    def apply_with_attention(
        self, params: TransformerBlockParams, x, attend: Callable, *, key=None
    ):
        """The block around a caller's attention core, on ``x: [*N, T, D]`` (any leading dims).

        ``attend(q, k, v) -> o`` gets the heads of ``LN_1(x)`` projected head-major,
        ``q, k, v: [*N, K, T, Dh]`` in ``x``'s dtype (before any rotary rotation), and
        returns ``o: [*N, K, Tq, Dh]``; it may attend to more keys than ``T`` (a cache)
        and applies its own masks. The block adds the output projection, the residual,
        the MLP and the dropout on both residual branches (when ``key`` is given;
        ``causal`` is ``attend``'s business).

        >>> block = TransformerBlock(num_heads=2)
        >>> p = block.init(jax.random.key(0), 8)
        >>> x = jax.random.normal(jax.random.key(1), (5, 8))
        >>> def attend(q, k, v):  # plain causal attention, head-major [K, T, Dh]
        ...     s = jnp.einsum("ktd,ksd->kts", q, k) / 2.0
        ...     s = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), s, -1e30)
        ...     return jnp.einsum("kts,ksd->ktd", jax.nn.softmax(s), v)
        >>> y = block.apply_with_attention(p, x, attend)
        >>> bool(jnp.allclose(y, block.apply(p, x), atol=1e-5))
        True
        """
        if not isinstance(params, TransformerBlockParams):
            raise TypeError(f"params: expected TransformerBlockParams, got {type(params).__name__}")
        _checks.check_floating("x", x)
        _checks.check_min_ndim("x", x, 2, "[*N, T, D]")
        d = params.ln1.scale.shape[0]
        _checks.check_shape("x", x, x.shape[:-1] + (d,))
        use_dropout = key is not None and self.dropout_rate > 0.0
        k1 = k2 = None
        if use_dropout:
            _checks.check_key("key", key)
            k1, k2 = jax.random.split(key)
        a = params.attn

        def attention(h):
            o = attend(_heads(h, a.w_q, a.b_q), _heads(h, a.w_k, a.b_k), _heads(h, a.w_v, a.b_v))
            nh, e = o.shape[-3], o.shape[-1]
            o = jnp.swapaxes(o, -3, -2).reshape(o.shape[:-3] + (o.shape[-2], nh * e))
            out = matmul_f32(o, a.w_o.reshape(nh * e, a.w_o.shape[-1]))
            if a.b_o is not None:
                out = add_bias(out, a.b_o)
            return out.astype(x.dtype)

        return _pre_ln(params, x, attention, k1, k2, self.dropout_rate)


def transformer_block(
    params: TransformerBlockParams,
    x,
    *,
    mask=None,
    lengths=None,
    causal: bool = True,
    key=None,
    dropout_rate: float = 0.0,
    blockwise: bool = False,
    return_weights: bool = False,
):
    """One pre-LN block on ``x: [T, D]`` (one example) -> ``[T, D]``: the pure function
    under :meth:`TransformerBlock.apply`.

    Args:
      mask: optional extra ``bool[T, T]`` attention mask (True = attend).
      lengths: optional valid length of this example (int scalar in ``[0, T]``):
        positions ``>= lengths`` are padding. They are never read (NaN there reaches
        no output and no gradient), their outputs are zeros and their attention
        weights are zero rows and columns.
      causal: causal self-attention (default True, for language models).
      key, dropout_rate: dropout on attention weights and on both residual
        branches, only when ``key`` is given.
      blockwise: :func:`~jaxseq.attention.blockwise_attention` (long sequences;
        causal masking and ``lengths`` only, no ``mask``).
      return_weights: also return the attention weights ``float32[K, T, T]``.

    >>> p = TransformerBlock(num_heads=2).init(jax.random.key(0), 8)
    >>> x = jnp.ones((5, 8)).at[3:].set(jnp.nan)  # 3 valid steps, then padding
    >>> y, w = transformer_block(p, x, lengths=3, return_weights=True)
    >>> y.shape, w[0, 2].round(3).tolist(), y[3:].tolist() == [[0.0] * 8] * 2
    ((5, 8), [0.333, 0.333, 0.333, 0.0, 0.0], True)
    """
    if not isinstance(params, TransformerBlockParams):
        raise TypeError(f"params: expected TransformerBlockParams, got {type(params).__name__}")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array [T, D], got {type(x).__name__}")
    _checks.check_floating("x", x)
    _checks.check_ndim("x", x, 2, "[T, D] (one example; vmap over a batch)")
    d = params.ln1.scale.shape[0]
    _checks.check_shape("x", x, (None, d), ("T", "D"))
    t = x.shape[0]
    if lengths is not None:
        lengths = _checks.as_array("lengths", lengths)
        _checks.check_integer("lengths", lengths)
        _checks.check_shape("lengths", lengths, ())
        _checks.check_in_range("lengths", lengths, 0, t, f" (T={t})")
    dropout_rate = _checks.check_rate("dropout_rate", dropout_rate)
    if not _checks.any_tracer(params, x, mask, lengths, key):
        # outside jit: this function again as one compiled program (checked again, on
        # tracers), instead of op-by-op dispatch
        options = dict(causal=bool(causal), key=key, dropout_rate=dropout_rate)
        options.update(blockwise=bool(blockwise), return_weights=bool(return_weights))
        return _compiled(params, x, mask=mask, lengths=lengths, **options)
    valid = None
    if lengths is not None:
        valid = length_mask(lengths, t)
        x = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
    use_dropout = key is not None and dropout_rate > 0.0
    if use_dropout:
        _checks.check_key("key", key)
        k_att, k_r1, k_r2 = jax.random.split(key, 3)
    else:
        k_att = k_r1 = k_r2 = None
    weights = []

    def attention(h):
        att = multi_head_attention(
            params.attn,
            h,
            mask=mask,
            q_lengths=lengths,
            k_lengths=lengths,
            causal=causal,
            key=k_att,
            dropout_rate=dropout_rate if use_dropout else 0.0,
            return_weights=return_weights,
            blockwise=blockwise,
        )
        if return_weights:
            att, w = att
            weights.append(w)
        return att

    rate = dropout_rate if use_dropout else 0.0
    y = _pre_ln(params, x, attention, k_r1, k_r2, rate)
    if valid is not None:
        y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))
    return (y, weights[0]) if return_weights else y


_compiled = jax.jit(
    transformer_block,
    static_argnames=("causal", "dropout_rate", "blockwise", "return_weights"),
)


def _heads(x, w, b):
    """``x: [*N, T, D] @ w: [D, K, E] (+ b: [K, E]) -> [*N, K, T, E]`` head-major
    (float32 accumulation, result in ``x``'s dtype).

    One product over all rows and heads, then the head split: written as one
    ``einsum`` to ``[*N, K, T, E]``, autodiff's backward ran through transposed
    copies (a float32 Transformer train step 6% slower on XLA:CPU)."""
    d, nh, e = w.shape
    y = matmul_f32(x, w.reshape(d, nh * e))
    if b is not None:
        y = add_bias(y, b.reshape(nh * e))
    return jnp.swapaxes(y.astype(x.dtype).reshape(x.shape[:-1] + (nh, e)), -3, -2)


def _pre_ln(params, x, attention, k1, k2, rate):
    """``x + drop(attention(LN_1 x))``, then ``+ drop(MLP(LN_2 .))``; dropout with ``k1``/``k2``
    when they are given. ``attention: [..., T, D] -> [..., T, D]``."""
    att = attention(layer_norm(params.ln1, x))
    if k1 is not None:
        att = dropout(k1, att, rate)
    x = x + att
    h = dense(params.mlp_out, jax.nn.gelu(dense(params.mlp_in, layer_norm(params.ln2, x))))
    if k2 is not None:
        h = dropout(k2, h, rate)
    return x + h
