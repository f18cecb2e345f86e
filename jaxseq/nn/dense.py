"""An affine layer ``[..., D] -> [..., O]`` with float32 accumulation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import add_bias, matmul_f32

__all__ = [
    "DenseParams",
    "dense",
    "dense_init",
]


class DenseParams(NamedTuple):
    """Weights of an affine layer: ``w: [D, O]``, ``b: [O]``."""

    w: jax.Array  # [D, O]
    b: jax.Array  # [O]


def dense_init(key, input_size: int, output_size: int, dtype=jnp.float32, kernel_init=None):
    """Parameters of an affine layer ``[..., D] -> [..., O]`` (LeCun normal, zero bias).

    ``kernel_init``: an initialiser ``(key, shape, dtype)`` for ``w`` (default LeCun normal).

    >>> p = dense_init(jax.random.key(0), 3, 2)
    >>> p.w.shape, p.b.tolist()
    ((3, 2), [0.0, 0.0])
    """
    _checks.check_key("key", key)
    d = _checks.check_positive_int("input_size", input_size)
    o = _checks.check_positive_int("output_size", output_size)
    w = (kernel_init or inits.lecun_normal())(key, (d, o), dtype)
    return DenseParams(w, jnp.zeros((o,), dtype))


def dense(params: DenseParams, x):
    """``x @ w + b`` for ``x: [..., D]`` -> ``[..., O]`` (float32 accumulation, result in
    the dtype of ``x`` and ``w``).

    >>> p = DenseParams(jnp.ones((3, 2)), jnp.array([0.0, 1.0]))
    >>> dense(p, jnp.ones((4, 3))).tolist()[0]
    [3.0, 4.0]
    """
    if not isinstance(params, DenseParams):
        raise TypeError(f"params: expected DenseParams, got {type(params).__name__}")
    _checks.check_floating("x", x)
    _checks.check_min_ndim("x", x, 1, "[..., D]")
    if x.shape[-1] != params.w.shape[0]:
        raise ValueError(f"x: expected last dim D={params.w.shape[0]}, got {_checks.describe(x)}")
    return add_bias(matmul_f32(x, params.w), params.b).astype(jnp.result_type(x, params.w))
