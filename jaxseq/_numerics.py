"""Shared numerics: the accumulation dtype, matmuls that accumulate in float32, and
whether a function is traced for forward-mode autodiff (a ``custom_vjp`` has none:
the functions with a hand-written backward take their plain formulation there).

Every layer that multiplies matrices uses these, so bfloat16 inputs accumulate in
float32 and float64 inputs in float64 everywhere in the package.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.interpreters import ad


def _forward_mode_tracer(x) -> bool:
    """Whether ``x`` is, or wraps, a forward-mode (JVP) tracer.

    ``jax.interpreters.ad.JVPTracer`` is the public type of ``jax.jvp``'s
    tracers. A tracer of another transformation applied on top of ``jax.jvp``
    (``jax.vmap``'s, or the linearisation ``jax.grad`` runs) keeps the value it
    traces in its ``val`` or ``primal`` attribute; those are followed down.
    """
    seen = 0
    while isinstance(x, jax.core.Tracer) and seen < 64:
        seen += 1
        if isinstance(x, ad.JVPTracer):
            return True
        inner = getattr(x, "primal", None)
        if not isinstance(inner, jax.core.Tracer):
            inner = getattr(x, "val", None)
        x = inner
    return False


def under_forward_mode(*trees) -> bool:
    """True when any leaf of ``trees`` is being traced for forward-mode autodiff.

    Covers ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` and forward-over-reverse
    (``jax.jvp`` of ``jax.grad``), also under ``jax.vmap``. It cannot see a
    ``jax.jvp`` applied to an already-``jit``-ed function (inside the jit the
    inputs are plain staging tracers): pass ``kernel="scan"`` there.

    >>> import jax, jax.numpy as jnp
    >>> from jaxseq import _numerics
    >>> seen = []
    >>> f = lambda x: seen.append(_numerics.under_forward_mode(x)) or x
    >>> _ = jax.jvp(f, (1.0,), (1.0,)); _ = jax.grad(f)(1.0); seen
    [True, False]
    """
    return any(_forward_mode_tracer(x) for x in jax.tree_util.tree_leaves(trees))


def acc_dtype(*arrays) -> jnp.dtype:
    """Accumulation dtype: float32, or float64 when an operand is float64.

    >>> acc_dtype(jnp.zeros(2, jnp.bfloat16))
    dtype('float32')
    """
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _is_narrow(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize == 2


def _dot(x, w, out_dtype):
    """``x [..., I] @ w [I, O]`` with the leading dims of ``x`` as one: autodiff's weight
    gradient is then a product over one row axis (over several, XLA:CPU runs it
    through copies and a slower product)."""
    if x.ndim > 2:
        y = jax.lax.dot_general(
            x.reshape(math.prod(x.shape[:-1]), x.shape[-1]),
            w,
            (((1,), (0,)), ((), ())),
            preferred_element_type=out_dtype,
        )
        return y.reshape(x.shape[:-1] + w.shape[1:])
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype
    )


# Mixed precision (both operands 16-bit floats): the forward's products and the
# backward's take 16-bit operands and accumulate in float32, and every product
# RETURNS float32 (rounded to 16 bits after it). A product with a 16-bit result is
# not what it seems on CPU: XLA's CPU backend has no 16-bit-output matmul and
# runs it as a float32 one on converted operands (about twice the time of the
# 16-bit-operand, float32-output product). Autodiff of a float32-output product
# gives float32 cotangents, hence mixed (float32 x 16-bit) backward products,
# which XLA also runs in float32; so the backward is written here: the incoming
# cotangent is rounded to the operands' dtype and each backward product
# accumulates into, and returns, float32. Under forward-mode autodiff (a
# custom_vjp has none) the plain product runs.


def _einsum_parts(spec: str):
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_narrow(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_narrow_fwd(spec, a, b):
    return _einsum_narrow(spec, a, b), (a, b)


def _einsum_narrow_bwd(spec, res, g):
    a, b = res
    sa, sb, so = _einsum_parts(spec)
    gn = g.astype(a.dtype)
    da = jnp.einsum(f"{so},{sb}->{sa}", gn, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{so}->{sb}", a, gn, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_einsum_narrow.defvjp(_einsum_narrow_fwd, _einsum_narrow_bwd)


def einsum_acc(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` of two operands, accumulated and returned in at least
    float32 (float64 for float64 operands).

    With both operands the same 16-bit float dtype (mixed precision), the backward's
    products take 16-bit operands too (the incoming cotangent rounded to their dtype)
    and accumulate in float32. ``spec`` is explicit (``"...td,dke->...kte"``); every
    index of an operand appears in the other operand or in the output.

    >>> einsum_acc("td,dk->tk", jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16)).dtype
    dtype('float32')
    """
    if _is_narrow(a) and _is_narrow(b) and a.dtype == b.dtype and not under_forward_mode(a, b):
        return _einsum_narrow(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=acc_dtype(a, b))


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` (``[..., I] x [I, O] -> [..., O]``),
    accumulated and returned in at least float32.

    With both operands 16-bit floats (mixed precision), the backward's matmuls take
    16-bit operands as the forward's do (the incoming cotangent is rounded to that
    dtype), and still accumulate in float32 (:func:`einsum_acc`).

    >>> matmul_f32(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16)).dtype
    dtype('float32')
    """
    if _is_narrow(x) and _is_narrow(w) and x.dtype == w.dtype and not under_forward_mode(x, w):
        # leading dims kept: flattening them made the bf16 Transformer step 1.2x slower
        return _einsum_narrow("...i,io->...o", x, w)
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
