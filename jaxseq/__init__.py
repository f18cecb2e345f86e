"""jaxseq: functional sequence-model kernels in JAX.

Pure-function RNN/LSTM/GRU cells over parameter pytrees, ``lax.scan``
rollouts with lengths, resets and reverse, stacked and bidirectional layers,
vmapped attention, and a truncated-BPTT training loop.
"""

from jaxseq import (
    attention,
    checkpoint,
    data,
    diagnostics,
    initializers,
    interop,
    losses,
    models,
    positional,
    sampling,
    train,
    transformer,
)
from jaxseq.attention import (
    AdditiveAttentionParams,
    LuongAttentionParams,
    MultiHeadAttentionParams,
    additive_attention,
    additive_attention_init,
    attention_weights,
    batched_dot_product_attention,
    blockwise_attention,
    causal_mask,
    dot_product_attention,
    luong_attention,
    luong_attention_init,
    multi_head_attention,
    multi_head_attention_init,
)
from jaxseq.cells import (
    GRU,
    LSTM,
    RNN,
    GRUParams,
    LSTMCarry,
    LSTMParams,
    RNNCarry,
    RNNParams,
)
from jaxseq.layers import (
    Bidirectional,
    BidirectionalCarry,
    BidirectionalParams,
    DenseParams,
    Stack,
    bidirectional_rollout,
    dense,
    dense_init,
    dropout,
    embed,
    embedding_init,
    stacked_rollout,
)
from jaxseq.models import LanguageModel, char_lm
from jaxseq.rollout import rollout, rollout_unrolled
from jaxseq.train import TrainState, fit, make_optimizer, make_train_step
from jaxseq.transformer import (
    LayerNormParams,
    TransformerBlockParams,
    layer_norm,
    layer_norm_init,
    transformer_block,
    transformer_block_init,
)

__version__ = "0.1.0"
