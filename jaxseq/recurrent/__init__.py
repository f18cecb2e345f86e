"""Recurrent layers: cells, the fused kernels, rollouts, bidirectional and stacked layers.

Modules: ``cells`` (RNN, LSTM, GRU), ``linear`` (:func:`linear_recurrence`,
``h_t = a_t * h_{t-1} + b_t`` sequential or parallel over time), ``minimal``
(:class:`MinGRU`, :class:`MinLSTM`, solved by it), ``dispatch`` (which kernel runs: the
fused-rule registry, forward mode, ``unroll="auto"``), ``rules`` (each
built-in cell's fused gate math), ``kernels`` (the fused custom-VJP rollout),
``rollouts`` (:func:`rollout` for any cell or sequence layer), ``layers``
(:class:`Bidirectional`, :class:`Stack`).
"""

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
from jaxseq.recurrent.dispatch import (
    KERNELS,
    FusedRule,
    auto_unroll,
    fused_rule,
    register_fused_rule,
    step_work,
    supports_fused,
    under_forward_mode,
)
from jaxseq.recurrent.kernels import fused_rollout
from jaxseq.recurrent.layers import (
    Bidirectional,
    BidirectionalCarry,
    BidirectionalParams,
    Stack,
    bidirectional_rollout,
    stacked_rollout,
)
from jaxseq.recurrent.linear import linear_recurrence
from jaxseq.recurrent.minimal import MinGRU, MinGRUParams, MinLSTM, MinLSTMParams
from jaxseq.recurrent.rollouts import (
    rollout,
    rollout_unrolled,
)
from jaxseq.recurrent.rules import GRU_RULE, LSTM_RULE, RELU_RULE, TANH_RULE

__all__ = [
    "Bidirectional",
    "BidirectionalCarry",
    "BidirectionalParams",
    "FusedRule",
    "GRU",
    "GRUParams",
    "GRU_RULE",
    "KERNELS",
    "LSTM",
    "LSTMCarry",
    "LSTMParams",
    "LSTM_RULE",
    "MinGRU",
    "MinGRUParams",
    "MinLSTM",
    "MinLSTMParams",
    "RELU_RULE",
    "RNN",
    "RNNCarry",
    "RNNParams",
    "Stack",
    "TANH_RULE",
    "auto_unroll",
    "bidirectional_rollout",
    "fused_rollout",
    "fused_rule",
    "linear_recurrence",
    "register_fused_rule",
    "rollout",
    "rollout_unrolled",
    "stacked_rollout",
    "step_work",
    "supports_fused",
    "under_forward_mode",
]
