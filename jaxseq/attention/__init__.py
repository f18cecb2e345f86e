"""Attention written for one example and batched with ``jax.vmap``: dense, multi-head,
blockwise, additive and Luong, positional encodings and the Transformer block.

Everything with parameters is a frozen config object with ``init(key, input_size,
..., dtype) -> params`` and a pure ``apply(params, ...)`` for ONE example
(:class:`MultiHeadAttention`, :class:`TransformerBlock`, :class:`AdditiveAttention`,
:class:`LuongAttention`, :class:`LearnedPositions`); the apply methods are the
per-example functions beside them (``multi_head_attention``, ``transformer_block``,
...), which ``jax.vmap`` batches. Parameter-free attention stays a function.
"""

from jaxseq.attention.additive import (
    AdditiveAttention,
    AdditiveAttentionParams,
    LuongAttention,
    LuongAttentionParams,
    additive_attention,
    additive_attention_keys,
    luong_attention,
)
from jaxseq.attention.blockwise import (
    blockwise_attention,
)
from jaxseq.attention.dot_product import (
    attention_weights,
    batched_dot_product_attention,
    dot_product_attention,
)
from jaxseq.attention.multi_head import (
    MultiHeadAttention,
    MultiHeadAttentionParams,
    multi_head_attention,
)
from jaxseq.attention.positional import (
    LearnedPositions,
    learned,
    rotary,
    rotary_angles,
    sinusoidal,
)
from jaxseq.attention.transformer import (
    TransformerBlock,
    TransformerBlockParams,
    transformer_block,
)

__all__ = [
    "AdditiveAttention",
    "AdditiveAttentionParams",
    "LearnedPositions",
    "LuongAttention",
    "LuongAttentionParams",
    "MultiHeadAttention",
    "MultiHeadAttentionParams",
    "TransformerBlock",
    "TransformerBlockParams",
    "additive_attention",
    "additive_attention_keys",
    "attention_weights",
    "batched_dot_product_attention",
    "blockwise_attention",
    "dot_product_attention",
    "learned",
    "luong_attention",
    "multi_head_attention",
    "rotary",
    "rotary_angles",
    "sinusoidal",
    "transformer_block",
]
