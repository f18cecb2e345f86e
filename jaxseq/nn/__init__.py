"""Small layers every sequence model needs: dense, embedding, dropout, layer norm.

Each layer with parameters is a frozen config object with ``init(key, input_size,
dtype) -> params`` and a pure ``apply(params, x)``; the params are NamedTuples (or
one array) and the apply method is the plain function beside it (``dense``,
``embed``, ``layer_norm``), usable inside ``vmap``/``scan`` without the object.
"""

from jaxseq.nn.dense import (
    Dense,
    DenseParams,
    dense,
)
from jaxseq.nn.dropout import (
    dropout,
)
from jaxseq.nn.embedding import (
    Embedding,
    embed,
)
from jaxseq.nn.norm import (
    LayerNorm,
    LayerNormParams,
    layer_norm,
)

__all__ = [
    "Dense",
    "DenseParams",
    "Embedding",
    "LayerNorm",
    "LayerNormParams",
    "dense",
    "dropout",
    "embed",
    "layer_norm",
]
