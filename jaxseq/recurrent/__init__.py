"""Recurrent layers: cells, the route from ``rollout`` to the kernels, layers of cells.

Modules, in the order a rollout passes through them: ``rollouts``
(:func:`rollout`, the boundary: checks once, then :func:`run`), ``sequence``
(:class:`Sequence`, the validated inputs, and :func:`prepare`), ``layers``
(:class:`Bidirectional`, :class:`Stack`), ``dispatch`` (one :class:`Plan` per cell
rollout: fused rule or scan, unroll, remat), ``kernels`` (the scan and fused
kernels), ``rules`` (each built-in cell's fused gate math), ``cells`` (RNN, LSTM,
GRU), ``linear`` (:func:`linear_recurrence`, ``h_t = a_t * h_{t-1} + b_t``
sequential or parallel over time), ``minimal`` (:class:`MinGRU`,
:class:`MinLSTM`) and ``rglru`` (:class:`RGLRU`), solved by it.

``linear_attention`` (:func:`linear_attention`) is the matrix-state sibling of
``linear``: ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``y_t = S_tᵀ q_t`` with a
decay per head (Mamba-2, RetNet), per key (gated linear attention) or none,
step by step (``"recurrent"``), by chunks (``"chunked"``) or as one decay-masked
``T x T`` product (``"parallel"``), with the same ``lengths``, ``reset`` and ``reverse``.

xLSTM's cells: ``mlstm`` (:func:`mlstm_recurrence`, the stabilised matrix memory
with exponential input gates and a normaliser, in the same three forms, and the
:class:`MLSTM` cell on it) and ``slstm`` (:class:`SLSTM`, scalar memories with
exponential gating and block-diagonal recurrent weights per head, run by the
fused kernel with its own rule). ``js.models.xlstm_stack`` stacks them.
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
    Plan,
    auto_unroll,
    fused_rule,
    register_fused_rule,
    step_work,
    under_forward_mode,
)
from jaxseq.recurrent.layers import (
    Bidirectional,
    BidirectionalCarry,
    BidirectionalParams,
    Stack,
    StackNormParams,
)
from jaxseq.recurrent.linear import linear_recurrence
from jaxseq.recurrent.linear_attention import linear_attention
from jaxseq.recurrent.minimal import MinGRU, MinGRUParams, MinLSTM, MinLSTMParams
from jaxseq.recurrent.mlstm import MLSTM, MLSTMParams, MLSTMState, mlstm_recurrence
from jaxseq.recurrent.rglru import RGLRU, RGLRUParams
from jaxseq.recurrent.rollouts import RolloutOptions, rollout, rollout_unrolled, run
from jaxseq.recurrent.rules import GRU_RULE, LSTM_RULE, RELU_RULE, TANH_RULE
from jaxseq.recurrent.sequence import Sequence, prepare
from jaxseq.recurrent.slstm import SLSTM, SLSTM_EXP_RULE, SLSTM_RULE, SLSTMCarry, SLSTMParams

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
    "MLSTM",
    "MLSTMParams",
    "MLSTMState",
    "MinGRU",
    "MinGRUParams",
    "MinLSTM",
    "MinLSTMParams",
    "Plan",
    "RELU_RULE",
    "RGLRU",
    "RGLRUParams",
    "RNN",
    "RNNCarry",
    "RNNParams",
    "RolloutOptions",
    "SLSTM",
    "SLSTMCarry",
    "SLSTMParams",
    "SLSTM_EXP_RULE",
    "SLSTM_RULE",
    "Sequence",
    "Stack",
    "StackNormParams",
    "TANH_RULE",
    "auto_unroll",
    "fused_rule",
    "linear_attention",
    "linear_recurrence",
    "mlstm_recurrence",
    "prepare",
    "register_fused_rule",
    "rollout",
    "rollout_unrolled",
    "run",
    "step_work",
    "under_forward_mode",
]
