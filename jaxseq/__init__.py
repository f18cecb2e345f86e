"""jaxseq: functional sequence-model kernels in JAX.

Pure-function RNN/LSTM/GRU cells over parameter pytrees, ``lax.scan``
rollouts with lengths, resets and reverse, stacked and bidirectional layers,
vmapped attention, models, and a training loop for any task.

Layers, bottom to top (a module imports only from layers below it)::

    host_memory  imported first: malloc keeps XLA:CPU's per-call buffers
    _checks, _numerics, masks, initializers, protocols, checks
    nn/          dense, embedding, dropout, layer norm
    recurrent/   cells, minGRU/minLSTM, fused kernels, linear recurrences, rollouts, Bidirectional, Stack
    attention/   dot-product, multi-head, blockwise, additive/Luong, positional, Transformer
    data/        token streams, real-valued streams, padded batches, download
    models/      language models, taggers and classifiers, seq2seq
    decoding     sampling, greedy and beam search
    training/    losses, optimizer, train step, loop, checkpoints, sharding, diagnostics
    interop/     PyTorch and Flax weights

The top level holds the core most programs need, grouped below by the
sub-package it comes from; every other public name is reached through its
sub-package: ``js.decoding.sample``, ``js.data.pad_sequences``,
``js.training.checkpoint``, ``js.nn.dense``.

>>> import jaxseq as js
>>> js.rollout is js.recurrent.rollout and js.fit is js.training.fit
True
"""

# First, before JAX starts a backend: malloc keeps XLA:CPU's per-call buffers
# (jaxseq/host_memory.py; JAXSEQ_HOST_MEMORY=system leaves malloc as it is).
from jaxseq import host_memory

# Grouped by layer, bottom to top, in the order of __all__ (not the import sorter's).
# isort: off
# The sub-packages (and the lowest layer's public modules).
from jaxseq import (
    attention,
    checks,
    data,
    decoding,
    initializers,
    interop,
    masks,
    models,
    nn,
    protocols,
    recurrent,
    training,
)

# protocols: the contracts.
from jaxseq.protocols import Cell, SequenceLayer

# masks
from jaxseq.masks import causal_mask, lengths_to_mask

# checks
from jaxseq.checks import checked

# recurrent: cells, layers, rollouts, linear recurrences.
from jaxseq.recurrent import (
    GRU,
    LSTM,
    RNN,
    Bidirectional,
    MinGRU,
    MinLSTM,
    Stack,
    linear_recurrence,
    rollout,
    rollout_unrolled,
)

# attention
from jaxseq.attention import (
    AdditiveAttention,
    LuongAttention,
    MultiHeadAttention,
    TransformerBlock,
    batched_dot_product_attention,
    blockwise_attention,
    dot_product_attention,
)

# data
from jaxseq.data import CharVocab, PaddedBatcher, StreamBatcher, make_streams

# models
from jaxseq.models import (
    RecurrentLM,
    Seq2SeqAttention,
    SequenceClassifier,
    SequenceTagger,
    TransformerLM,
    WindowLM,
    char_lm,
    transformer_lm,
)

# training
from jaxseq.training import (
    Checkpointer,
    NonFiniteError,
    TrainState,
    cross_entropy,
    evaluate,
    evaluate_lm,
    fit,
    init_state,
    lm_loss_fn,
    make_optimizer,
    make_train_step,
)
# isort: on

__version__ = "0.1.0"

# Grouped by sub-package, sorted within each group (tests/test_architecture.py checks both).
__all__ = [
    # sub-packages
    "attention",
    "checks",
    "data",
    "decoding",
    "host_memory",
    "initializers",
    "interop",
    "masks",
    "models",
    "nn",
    "protocols",
    "recurrent",
    "training",
    # protocols
    "Cell",
    "SequenceLayer",
    # masks
    "causal_mask",
    "lengths_to_mask",
    # checks
    "checked",
    # recurrent
    "Bidirectional",
    "GRU",
    "LSTM",
    "MinGRU",
    "MinLSTM",
    "RNN",
    "Stack",
    "linear_recurrence",
    "rollout",
    "rollout_unrolled",
    # attention
    "AdditiveAttention",
    "LuongAttention",
    "MultiHeadAttention",
    "TransformerBlock",
    "batched_dot_product_attention",
    "blockwise_attention",
    "dot_product_attention",
    # data
    "CharVocab",
    "PaddedBatcher",
    "StreamBatcher",
    "make_streams",
    # models
    "RecurrentLM",
    "Seq2SeqAttention",
    "SequenceClassifier",
    "SequenceTagger",
    "TransformerLM",
    "WindowLM",
    "char_lm",
    "transformer_lm",
    # training
    "Checkpointer",
    "NonFiniteError",
    "TrainState",
    "cross_entropy",
    "evaluate",
    "evaluate_lm",
    "fit",
    "init_state",
    "lm_loss_fn",
    "make_optimizer",
    "make_train_step",
]
