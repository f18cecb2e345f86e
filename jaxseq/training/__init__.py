"""Training: losses, the optimizer, the train step, the loop, checkpoints, sharding,
diagnostics.
"""

from jaxseq.training.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    restore_params,
)
from jaxseq.training.diagnostics import (
    grad_norm_per_step,
    plot_grad_norms,
    plot_training_curves,
    read_jsonl,
)
from jaxseq.training.lm import (
    evaluate_lm,
    lm_loss_fn,
    make_eval_step,
)
from jaxseq.training.loop import (
    NonFiniteError,
    fit,
)
from jaxseq.training.losses import (
    accuracy,
    bits_per_token,
    cross_entropy,
    mse,
    nats_to_bits,
    token_cross_entropy,
)
from jaxseq.training.optimizer import (
    OPTIMIZERS,
    make_optimizer,
)
from jaxseq.training.sharding import (
    init_distributed,
    make_mesh,
    shard_batch,
    shard_state,
)
from jaxseq.training.step import (
    TrainState,
    TrainStep,
    init_state,
    make_train_step,
)

__all__ = [
    "OPTIMIZERS",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "NonFiniteError",
    "TrainState",
    "TrainStep",
    "accuracy",
    "bits_per_token",
    "cross_entropy",
    "evaluate_lm",
    "fit",
    "grad_norm_per_step",
    "init_distributed",
    "init_state",
    "lm_loss_fn",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "mse",
    "nats_to_bits",
    "plot_grad_norms",
    "plot_training_curves",
    "read_jsonl",
    "restore_params",
    "shard_batch",
    "shard_state",
    "token_cross_entropy",
]
