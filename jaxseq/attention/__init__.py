"""Attention written for one example and batched with ``jax.vmap``: dense, multi-head,
blockwise, additive and Luong, positional encodings and the Transformer block.
"""

from jaxseq.attention.additive import (
    AdditiveAttentionParams,
    LuongAttentionParams,
    additive_attention,
    additive_attention_init,
    additive_attention_keys,
    luong_attention,
    luong_attention_init,
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
    MultiHeadAttentionParams,
    multi_head_attention,
    multi_head_attention_init,
)
from jaxseq.attention.positional import (
    learned,
    learned_init,
    rotary,
    rotary_angles,
    sinusoidal,
)
from jaxseq.attention.transformer import (
    TransformerBlockParams,
    transformer_block,
    transformer_block_init,
)

__all__ = [
    "AdditiveAttentionParams",
    "LuongAttentionParams",
    "MultiHeadAttentionParams",
    "TransformerBlockParams",
    "additive_attention",
    "additive_attention_init",
    "additive_attention_keys",
    "attention_weights",
    "batched_dot_product_attention",
    "blockwise_attention",
    "dot_product_attention",
    "learned",
    "learned_init",
    "luong_attention",
    "luong_attention_init",
    "multi_head_attention",
    "multi_head_attention_init",
    "rotary",
    "rotary_angles",
    "sinusoidal",
    "transformer_block",
    "transformer_block_init",
]
