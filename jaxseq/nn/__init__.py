"""Small layers every sequence model needs: dense, embedding, dropout, layer norm."""

from jaxseq.nn.dense import (
    DenseParams,
    dense,
    dense_init,
)
from jaxseq.nn.dropout import (
    dropout,
)
from jaxseq.nn.embedding import (
    embed,
    embedding_init,
)
from jaxseq.nn.norm import (
    LayerNormParams,
    layer_norm,
    layer_norm_init,
)

__all__ = [
    "DenseParams",
    "LayerNormParams",
    "dense",
    "dense_init",
    "dropout",
    "embed",
    "embedding_init",
    "layer_norm",
    "layer_norm_init",
]
