"""Recurrent layers: cells, the fused kernels, rollouts, bidirectional and stacked layers."""

from jaxseq.recurrent.cells import (
    GRU,
    LSTM,
    RNN,
    GRUParams,
    LSTMCarry,
    LSTMParams,
    RNNCarry,
    RNNParams,
)
from jaxseq.recurrent.kernels import (
    KERNELS,
    auto_unroll,
    fused_rollout,
    step_work,
    supports_fused,
    under_forward_mode,
)
from jaxseq.recurrent.layers import (
    Bidirectional,
    BidirectionalCarry,
    BidirectionalParams,
    Stack,
    bidirectional_rollout,
    stacked_rollout,
)
from jaxseq.recurrent.rollouts import (
    rollout,
    rollout_unrolled,
)

__all__ = [
    "Bidirectional",
    "BidirectionalCarry",
    "BidirectionalParams",
    "GRU",
    "GRUParams",
    "KERNELS",
    "LSTM",
    "LSTMCarry",
    "LSTMParams",
    "RNN",
    "RNNCarry",
    "RNNParams",
    "Stack",
    "auto_unroll",
    "bidirectional_rollout",
    "fused_rollout",
    "rollout",
    "rollout_unrolled",
    "stacked_rollout",
    "step_work",
    "supports_fused",
    "under_forward_mode",
]
