"""Inverted dropout, optionally with one mask shared along some axes (variational)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "dropout",
]


def dropout(key, x, rate: float, *, shared_axes=()):
    """Inverted dropout: zeroes a fraction ``rate`` of ``x`` and scales the rest by 1/(1-rate).

    ``shared_axes``: axes along which one mask is reused. ``shared_axes=(0,)`` on a
    time-major ``[T, *B, D]`` sequence drops the same units at every step
    (variational or "locked" dropout, Gal and Ghahramani 2016), and draws T times
    fewer random numbers.

    Shapes: ``x: [...]`` -> the same shape and dtype. ``rate == 0`` returns ``x``.

    >>> y = dropout(jax.random.key(0), jnp.ones((4, 3)), 0.5, shared_axes=(0,))
    >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [0.0], [2.0])
    True
    >>> bool(jnp.all(y == y[:1]))  # one mask for every row
    True
    """
    _checks.check_rate("rate", rate)
    if rate == 0.0:
        return x
    _checks.check_key("key", key)
    x = _checks.as_array("x", x)
    axes = _checks.check_axes("shared_axes", shared_axes, x.ndim)
    mask_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    keep = _keep_mask(key, mask_shape, rate)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def _keep_mask(key, shape, rate: float):
    """``bool[shape]``, each True with probability ``1 - rate`` (to within ``2**-17``).

    Two 16-bit uniform draws per 32-bit random word: half the threefry work and
    half the counter buffers of ``jax.random.bernoulli`` (one word per element),
    which inside a training step are fresh memory on every call (the measurement
    is in ``benchmarks/README.md``).
    """
    n = math.prod(shape)
    threshold = jnp.uint32(min(round(rate * 65536), 65535))
    if n == 0:
        return jnp.zeros(shape, bool)
    last = shape[-1] if shape else 1
    if last % 2 == 0:  # halves along the last axis: no flatten/reshape copy
        words = jax.random.bits(key, (*shape[:-1], last // 2), jnp.uint32)
        u = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)
    else:
        words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
        u = jnp.concatenate([words & 0xFFFF, words >> 16])[:n].reshape(shape)
    return u >= threshold
