"""A pre-LayerNorm causal Transformer block for ONE example (``jax.vmap`` it over a batch).

::

    h = x + Attention(LN_1(x))          # multi-head causal self-attention
    y = h + W_2 gelu(W_1 LN_2(h))       # position-wise MLP

(Pre-LN as in GPT-2 / Xiong et al. 2020: the residual stream is never
normalised, which trains without warm-up tricks; put a final :func:`layer_norm`
after the last block.) Shapes: ``T`` time, ``D`` model size, ``K`` heads,
``F`` MLP hidden size. Time-major batches ``[T, B, D]`` are run with
``jax.vmap(fn, in_axes=(None, 1), out_axes=1)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.attention.multi_head import (
    MultiHeadAttentionParams,
    multi_head_attention,
    multi_head_attention_init,
)
from jaxseq.masks import length_mask
from jaxseq.nn.dense import DenseParams, dense, dense_init
from jaxseq.nn.dropout import dropout
from jaxseq.nn.norm import LayerNormParams, layer_norm, layer_norm_init

__all__ = [
    "TransformerBlockParams",
    "transformer_block",
    "transformer_block_init",
]


class TransformerBlockParams(NamedTuple):
    """One pre-LN block: two layer norms ``[D]``, attention, and the MLP ``[D, F]``, ``[F, D]``."""

    ln1: LayerNormParams
    attn: MultiHeadAttentionParams
    ln2: LayerNormParams
    mlp_in: DenseParams  # [D, F]
    mlp_out: DenseParams  # [F, D]


def transformer_block_init(
    key, input_size: int, num_heads: int, *, mlp_size: int | None = None, dtype=jnp.float32
) -> TransformerBlockParams:
    """Parameters of one block: ``D = input_size`` split into ``K = num_heads`` heads of ``D/K``.

    ``mlp_size`` (``F``) defaults to ``4 * D``. The output projections of the
    attention and the MLP are scaled down by ``1/sqrt(2)`` so the two residual
    branches start small next to the stream.

    >>> p = transformer_block_init(jax.random.key(0), 8, num_heads=2)
    >>> p.attn.w_q.shape, p.mlp_in.w.shape
    ((8, 2, 4), (8, 32))
    """
    _checks.check_key("key", key)
    d = _checks.check_positive_int("input_size", input_size)
    nh = _checks.check_positive_int("num_heads", num_heads)
    if d % nh:
        raise ValueError(f"num_heads: expected a divisor of input_size={d}, got {nh}")
    f = 4 * d if mlp_size is None else _checks.check_positive_int("mlp_size", mlp_size)
    ka, k1, k2 = jax.random.split(key, 3)
    attn = multi_head_attention_init(ka, d, nh, d // nh, dtype=dtype)
    attn = attn._replace(w_o=(attn.w_o * (0.5**0.5)).astype(dtype))
    mlp_out = dense_init(k2, f, d, dtype)
    mlp_out = mlp_out._replace(w=(mlp_out.w * (0.5**0.5)).astype(dtype))
    return TransformerBlockParams(
        layer_norm_init(d, dtype),
        attn,
        layer_norm_init(d, dtype),
        dense_init(k1, d, f, dtype),
        mlp_out,
    )


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
    """One pre-LN block on ``x: [T, D]`` (one example) -> ``[T, D]``.

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

    >>> p = transformer_block_init(jax.random.key(0), 8, num_heads=2)
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
    valid = None
    if lengths is not None:
        lengths = _checks.as_array("lengths", lengths)
        _checks.check_integer("lengths", lengths)
        _checks.check_shape("lengths", lengths, ())
        _checks.check_in_range("lengths", lengths, 0, t, f" (T={t})")
        valid = length_mask(lengths, t)
        x = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
    use_dropout = key is not None and dropout_rate > 0.0
    if use_dropout:
        _checks.check_key("key", key)
        k_att, k_r1, k_r2 = jax.random.split(key, 3)
    else:
        k_att = k_r1 = k_r2 = None
    h = layer_norm(params.ln1, x)
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
    if use_dropout:
        att = dropout(k_r1, att, dropout_rate)
    x = x + att
    h = layer_norm(params.ln2, x)
    h = dense(params.mlp_out, jax.nn.gelu(dense(params.mlp_in, h)))
    if use_dropout:
        h = dropout(k_r2, h, dropout_rate)
    y = x + h
    if valid is not None:
        y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))
    return (y, w) if return_weights else y
