"""Shared numerics: the accumulation dtype and matmuls that accumulate in float32.

Every layer that multiplies matrices uses these, so bfloat16 inputs accumulate in
float32 and float64 inputs in float64 everywhere in the package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def acc_dtype(*arrays) -> jnp.dtype:
    """Accumulation dtype: float32, or float64 when an operand is float64.

    >>> acc_dtype(jnp.zeros(2, jnp.bfloat16))
    dtype('float32')
    """
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _is_narrow(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize == 2


def _dot(x, w, out_dtype):
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype
    )


@jax.custom_jvp
def _matmul_narrow(x, w):
    return _dot(x, w, jnp.float32)


@_matmul_narrow.defjvp
def _matmul_narrow_jvp(primals, tangents):
    # The tangent map is computed in the operands' 16-bit dtype, so its transpose (the
    # backward) multiplies 16-bit cotangents too (the backends accumulate 16-bit dots in
    # float32 and round the result).
    x, w = primals
    dx, dw = tangents
    narrow = x.dtype
    t = _dot(dx.astype(narrow), w, narrow) + _dot(x, dw.astype(narrow), narrow)
    return _matmul_narrow(x, w), t.astype(jnp.float32)


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` (``[..., I] x [I, O] -> [..., O]``),
    accumulated and returned in at least float32.

    With both operands 16-bit floats (mixed precision), the backward's matmuls take
    16-bit operands as the forward's do (the incoming cotangent is rounded to that
    dtype), and still accumulate in float32.

    >>> matmul_f32(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16)).dtype
    dtype('float32')
    """
    if _is_narrow(x) and _is_narrow(w) and x.dtype == w.dtype:
        return _matmul_narrow(x, w)
    return _dot(x, w, acc_dtype(x, w))


def masked_softmax(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of float32 ``scores``; ``mask`` (bool, True = keep,
    broadcast to ``scores``) selects the entries: masked ones are exactly 0 and a fully
    masked row is all 0 (never NaN), in values and gradients.

    >>> masked_softmax(jnp.zeros((2, 2)), jnp.array([[True, True], [False, False]])).tolist()
    [[0.5, 0.5], [0.0, 0.0]]
    """
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def add_bias(z: jax.Array, b: jax.Array) -> jax.Array:
    """``z + b`` with ``b: [O]`` broadcast explicitly over the leading dims of ``z: [..., O]``.

    >>> add_bias(jnp.zeros((2, 3)), jnp.arange(3.0)).tolist()
    [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    """
    return z + b.astype(acc_dtype(z, b)).reshape((1,) * (z.ndim - 1) + b.shape)
