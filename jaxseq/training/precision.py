"""Mixed precision for the train step: float32 master weights, bfloat16 compute.

Under ``precision="bf16"`` (:func:`jaxseq.training.make_train_step`):

- the parameters and the optimizer state stay float32 in the train state (the
  master weights), and so does the carry stored between batches;
- inside the loss, every floating leaf of the params, of the incoming carry
  and of the batch is cast to bfloat16, so the forward runs on bfloat16
  operands (the cells', dense layers' and attention's matmuls accumulate in
  float32, and their gate math and softmaxes run in float32, as for any
  bfloat16 input);
- the backward multiplies bfloat16 operands too: the fused recurrent kernels
  and every other product of the package round the incoming cotangent to the
  weights' 16-bit dtype before their backward products, and every product,
  forward and backward, accumulates into and returns float32 (rounded to 16
  bits after it). A product with a 16-bit result, what plain autodiff gives
  the backward, runs on XLA's CPU backend as a float32 product of converted
  operands (twice the time); the lowered steps are tested for it;
- the gradient reaches the params float32 (the transpose of the cast), so the
  loss, the gradient norm, clipping and the optimizer update are all float32.

``precision="fp32"`` (the default) changes nothing. Integer and bool leaves
(token ids, masks, lengths) are never cast.

Where it pays: on accelerators (bfloat16 matrix units, half the bytes moved),
and on CPUs whose cores multiply bfloat16 (AVX512-BF16, AMX): on an AMD EPYC
with AVX512-BF16 the Transformer char LM's step takes about 0.6x its float32
time and the LSTM's about 0.8x (``python -m benchmarks.precision``, which
records the CPU's features beside its figures). On a CPU without them XLA
converts the operands and gains little. The training curve stays within a
small margin of float32's either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "PRECISIONS",
    "add_precision_arg",
    "cast_floating",
    "compute_dtype",
]

#: The precision policies: ``"fp32"`` everything float32; ``"bf16"`` float32
#: master weights, bfloat16 forward and backward.
PRECISIONS = ("fp32", "bf16")

_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def compute_dtype(precision: str):
    """The dtype the forward and backward run in under ``precision`` (``"fp32"`` or ``"bf16"``).

    >>> import jaxseq as js
    >>> js.training.compute_dtype("bf16")
    <class 'jax.numpy.bfloat16'>
    """
    if not isinstance(precision, str):
        raise TypeError(
            f"precision: expected one of {list(PRECISIONS)}, got {type(precision).__name__}"
        )
    _checks.check_choice("precision", precision, PRECISIONS)
    return _DTYPES[precision]


def cast_floating(tree, dtype):
    """Casts every floating leaf of ``tree`` to ``dtype``; integer, bool and key leaves stay.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> tree = {"w": jnp.ones(2), "ids": jnp.arange(2)}
    >>> out = js.training.cast_floating(tree, jnp.bfloat16)
    >>> str(out["w"].dtype), str(out["ids"].dtype)
    ('bfloat16', 'int32')
    """

    def cast(x):
        if x is None or not hasattr(x, "dtype"):
            return x
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree_util.tree_map(cast, tree)


def add_precision_arg(parser, default: str = "fp32"):
    """Adds ``--precision {fp32,bf16}`` to an ``argparse`` parser; returns the parser.

    Pass ``args.precision`` to :func:`jaxseq.training.make_train_step`.

    >>> import argparse, jaxseq as js
    >>> p = js.training.add_precision_arg(argparse.ArgumentParser())
    >>> p.parse_args(["--precision", "bf16"]).precision
    'bf16'
    """
    compute_dtype(default)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="fp32, or bf16: float32 master weights and optimizer, bfloat16 forward and "
        "backward (a speed-up on GPUs and TPUs; little on CPUs: 1.15x for the GRU char LM "
        "on a CPU with AVX512-BF16)",
    )
    return parser
