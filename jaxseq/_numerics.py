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


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` (``[..., I] x [I, O] -> [..., O]``),
    accumulated and returned in at least float32.

    >>> matmul_f32(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16)).dtype
    dtype('float32')
    """
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc_dtype(x, w)
    )


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
