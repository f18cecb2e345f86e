"""jaxseq: functional sequence-model kernels in JAX.

Pure-function RNN/LSTM/GRU cells over parameter pytrees, ``lax.scan``
rollouts with lengths, resets and reverse, stacked and bidirectional layers,
vmapped attention, and a truncated-BPTT training loop.
"""

from jaxseq import (
    checkpoint,
    data,
    diagnostics,
    initializers,
    interop,
    losses,
    models,
    sampling,
    train,
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

__version__ = "0.1.0"
