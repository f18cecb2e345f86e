"""An affine layer ``[..., D] -> [..., O]`` with float32 accumulation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import add_bias, matmul_f32

__all__ = [
    "Dense",
    "DenseParams",
    "dense",
]


class DenseParams(NamedTuple):
    """Weights of an affine layer: ``w: [D, O]``, ``b: [O]``."""

    w: jax.Array  # [D, O]
    b: jax.Array  # [O]


@dataclasses.dataclass(frozen=True)
class Dense:
    """An affine layer ``[..., D] -> [..., O]``: ``x @ w + b``, float32 accumulation.

    Args:
      output_size: ``O``.
      kernel_init: an initialiser ``(key, shape, dtype)`` for ``w`` (default LeCun
        normal); the bias starts at zero.

    ``init(key, input_size, dtype) -> DenseParams`` (``w: [D, O]``, ``b: [O]``) and
    ``apply(params, x)``, the pure function :func:`dense`.

    >>> layer = Dense(2)
    >>> p = layer.init(jax.random.key(0), 3)
    >>> p.w.shape, p.b.tolist(), layer.apply(p, jnp.ones((4, 3))).shape
    ((3, 2), [0.0, 0.0], (4, 2))
    """

    output_size: int
    kernel_init: Callable | None = None

    def __post_init__(self):
        _checks.check_positive_int("output_size", self.output_size)

    def init(self, key, input_size: int, dtype=jnp.float32) -> DenseParams:
        """``DenseParams(w [D, O], b [O])`` for ``D = input_size``."""
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        o = self.output_size
        w = (self.kernel_init or inits.lecun_normal())(key, (d, o), dtype)
        return DenseParams(w, jnp.zeros((o,), dtype))

    def apply(self, params: DenseParams, x):
        """``x: [..., D] -> [..., O]`` (:func:`dense`), params of this layer's ``O``."""
        if isinstance(params, DenseParams):
            _checks.check_shape("params.b", params.b, (self.output_size,), ("O",))
        return dense(params, x)


def dense(params: DenseParams, x):
    """``x @ w + b`` for ``x: [..., D]`` -> ``[..., O]`` (float32 accumulation, result in
    the dtype of ``x`` and ``w``): the pure function under :meth:`Dense.apply`.

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
