"""Training: losses, the optimizer, the train step, the loop and its loggers, evaluation,
checkpoints, sharding, several processes, mixed precision, diagnostics.
"""

from jaxseq.training.checkpoint import (
    CheckpointDamagedError,
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
from jaxseq.training.distributed import (
    add_distributed_args,
    init_from_args,
)
from jaxseq.training.evaluation import (
    evaluate,
)
from jaxseq.training.lm import (
    evaluate_lm,
    lm_loss_fn,
    make_eval_step,
)
from jaxseq.training.loggers import (
    JsonlLogger,
    Logger,
    TensorBoardLogger,
)
from jaxseq.training.loop import (
    PREEMPTED_EXIT_STATUS,
    PROCESS_LOST_EXIT_STATUS,
    BatchSourceError,
    NonFiniteError,
    Preempted,
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
from jaxseq.training.precision import (
    PRECISIONS,
    add_precision_arg,
    cast_floating,
    compute_dtype,
)
from jaxseq.training.sharding import (
    init_distributed,
    make_mesh,
    process_slice,
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
    "PRECISIONS",
    "PREEMPTED_EXIT_STATUS",
    "PROCESS_LOST_EXIT_STATUS",
    "BatchSourceError",
    "CheckpointDamagedError",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "JsonlLogger",
    "Logger",
    "NonFiniteError",
    "Preempted",
    "TensorBoardLogger",
    "TrainState",
    "TrainStep",
    "accuracy",
    "add_distributed_args",
    "add_precision_arg",
    "bits_per_token",
    "cast_floating",
    "compute_dtype",
    "cross_entropy",
    "evaluate",
    "evaluate_lm",
    "fit",
    "grad_norm_per_step",
    "init_distributed",
    "init_from_args",
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
    "process_slice",
    "read_jsonl",
    "restore_params",
    "shard_batch",
    "shard_state",
    "token_cross_entropy",
]
