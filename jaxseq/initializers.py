"""Weight initialisers: ``(key, shape, dtype) -> array``.

Each public name is a factory that returns an initialiser, so settings are
closed over and the result is a plain pure function::

    init = js.initializers.scaled_normal(1.5)      # N(0, 1.5 / fan_in)
    w = init(key, (256, 256), jnp.float32)

Cells apply their initialisers *per gate block*: an LSTM's recurrent matrix
``[H, 4H]`` is four ``[H, H]`` blocks, each initialised on its own (so
``orthogonal()`` gives four orthogonal matrices, ``identity()`` four identities).

Fan-in is ``shape[0]`` (weights are stored ``[in, out]``); for a bias
``shape[-1]`` is the layer width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxseq import _checks

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]

__all__ = [
    "Initializer",
    "constant",
    "glorot_normal",
    "glorot_uniform",
    "identity",
    "lecun_normal",
    "lecun_uniform",
    "normal",
    "ones",
    "orthogonal",
    "pytorch_uniform",
    "scaled_normal",
    "uniform",
    "zeros",
]


def _fans(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _check_shape_arg(shape) -> tuple:
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"shape: expected non-negative dims, got {shape}")
    return shape


def zeros() -> Initializer:
    """All zeros."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.zeros(_check_shape_arg(shape), dtype)

    return init


def ones() -> Initializer:
    """All ones."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.ones(_check_shape_arg(shape), dtype)

    return init


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.full(_check_shape_arg(shape), value, dtype)

    return init


def uniform(scale: float) -> Initializer:
    """U(-scale, +scale)."""
    if not scale >= 0:
        raise ValueError(f"scale: expected >= 0, got {scale!r}")

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        return jax.random.uniform(key, _check_shape_arg(shape), dtype, -scale, scale)

    return init


def normal(stddev: float) -> Initializer:
    """N(0, stddev^2)."""
    if not stddev >= 0:
        raise ValueError(f"stddev: expected >= 0, got {stddev!r}")

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        return stddev * jax.random.normal(key, _check_shape_arg(shape), dtype)

    return init


def scaled_normal(c: float = 1.0) -> Initializer:
    """N(0, c / fan_in): ``c=1`` is LeCun, ``c=2`` He; the course demos use 3 and 1.5.

    For a recurrent matrix ``W_hh`` the spectral radius is about ``sqrt(c)``,
    so ``c > 1`` makes gradients explode and ``c < 1`` vanish over long rollouts.
    """
    if not c > 0:
        raise ValueError(f"c: expected > 0, got {c!r}")

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        fan_in, _ = _fans(shape)
        std = math.sqrt(c / max(fan_in, 1))
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def lecun_normal() -> Initializer:
    """N(0, 1 / fan_in)."""
    return scaled_normal(1.0)


def lecun_uniform() -> Initializer:
    """U(+-sqrt(3 / fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        fan_in, _ = _fans(shape)
        lim = math.sqrt(3.0 / max(fan_in, 1))
        return jax.random.uniform(key, shape, dtype, -lim, lim)

    return init


def glorot_uniform() -> Initializer:
    """U(+-sqrt(6 / (fan_in + fan_out))) (Glorot & Bengio 2010)."""

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        fan_in, fan_out = _fans(shape)
        lim = math.sqrt(6.0 / max(fan_in + fan_out, 1))
        return jax.random.uniform(key, shape, dtype, -lim, lim)

    return init


def glorot_normal() -> Initializer:
    """N(0, 2 / (fan_in + fan_out))."""

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        fan_in, fan_out = _fans(shape)
        std = math.sqrt(2.0 / max(fan_in + fan_out, 1))
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def pytorch_uniform() -> Initializer:
    """U(+-1/sqrt(H)) with ``H = shape[-1]``: PyTorch's default for every RNN weight and bias.

    Applied per gate block, ``shape[-1]`` is the hidden size ``H``.
    """

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        lim = 1.0 / math.sqrt(max(shape[-1], 1)) if shape else 1.0
        return jax.random.uniform(key, shape, dtype, -lim, lim)

    return init


def orthogonal(scale: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``scale`` (Saxe et al. 2014): the default for ``W_hh``.

    Its singular values are all ``scale``, so a linear recurrence neither
    explodes nor vanishes at initialisation.
    """

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        if len(shape) < 2:
            raise ValueError(f"shape: orthogonal needs rank >= 2, got {shape}")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        n, m = max(rows, cols), min(rows, cols)
        a = jax.random.normal(key, (n, m), jnp.float32)
        q, r = jnp.linalg.qr(a)
        # Sign correction makes the distribution uniform (Haar) over orthogonal matrices.
        q = q * jnp.sign(jnp.diagonal(r))[None, :]
        if rows < cols:
            q = q.T
        return (scale * q).reshape(shape).astype(dtype)

    return init


def identity(scale: float = 1.0) -> Initializer:
    """``scale`` times the identity: the recurrent init of the IRNN (Le, Jaitly & Hinton 2015).

    With ReLU activation and zero bias, ``h_t = relu(h_{t-1} + W_x x_t)`` starts
    as an integrator, which lets a plain RNN learn long-range dependencies.
    """

    def init(key, shape, dtype=jnp.float32):
        shape = _check_shape_arg(shape)
        if len(shape) != 2:
            raise ValueError(f"shape: identity needs a 2-D shape, got {shape}")
        return scale * jnp.eye(shape[0], shape[1], dtype=dtype)

    return init
