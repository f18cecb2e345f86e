"""FLOP counts of the recurrent benchmarks: the formulas every script reports throughput with."""

from __future__ import annotations

__all__ = ["GATES", "gflops", "rnn_flops"]

# Gate blocks per cell: the recurrent and input matmuls are [*, G*H] wide.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def rnn_flops(cell: str, batch: int, input_size: int, hidden: int, steps: int, training: bool):
    """Matmul FLOPs of a rollout: ``T * 2*B*G*H*(D+H)`` forward, 3x that for a training step.

    ``cell`` is ``"rnn"`` (G=1), ``"lstm"`` (G=4) or ``"gru"`` (G=3). Elementwise gate
    math is not counted; the backward pass is counted as twice the forward
    (input and weight gradients), so training = 3x forward.
    """
    g = GATES[cell]
    fwd = steps * 2 * batch * g * hidden * (input_size + hidden)
    return 3 * fwd if training else fwd


def gflops(flops: float | None, seconds: float | None) -> float | None:
    """``flops / seconds / 1e9``, None when either is missing."""
    if not flops or not seconds:
        return None
    return flops / seconds / 1e9
