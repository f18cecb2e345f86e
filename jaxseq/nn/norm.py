"""Layer normalisation over the last axis, statistics in float32."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "LayerNorm",
    "LayerNormParams",
    "layer_norm",
]


class LayerNormParams(NamedTuple):
    """Layer-norm gain and offset, each ``[D]``."""

    scale: jax.Array  # [D]
    bias: jax.Array  # [D]


@dataclasses.dataclass(frozen=True)
class LayerNorm:
    """Layer normalisation over the last axis of ``x: [..., D]``, statistics in float32.

    ``eps``: added to the variance. ``init(key, input_size, dtype)`` returns unit scale
    and zero bias, each ``[D]`` (``key`` is unused and may be ``None``: the signature is
    every layer's); ``apply(params, x)`` is :func:`layer_norm` with this ``eps``.

    >>> ln = LayerNorm()
    >>> p = ln.init(None, 4)
    >>> p.scale.tolist(), [round(v, 3) for v in ln.apply(p, jnp.arange(4.0)).tolist()]
    ([1.0, 1.0, 1.0, 1.0], [-1.342, -0.447, 0.447, 1.342])
    """

    eps: float = 1e-5

    def __post_init__(self):
        if not isinstance(self.eps, int | float) or not self.eps > 0:
            raise ValueError(f"eps: expected a positive number, got {self.eps!r}")

    def init(self, key, input_size: int, dtype=jnp.float32) -> LayerNormParams:
        """``LayerNormParams(scale=ones [D], bias=zeros [D])`` for ``D = input_size``."""
        d = _checks.check_positive_int("input_size", input_size)
        return LayerNormParams(jnp.ones((d,), dtype), jnp.zeros((d,), dtype))

    def apply(self, params: LayerNormParams, x):
        """``x: [..., D] -> [..., D]`` in ``x``'s dtype (:func:`layer_norm`)."""
        return layer_norm(params, x, self.eps)


def layer_norm(params: LayerNormParams, x, eps: float = 1e-5):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis of ``x: [..., D]``.

    Statistics in float32; the result has ``x``'s dtype. The pure function under
    :meth:`LayerNorm.apply`.

    >>> y = layer_norm(LayerNorm().init(None, 4), jnp.array([[1.0, 2.0, 3.0, 4.0]]))
    >>> [round(v, 3) for v in y[0].tolist()]
    [-1.342, -0.447, 0.447, 1.342]
    """
    if not isinstance(params, LayerNormParams):
        raise TypeError(f"params: expected LayerNormParams, got {type(params).__name__}")
    _checks.check_floating("x", x)
    _checks.check_min_ndim("x", x, 1, "[..., D]")
    d = params.scale.shape[0]
    if x.shape[-1] != d:
        raise ValueError(f"x: expected last dim D={d}, got {_checks.describe(x)}")
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    shape = (1,) * (x.ndim - 1) + (d,)
    y = y * params.scale.astype(jnp.float32).reshape(shape) + params.bias.astype(
        jnp.float32
    ).reshape(shape)
    return y.astype(x.dtype)
