"""Diagonal linear recurrences ``h_t = a_t * h_{t-1} + b_t``, sequential or parallel over time.

The recurrence behind minGRU/minLSTM (:mod:`jaxseq.recurrent.minimal`), LRU,
S5 and the RG-LRU: the coefficients ``a`` and inputs ``b`` do not depend on
``h``, so the whole sequence can be solved at once. Time-major:
``a, b: [T, *B, H]``, ``h0: [*B, H]``.

Modes of :func:`linear_recurrence` (all give the same values and gradients):

* ``"sequential"``: one ``lax.scan`` over T with a hand-written VJP: the
  backward of a linear recurrence is the reverse linear recurrence of the
  cotangents, ``g_t = dL/dh_t + a_{t+1} g_{t+1}``, with ``dL/db_t = g_t`` and
  ``dL/da_t = g_t h_{t-1}``, in one reverse scan. It saves only ``a`` and
  the states ``h`` for the backward.
* ``"associative"``: ``lax.associative_scan`` of the composition
  ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``, differentiated by plain
  autodiff (so it also has a forward mode): ``O(log T)`` depth, ``O(T log T)``
  memory traffic.
* ``"chunked"``: ``T = C * L`` split into ``C`` chunks of ``L`` steps. A first
  loop of ``L`` steps runs all ``C`` chunks at once (each from zero) and keeps
  only each chunk's end state and gate product; a scan over the ``C`` chunk
  ends gives the state entering every chunk; a second loop of ``L`` steps runs
  all chunks again from those states and writes ``h``. The backward (a
  ``custom_vjp``) is the same two-level solver on the cotangents, run the other
  way. ``2 L + C`` loop iterations instead of ``T``, each over ``C`` times more
  data; ``T`` need not be a multiple of ``L`` (the last chunk is padded with
  steps ``a = 1, b = 0``, which change nothing).
* ``"auto"``: :func:`auto_mode` (by backend and ``T``, see there).

**Numerical stability.** Every mode evaluates the recurrence in linear space
by composition only: products and sums of the coefficients, never a division
by a cumulative product (the closed form ``h_t = A_t sum_s b_s / A_s`` with
``A_t = prod a``, which overflows once ``A_t`` underflows, is what the log-space
form of minGRU/minLSTM exists to avoid). A product of many gates near 0 that
underflows to 0 is then the right limit (that state's contribution really is
gone), so long sequences stay finite and agree with a float64 loop without a
log-space detour, and ``h`` may take any sign. Arithmetic runs in float32 (float64
when an input is float64) whatever the input dtype.

``reset`` and ``lengths`` follow :func:`jaxseq.rollout`: a reset step starts
from zero (``a_t`` is selected to 0 there, so the state restarts from
``b_t``); padded steps (``t >= lengths``) are selected to ``a = 1, b = 0``
(the state passes through unchanged) and output zeros; ``reverse=True``
solves each sequence's valid part backwards. Masked entries are selected
with ``jnp.where`` before any arithmetic, so NaN or inf there changes nothing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq._numerics import acc_dtype
from jaxseq.recurrent import _sequence_parallel as seqpar
from jaxseq.recurrent.dispatch import under_forward_mode
from jaxseq.recurrent.sequence import processing_resets, valid_steps

__all__ = [
    "LINEAR_MODES",
    "auto_chunk",
    "auto_mode",
    "linear_recurrence",
]

LINEAR_MODES = ("auto", "sequential", "associative", "chunked")


# --------------------------------------------------------------------------- rules


def auto_mode(t: int, backend: str | None = None) -> str:
    """The mode ``mode="auto"`` runs for ``T = t`` steps on ``backend``.

    * CPU: ``"sequential"`` for every ``T``. On a CPU one ``lax.scan`` step over
      a ``[B, H]`` slab costs a few microseconds, and the parallel modes pay
      for their fewer steps with more passes over memory (the chunked mode
      reads ``a`` and ``b`` twice, the associative one ``log T`` times), which
      costs more than the steps they save at every ``T`` measured (256 to
      16384, ``B=8, H=256``; ``benchmarks/README.md``, "Parallel linear
      recurrences").
    * GPU/TPU: ``"chunked"`` for ``T > 64``, ``"sequential"`` below: there each
      scan step is a kernel launch, so the ``2 sqrt(T) + sqrt(T)`` steps of the
      chunked solver win over ``T`` once ``T`` is more than a few dozen. This
      half of the rule is not measured yet (no accelerator was available).

    Under forward-mode autodiff (``jax.jvp``) :func:`linear_recurrence` runs
    ``"associative"`` instead: the other two modes are ``custom_vjp`` s.

    >>> auto_mode(4096, "cpu"), auto_mode(4096, "gpu"), auto_mode(16, "gpu")
    ('sequential', 'chunked', 'sequential')
    """
    t = int(t)
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "sequential"
    return "chunked" if t > 64 else "sequential"


def auto_chunk(t: int) -> int:
    """Chunk length ``L`` of the chunked mode for ``T = t``: about ``sqrt(T)``.

    ``2 L + T / L`` loop iterations are fewest at ``L = sqrt(T / 2)``; among the
    lengths within a factor 2 of ``sqrt(T)`` a divisor of ``T`` is preferred
    (no padding), the one closest to ``sqrt(T)``. Never more than ``T``.

    >>> auto_chunk(4096), auto_chunk(1000), auto_chunk(997), auto_chunk(1)
    (64, 25, 32, 1)
    """
    t = max(int(t), 1)
    root = math.sqrt(t)
    lo, hi = max(1, int(root / 2)), max(1, int(2 * root))
    divisors = [d for d in range(lo, hi + 1) if t % d == 0]
    if divisors:
        return min(divisors, key=lambda d: (abs(math.log(d / root)), d))
    return min(t, math.ceil(root))


# --------------------------------------------------------------------------- helpers


def _index(x, i, axis: int = 0):
    return jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False)


def _first_step(t: int, reverse: bool) -> int:
    """The time index processed first."""
    return t - 1 if reverse else 0


# --------------------------------------------------------------------------- sequential


def _seq_forward(a, b, h0, reverse):
    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return jax.lax.scan(body, h0, (a, b), reverse=reverse)[1]


def _seq_backward(a, h, h0, g, reverse):
    """``(da, db, dh0)`` from the cotangent ``g`` of every state ``h``.

    Runs opposite to the forward: ``gh_t = g_t + c``, ``c = a_t gh_t`` carried
    to the step processed before ``t``; ``da_t = gh_t * h_prev(t)``.
    """
    t = a.shape[0]
    step = 1 if reverse else -1  # the step processed just before t is t + step

    def body(c, inp):
        i, g_i, a_i = inp
        gh = g_i + c
        j = i + step
        prev = jnp.where((j < 0) | (j >= t), h0, _index(h, jnp.clip(j, 0, t - 1)))
        return a_i * gh, (gh * prev, gh)

    dh0, (da, db) = jax.lax.scan(
        body, jnp.zeros_like(h0), (jnp.arange(t, dtype=jnp.int32), g, a), reverse=not reverse
    )
    return da, db, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sequential(a, b, h0, reverse):
    return _seq_forward(a, b, h0, reverse)


def _sequential_fwd(a, b, h0, reverse):
    h = _seq_forward(a, b, h0, reverse)
    return h, (a, h, h0)


def _sequential_bwd(reverse, res, g):
    a, h, h0 = res
    return _seq_backward(a, h, h0, g, reverse)


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


# --------------------------------------------------------------------------- associative


def _combine(x, y):
    """``x`` then ``y``: ``h -> y_a (x_a h + x_b) + y_b``."""
    return x[0] * y[0], y[0] * x[1] + y[1]


def _associative(a, b, h0, reverse):
    t = a.shape[0]
    first = jax.lax.broadcasted_iota(jnp.int32, (t,) + (1,) * (a.ndim - 1), 0)
    first = first == _first_step(t, reverse)
    b = b + jnp.where(first, a * h0[None], jnp.zeros((), b.dtype))
    return jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=0)[1]


# --------------------------------------------------------------------------- chunked


def _chunks(x, length: int):
    """``[T, ...] -> [C, L, ...]`` (free: a reshape)."""
    return x.reshape((x.shape[0] // length, length) + x.shape[1:])


def _across(xr, step: int, fill):
    """``[C, ...]``: the entry one step (``step`` = +1 or -1) past each chunk's edge.

    For ``step=+1``, entry ``c`` is ``xr[c + 1, 0]`` (``fill`` past the last
    chunk); for ``step=-1`` it is ``xr[c - 1, L - 1]`` (``fill`` before the first).
    """
    if step > 0:
        return jnp.concatenate([xr[1:, 0], fill[None]], axis=0)
    return jnp.concatenate([fill[None], xr[:-1, -1]], axis=0)


def _neighbour(xr, l, step: int, across):
    """``[C, ...]``: the entries at position ``l + step`` of every chunk (crossing edges)."""
    length = xr.shape[1]
    j = l + step
    inside = _index(xr, jnp.clip(j, 0, length - 1), 1)
    return jnp.where((j >= 0) & (j < length), inside, across)


def _summaries(coef, inp, shape, dtype, length: int, reverse: bool):
    """Each chunk's end state from zero and its gate product: ``(h_end, p_end) [C, ...]``."""

    def body(i, c):
        l = length - 1 - i if reverse else i
        h, p = c
        a_l = coef(l)
        return a_l * h + inp(l), a_l * p

    z = jnp.zeros(shape, dtype)
    return jax.lax.fori_loop(0, length, body, (z, jnp.ones_like(z)))


def _entering(h_end, p_end, h0, reverse: bool):
    """``[C, ...]``: the state entering every chunk, by a scan over the chunk ends."""

    def body(h, ends):
        return ends[0] + ends[1] * h, h

    return jax.lax.scan(body, h0, (h_end, p_end), reverse=reverse)[1]


def _chunk_forward(a, b, h0, length, reverse):
    ar, br = _chunks(a, length), _chunks(b, length)
    coef = lambda l: _index(ar, l, 1)
    inp = lambda l: _index(br, l, 1)
    h_end, p_end = _summaries(coef, inp, ar[:, 0].shape, a.dtype, length, reverse)
    h_in = _entering(h_end, p_end, h0, reverse)

    def body(i, st):
        l = length - 1 - i if reverse else i
        h, out = st
        h = coef(l) * h + inp(l)
        return h, jax.lax.dynamic_update_index_in_dim(out, h, l, 1)

    _, out = jax.lax.fori_loop(0, length, body, (h_in, jnp.zeros_like(ar)))
    return out.reshape(a.shape)


def _chunk_backward(a, h, h0, g, length, reverse):
    """The cotangent recurrence ``gh_t = g_t + a_next(t) gh_next(t)`` by the same
    two-level solver, run opposite to the forward; ``da_t = gh_t * h_prev(t)``."""
    ar, hr, gr = _chunks(a, length), _chunks(h, length), _chunks(g, length)
    fwd = -1 if reverse else 1  # the forward's next step is t + fwd
    a_across = _across(ar, fwd, jnp.zeros_like(h0))
    h_across = _across(hr, -fwd, h0)
    coef = lambda l: _neighbour(ar, l, fwd, a_across)
    inp = lambda l: _index(gr, l, 1)
    back = not reverse
    h_end, p_end = _summaries(coef, inp, ar[:, 0].shape, a.dtype, length, back)
    gh_in = _entering(h_end, p_end, jnp.zeros_like(h0), back)

    def body(i, st):
        l = length - 1 - i if back else i
        gh, da, db = st
        gh = coef(l) * gh + inp(l)
        da = jax.lax.dynamic_update_index_in_dim(da, gh * _neighbour(hr, l, -fwd, h_across), l, 1)
        db = jax.lax.dynamic_update_index_in_dim(db, gh, l, 1)
        return gh, da, db

    zeros = jnp.zeros_like(ar)
    _, da, db = jax.lax.fori_loop(0, length, body, (gh_in, zeros, zeros))
    da, db = da.reshape(a.shape), db.reshape(a.shape)
    first = _first_step(a.shape[0], reverse)
    return da, db, a[first] * db[first]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_core(a, b, h0, length, reverse):
    return _chunk_forward(a, b, h0, length, reverse)


def _chunked_fwd(a, b, h0, length, reverse):
    h = _chunk_forward(a, b, h0, length, reverse)
    return h, (a, h, h0)


def _chunked_bwd(length, reverse, res, g):
    a, h, h0 = res
    return _chunk_backward(a, h, h0, g, length, reverse)


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked(a, b, h0, length, reverse):
    t = a.shape[0]
    pad = -t % length
    if pad:  # steps a = 1, b = 0 after the end: they pass the state through
        tail = (pad,) + a.shape[1:]
        a = jnp.concatenate([a, jnp.ones(tail, a.dtype)], axis=0)
        b = jnp.concatenate([b, jnp.zeros(tail, b.dtype)], axis=0)
    h = _chunked_core(a, b, h0, length, reverse)
    return h[:t] if pad else h


# --------------------------------------------------------------------------- public


def _check_pair(a, b):
    for name, x in (("a", a), ("b", b)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array [T, *B, H], got {type(x).__name__}")
        _checks.check_floating(name, x)
        _checks.check_min_ndim(name, x, 2, "[T, *B, H]")
    if tuple(b.shape) != tuple(a.shape):
        raise ValueError(
            f"b: expected the shape of a {_checks.describe(a)} ([T, *B, H]), got {_checks.describe(b)}"
        )


def linear_recurrence(
    a,
    b,
    h0=None,
    *,
    reset=None,
    lengths=None,
    reverse=False,
    mode="auto",
    chunk=None,
    mesh=None,
    sequence_axis=None,
):
    """Solves ``h_t = a_t * h_{t-1} + b_t`` (elementwise) over ``T`` steps.

    Args:
      a: ``[T, *B, H]`` floating coefficients (gates).
      b: ``[T, *B, H]`` floating inputs, the shape of ``a``.
      h0: optional ``[*B, H]`` state before the first step (zeros when None).
      reset: optional ``bool[T, *B]``: the state is zero before step ``t``
        (``a_t`` is selected to 0: the state restarts from ``b_t``); in reverse
        a flag keeps its forward-time meaning, as in :func:`jaxseq.rollout`.
      lengths: optional ``int[*B]`` right padding: steps ``t >= lengths`` pass
        the state through and output zeros (their ``a``, ``b`` are never used),
        so the returned state is the one after the last valid step.
      reverse: solve from the last valid step of each sequence down to step 0
        (``h_t = a_t * h_{t+1} + b_t``); outputs stay in time order.
      mode: ``"auto"``, ``"sequential"``, ``"associative"`` or ``"chunked"``
        (see the module docstring; ``"auto"`` is :func:`auto_mode`, and
        ``"associative"`` under ``jax.jvp``).
      chunk: chunk length ``L`` of the chunked mode (default :func:`auto_chunk`).
      mesh: optional ``jax.sharding.Mesh`` for sequence parallelism, with
        ``sequence_axis``, the name of one of its axes: ``a``, ``b``, ``reset``
        and ``hs`` are split along ``T`` over that axis's ``n`` devices (``T``
        must be a multiple of ``n``: pad it and pass ``lengths``), everything
        else is replicated. Each device solves its ``T / n`` steps (in ``mode``),
        the devices exchange one ``[*B, H]`` summary each (the gate product across
        their slice and its end state), and each adds the state entering its
        slice; same values and gradients as on one device, up to rounding.
        ``lengths`` stay global step counts. Both or neither.
      sequence_axis: the mesh axis ``T`` is split over (see ``mesh``).

    Returns:
      ``(h_last [*B, H], hs [T, *B, H])``: the state after the last processed
      step and every step's state (zeros at padded steps), in the result dtype
      of ``a``, ``b`` and ``h0``; arithmetic runs in at least float32. With a
      ``mesh``, ``hs`` is split along ``T`` over ``sequence_axis`` and
      ``h_last`` replicated.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> a = jnp.full((4, 1), 0.5)  # [T, H], no batch dims
    >>> b = jnp.ones((4, 1))
    >>> h_last, hs = js.linear_recurrence(a, b)
    >>> hs[:, 0].tolist(), h_last.tolist()
    ([1.0, 1.5, 1.75, 1.875], [1.875])
    >>> _, hs = js.linear_recurrence(a, b, reset=jnp.array([False, False, True, False]))
    >>> hs[:, 0].tolist()
    [1.0, 1.5, 1.0, 1.5]

    Split over the devices of a mesh axis (here one device; with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on a CPU, eight):

    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> h_last, hs = js.linear_recurrence(a, b, mesh=mesh, sequence_axis="seq")
    >>> hs[:, 0].tolist(), h_last.tolist()
    ([1.0, 1.5, 1.75, 1.875], [1.875])
    """
    _check_pair(a, b)
    t = a.shape[0]
    batch_shape = tuple(a.shape[1:-1])
    if h0 is None:
        h0 = jnp.zeros(a.shape[1:], jnp.result_type(a, b))
    else:
        h0 = _checks.as_array("h0", h0)
        _checks.check_floating("h0", h0)
        if tuple(h0.shape) != tuple(a.shape[1:]):
            raise ValueError(
                f"h0: expected shape {list(a.shape[1:])} ([*B, H] of a {_checks.describe(a)}), "
                f"got {_checks.describe(h0)}"
            )
    _checks.check_choice("mode", mode, LINEAR_MODES)
    if chunk is not None:
        chunk = _checks.check_positive_int("chunk", chunk)
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"reverse: expected a bool, got {reverse!r}")
    reverse = bool(reverse)
    if lengths is not None:
        lengths = _checks.check_step_lengths(lengths, batch_shape, t, a)
    if reset is not None:
        reset = _checks.check_step_flags("reset", reset, (t, *batch_shape), "[T, *B]", "a", a)
    if seqpar.check_mesh(mesh, sequence_axis, t) is not None:
        options = dict(reverse=reverse, mode=mode, chunk=chunk)
        return _sharded(a, b, h0, reset, lengths, mesh, sequence_axis, **options)
    return _solve_checked(a, b, h0, reset, lengths, reverse=reverse, mode=mode, chunk=chunk)


def _solve_checked(a, b, h0, reset, lengths, *, reverse, mode, chunk):
    """:func:`linear_recurrence` on one device, its arguments checked."""
    valid = None if lengths is None else valid_steps(lengths, a.shape[0])
    return solve(a, b, h0, valid=valid, reset=reset, reverse=reverse, mode=mode, chunk=chunk)


# outside jit, one compiled program instead of op-by-op dispatch
_solve_checked = _checks.compiled_after_checks(_solve_checked, ("reverse", "mode", "chunk"))


def _slice_body(a, b, h0, reset, lengths, *, axis, reverse, mode, chunk):
    """One device's slice of :func:`_sharded` (inside ``shard_map``): solved from zero,
    summarised, combined with every other slice's summary, corrected."""
    t = a.shape[0]
    valid = seqpar.local_valid(axis, t, lengths)
    opts = dict(valid=valid, reset=reset, reverse=reverse, mode=mode, chunk=chunk)
    h_end, hs = solve(a, b, jnp.zeros_like(h0), **opts)
    one, zero = jnp.ones((), a.dtype), jnp.zeros((), a.dtype)
    gates = a if valid is None else jnp.where(valid[..., None], a, one)
    decay = jnp.prod(gates, axis=0)  # the gate product across the slice
    live = seqpar.live_resets(reset, valid)
    if live is not None:  # a reset inside the slice: nothing before it gets through
        decay = jnp.where(jnp.any(live, axis=0)[..., None], zero, decay)
    cut = seqpar.reverse_cut(reset, valid, reverse)
    if cut is not None:
        h_end = jnp.where(cut[..., None], zero, h_end)
    decays, ends = seqpar.gather(axis, decay, h_end)
    h_in, h_last = seqpar.entering(axis, decays, ends, h0, reverse)
    _, hs_in = solve(a, jnp.zeros_like(b), h_in, **opts)
    return h_last, hs + hs_in


def _sharded(a, b, h0, reset, lengths, mesh, axis, *, reverse, mode, chunk):
    """:func:`linear_recurrence` with ``T`` split over the mesh axis ``axis``."""
    out_dtype = jnp.result_type(a, b, h0)
    acc = acc_dtype(a, b, h0)
    body = functools.partial(_slice_body, axis=axis, reverse=reverse, mode=mode, chunk=chunk)
    run = seqpar.shard(body, mesh, axis, (True, True, False, True, False), (False, True))
    h_last, hs = run(a.astype(acc), b.astype(acc), h0.astype(acc), reset, lengths)
    return h_last.astype(out_dtype), hs.astype(out_dtype)


def solve(a, b, h0, *, valid=None, reset=None, reverse=False, mode="auto", chunk=None):
    """:func:`linear_recurrence` on inputs it trusts (no checks): a whole-sequence
    layer's solver, with the padding as a ``bool[T, *B]`` mask (``valid``, right
    padding) as a :class:`~jaxseq.recurrent.Sequence` carries it.

    >>> import jax.numpy as jnp
    >>> a, b = jnp.full((3, 1), 0.5), jnp.ones((3, 1))
    >>> h, hs = solve(a, b, jnp.zeros(1), valid=jnp.array([True, True, False]))
    >>> hs[:, 0].tolist(), h.tolist()
    ([1.0, 1.5, 0.0], [1.5])
    """
    t = a.shape[0]
    out_dtype = jnp.result_type(a, b, h0)
    acc = acc_dtype(a, b, h0)
    a, b, h0 = a.astype(acc), b.astype(acc), h0.astype(acc)
    if t == 0:
        return h0.astype(out_dtype), jnp.zeros(a.shape, out_dtype)

    reset_p = processing_resets(reset, valid, reverse)
    if reset_p is not None:
        a = jnp.where(reset_p[..., None], jnp.zeros((), acc), a)
    if valid is not None:
        valid = valid[..., None]
        a = jnp.where(valid, a, jnp.ones((), acc))
        b = jnp.where(valid, b, jnp.zeros((), acc))

    if mode == "auto":
        mode = "associative" if under_forward_mode(a, b, h0) else auto_mode(t)
    if mode == "sequential":
        hs = _sequential(a, b, h0, reverse)
    elif mode == "associative":
        hs = _associative(a, b, h0, reverse)
    else:
        hs = _chunked(a, b, h0, min(chunk or auto_chunk(t), t), reverse)

    h_last = hs[0] if reverse else hs[-1]
    if valid is not None:
        hs = jnp.where(valid, hs, jnp.zeros((), acc))
    return h_last.astype(out_dtype), hs.astype(out_dtype)
