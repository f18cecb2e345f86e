"""Layer normalisation over the last axis, statistics in float32.

The backward is written by hand (``jax.custom_vjp``) and keeps the normalised
input ``x̂`` and ``1/σ`` from the forward: ``dx = (g - mean(g) - x̂·mean(g·x̂)) / σ``
with ``g = dy·scale``. Ordinary autodiff of the formula keeps ``x`` instead, and
XLA's CPU fusion then recomputes ``x`` inside every consumer of the backward; in
a pre-LN Transformer ``x`` is the residual stream, the sum of every earlier
block's outputs, so each consumer re-added all of them (a quarter of a 4-layer
model's train step on a 2-core CPU; ``benchmarks/README.md``, "The Transformer
against PyTorch"). Under forward-mode autodiff (``jax.jvp``), which a
``custom_vjp`` does not support, the plain formula runs.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq._numerics import acc_dtype, under_forward_mode

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

    Statistics in float32 (float64 for float64 ``x``); the result has ``x``'s dtype.
    The pure function under :meth:`LayerNorm.apply`; its backward is hand-written
    (see the module docstring), and ``jax.jvp`` runs the plain formula.

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
    shape = (1,) * (x.ndim - 1) + (d,)
    scale = params.scale.reshape(shape)
    bias = params.bias.reshape(shape)
    if under_forward_mode(x, scale, bias):
        return _layer_norm_formula(x, scale, bias, eps)
    return _layer_norm(x, scale, bias, float(eps))


def _normalise(x, eps):
    """``(x̂, 1/σ)`` over the last axis, in float32 (float64 for float64 ``x``)."""
    xf = x.astype(acc_dtype(x))
    xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    return xc * rstd, rstd


def _layer_norm_formula(x, scale, bias, eps):
    xh, _ = _normalise(x, eps)
    y = xh * scale.astype(xh.dtype) + bias.astype(xh.dtype)
    return y.astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_formula(x, scale, bias, eps)


def _layer_norm_fwd(x, scale, bias, eps):
    xh, rstd = _normalise(x, eps)
    y = (xh * scale.astype(xh.dtype) + bias.astype(xh.dtype)).astype(x.dtype)
    return y, (xh, rstd, scale, bias)


def _layer_norm_bwd(eps, res, dy):
    xh, rstd, scale, bias = res
    dyf = dy.astype(xh.dtype)
    g = dyf * scale.astype(xh.dtype)
    dx = rstd * (
        g - jnp.mean(g, axis=-1, keepdims=True) - xh * jnp.mean(g * xh, axis=-1, keepdims=True)
    )
    lead = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dyf * xh, axis=lead, keepdims=True)
    dbias = jnp.sum(dyf, axis=lead, keepdims=True)
    return dx.astype(dy.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
