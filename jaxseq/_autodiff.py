"""Which autodiff mode a function is being traced for.

A ``jax.custom_vjp`` (the fused recurrent kernels, the layer norm's backward) has
no forward mode; the functions that use one ask :func:`under_forward_mode` and
take their plain formulation under ``jax.jvp``.
"""

from __future__ import annotations

import jax
from jax.interpreters import ad

__all__ = ["under_forward_mode"]


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
    >>> from jaxseq import _autodiff
    >>> seen = []
    >>> f = lambda x: seen.append(_autodiff.under_forward_mode(x)) or x
    >>> _ = jax.jvp(f, (1.0,), (1.0,)); _ = jax.grad(f)(1.0); seen
    [True, False]
    """
    return any(_forward_mode_tracer(x) for x in jax.tree_util.tree_leaves(trees))
