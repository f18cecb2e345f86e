"""Value checks that survive ``jit``: :func:`checked`.

Shape and dtype errors are raised at trace time everywhere. Checks on
*values* (``lengths`` within ``[0, T]``, token ids within ``[0, V)``) can only
be raised eagerly when the values are concrete; inside compiled code a bad
value would otherwise be clamped or turned into NaN silently (JAX gathers
clamp out-of-range indices; ``take_along_axis`` fills them with NaN). The
library writes every such check as a ``jax.experimental.checkify`` check: a
no-op in plain compiled code, and an error carrying the same message when the
function runs under :func:`checked`.

Cost: the checks add a few reductions over the checked arrays (``lengths``
``[*B]``, token ids ``[T, *B]``) and one error value threaded out of the
compiled program; with ``nan_checks=True`` every floating-point operation is
also tested for NaN output, which is much dearer (use it to find where a NaN
first appears, not in a training run). ``python -m benchmarks.checks`` measures
both against the unchecked call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.experimental import checkify

__all__ = ["checked"]


def checked(fn: Callable, *, nan_checks: bool = False, jit: bool = True) -> Callable:
    """``fn`` with the library's value checks enforced, under ``jit`` too.

    Args:
      fn: any function that calls jaxseq (e.g. a loss, a rollout, a train step body).
      nan_checks: also raise where an operation first produces a NaN. Off by
        default: NaN written into padded steps is allowed (masked positions never
        reach the result), and this check would flag it.
      jit: compile the checked function with ``jax.jit`` (set False to wrap a
        function that is already jitted or must run eagerly).

    Returns:
      a function with ``fn``'s signature and results that raises ``ValueError``
      (a ``checkify.JaxRuntimeError``) with the failed check's message, e.g.
      ``lengths: expected values in [0, 5] (T=5), got min 0 max 9``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.GRU(3)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> f = lambda p, xs, n: js.rollout(cell, p, xs, lengths=n)[1]
    >>> xs = jnp.ones((5, 2, 2))
    >>> jax.jit(f)(params, xs, jnp.array([3, 9])).shape  # silently clamped to T
    (5, 2, 3)
    >>> try:
    ...     js.checked(f)(params, xs, jnp.array([3, 9]))
    ... except ValueError as e:
    ...     print(str(e).splitlines()[0])
    lengths: expected values in [0, 5] (T=5), got min 3 max 9 (`check` failed)
    >>> js.checked(f)(params, xs, jnp.array([3, 5])).shape
    (5, 2, 3)
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a function, got {type(fn).__name__}")
    errors = checkify.user_checks | (checkify.nan_checks if nan_checks else frozenset())
    inner = checkify.checkify(fn, errors=errors)
    if jit:
        inner = jax.jit(inner)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        err, out = inner(*args, **kwargs)
        err.throw()
        return out

    return run
