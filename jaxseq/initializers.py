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


def _uniform_init(limit_of) -> Initializer:
    """U(-lim, +lim) drawn in ``dtype``, with ``lim = limit_of(shape)``."""

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        lim = limit_of(shape)
        return jax.random.uniform(key, shape, dtype, -lim, lim)

    return init


def _normal_init(stddev_of) -> Initializer:
    """N(0, std^2) drawn in float32 and cast to ``dtype``, with ``std = stddev_of(shape)``."""

    def init(key, shape, dtype=jnp.float32):
        _checks.check_key("key", key)
        shape = _check_shape_arg(shape)
        std = stddev_of(shape)
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def zeros() -> Initializer:
    """All zeros.

    >>> zeros()(None, (2,)).tolist()
    [0.0, 0.0]
    """

    def init(key, shape, dtype=jnp.float32):
        return jnp.zeros(_check_shape_arg(shape), dtype)

    return init


def ones() -> Initializer:
    """All ones.

    >>> ones()(None, (2,), jnp.int32).tolist()
    [1, 1]
    """

    def init(key, shape, dtype=jnp.float32):
        return jnp.ones(_check_shape_arg(shape), dtype)

    return init


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``.

    >>> constant(0.5)(None, (1, 2)).tolist()
    [[0.5, 0.5]]
    """

    def init(key, shape, dtype=jnp.float32):
        return jnp.full(_check_shape_arg(shape), value, dtype)

    return init


def uniform(scale: float) -> Initializer:
    """U(-scale, +scale).

    >>> w = uniform(0.1)(jax.random.key(0), (64, 8))
    >>> w.shape, bool(jnp.all(jnp.abs(w) <= 0.1))
    ((64, 8), True)
    """
    if not scale >= 0:
        raise ValueError(f"scale: expected >= 0, got {scale!r}")
    return _uniform_init(lambda shape: scale)


def normal(stddev: float) -> Initializer:
    """N(0, stddev^2), drawn in ``dtype``.

    >>> normal(0.02)(jax.random.key(0), (3, 4), jnp.bfloat16).dtype
    dtype(bfloat16)
    """
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

    >>> w = scaled_normal(2.0)(jax.random.key(0), (400, 300))
    >>> round(float(jnp.var(w) * 400), 1)
    2.0
    """
    if not c > 0:
        raise ValueError(f"c: expected > 0, got {c!r}")
    return _normal_init(lambda shape: math.sqrt(c / max(_fans(shape)[0], 1)))


def lecun_normal() -> Initializer:
    """N(0, 1 / fan_in).

    >>> lecun_normal()(jax.random.key(0), (16, 4)).shape
    (16, 4)
    """
    return scaled_normal(1.0)


def lecun_uniform() -> Initializer:
    """U(+-sqrt(3 / fan_in)).

    >>> w = lecun_uniform()(jax.random.key(0), (3, 5))
    >>> bool(jnp.all(jnp.abs(w) <= 1.0))
    True
    """
    return _uniform_init(lambda shape: math.sqrt(3.0 / max(_fans(shape)[0], 1)))


def glorot_uniform() -> Initializer:
    """U(+-sqrt(6 / (fan_in + fan_out))) (Glorot & Bengio 2010).

    >>> w = glorot_uniform()(jax.random.key(0), (2, 4))
    >>> bool(jnp.all(jnp.abs(w) <= 1.0))
    True
    """
    return _uniform_init(lambda shape: math.sqrt(6.0 / max(sum(_fans(shape)), 1)))


def glorot_normal() -> Initializer:
    """N(0, 2 / (fan_in + fan_out)).

    >>> w = glorot_normal()(jax.random.key(0), (300, 500))
    >>> round(float(jnp.var(w) * 800), 1)
    2.0
    """
    return _normal_init(lambda shape: math.sqrt(2.0 / max(sum(_fans(shape)), 1)))


def pytorch_uniform() -> Initializer:
    """U(+-1/sqrt(H)) with ``H = shape[-1]``: PyTorch's default for every RNN weight and bias.

    Applied per gate block, ``shape[-1]`` is the hidden size ``H``.

    >>> w = pytorch_uniform()(jax.random.key(0), (8, 4))
    >>> bool(jnp.all(jnp.abs(w) <= 0.5))
    True
    """
    return _uniform_init(lambda shape: 1.0 / math.sqrt(max(shape[-1], 1)) if shape else 1.0)


def orthogonal(scale: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``scale`` (Saxe et al. 2014): the default for ``W_hh``.

    Its singular values are all ``scale``, so a linear recurrence neither
    explodes nor vanishes at initialisation.

    >>> q = orthogonal()(jax.random.key(0), (4, 4))
    >>> bool(jnp.allclose(q @ q.T, jnp.eye(4), atol=1e-5))
    True
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

    >>> identity(0.5)(None, (2, 2)).tolist()
    [[0.5, 0.0], [0.0, 0.5]]
    """

    def init(key, shape, dtype=jnp.float32):
        shape = _check_shape_arg(shape)
        if len(shape) != 2:
            raise ValueError(f"shape: identity needs a 2-D shape, got {shape}")
        return scale * jnp.eye(shape[0], shape[1], dtype=dtype)

    return init
