"""jaxseq: functional sequence-model kernels in JAX.

Pure-function RNN/LSTM/GRU cells over parameter pytrees, ``lax.scan``
rollouts with lengths, resets and reverse, stacked and bidirectional layers,
vmapped attention, models, and a training loop for any task.

Layers, bottom to top (a module imports only from layers below it)::

    _checks, _numerics, masks, initializers, protocols, checks
    nn/          dense, embedding, dropout, layer norm
    recurrent/   cells, minGRU/minLSTM, fused kernels, linear recurrences, rollouts, Bidirectional, Stack
    attention/   dot-product, multi-head, blockwise, additive/Luong, positional, Transformer
    data/        token streams, real-valued streams, padded batches, download
    models/      language models, taggers and classifiers, seq2seq
    decoding     sampling
    training/    losses, optimizer, train step, loop, checkpoints, sharding, diagnostics
    interop/     PyTorch and Flax weights

Every public name of the sub-packages is also reachable as ``js.<name>``.
"""

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
from jaxseq.attention import *  # noqa: F403
from jaxseq.checks import *  # noqa: F403
from jaxseq.data import *  # noqa: F403
from jaxseq.decoding import *  # noqa: F403
from jaxseq.masks import *  # noqa: F403
from jaxseq.models import *  # noqa: F403
from jaxseq.nn import *  # noqa: F403
from jaxseq.protocols import *  # noqa: F403
from jaxseq.recurrent import *  # noqa: F403
from jaxseq.training import *  # noqa: F403
from jaxseq.training import checkpoint, losses

__version__ = "0.1.0"

__all__ = sorted(
    [
        "attention",
        "checkpoint",
        "checks",
        "data",
        "decoding",
        "initializers",
        "interop",
        "losses",
        "masks",
        "models",
        "nn",
        "protocols",
        "recurrent",
        "training",
        *attention.__all__,
        *checks.__all__,
        *data.__all__,
        *decoding.__all__,
        *masks.__all__,
        *models.__all__,
        *nn.__all__,
        *protocols.__all__,
        *recurrent.__all__,
        *training.__all__,
    ]
)
