"""Linear attention with a decaying matrix state: ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``.

The recurrence behind gated linear attention (a decay per key, ``g: [T, *B, K,
Dk]``), Mamba-2's state-space duality and RetNet (a scalar decay per head,
``g: [T, *B, K]``) and plain linear attention (no decay). Time-major, ``K``
heads: ``q, k: [T, *B, K, Dk]``, ``v: [T, *B, K, Dv]``, the state
``S: [*B, K, Dk, Dv]`` and the output ``y_t = S_tᵀ q_t: [T, *B, K, Dv]``.

Modes of :func:`linear_attention` (one meaning, the same values and gradients
up to rounding; all differentiated by plain autodiff, forward and reverse):

* ``"recurrent"``: one ``lax.scan`` over the steps carrying ``S``; the form for
  generation (constant memory per step in the forward). Its reverse-mode
  gradient stores ``S`` at every step.
* ``"chunked"``: the steps split into chunks of ``L = chunk`` (``T`` need not
  be a multiple: the last chunk is padded with steps that change nothing).
  Inside a chunk, the decay-masked ``L x L`` products ``(q_t · k_s) D_ts`` as
  matmuls; across chunks, a scan over the chunk ends carrying ``S``. It stores
  one state per chunk, ``O(T / L · Dk · Dv)`` per head. With a per-key decay
  (default ``L = 32``) one scan runs over the chunks, each a step that takes
  the state in and gives it out, and its work is rebuilt in the backward
  (``jax.checkpoint``) rather than stored. Inside a chunk whose log-decays sum
  to ``>= -30`` on every key, queries and keys decayed from and to the chunk
  start, ``q_t exp(b_t)`` and ``k_s exp(-b_s)``, meet in one ``L x L`` matmul;
  a chunk that decays more is cut into sub-chunks of ``l`` steps (8 for
  ``L <= 64``; gated linear attention's secondary chunking): elementwise
  ``[l, l, Dk]`` decay weights inside a sub-chunk, one matmul of decayed
  queries and keys between sub-chunks (``lax.cond`` picks per chunk; under
  ``vmap`` both run).
* ``"parallel"``: the chunked form with a single chunk of ``T`` steps: one
  decay-masked ``T x T`` product (with a per-key decay, decayed queries and
  keys or sub-chunks as above), for short sequences: its memory grows as ``T^2``.
* ``"auto"``: ``"parallel"`` when ``T <= chunk``, ``"chunked"`` otherwise.

**Numerical stability.** Arithmetic runs in float32 (float64 for float64
inputs). The decays are ``exp(log_decay)`` with ``log_decay <= 0`` (positive
values are clipped to 0: a state never grows by itself); use ``reset`` for a
hard forget rather than ``-inf``. Nothing overflows however strongly the
gates decay: no exponent is positive but the decayed keys' ``-b_s <= 30``
below, and a product of decays that underflows to 0 is the right limit. Across a chunk, decays are the ``exp`` of
direct sums of log-decays, never of a difference: with a scalar decay the
decay from step ``s`` to step ``t`` of a chunk is ``exp(g_{s+1} + ... + g_t)``
(the segment sums of Mamba-2's chunked algorithm, an ``[L, L]`` cumulative
sum, rather than ``G_t - G_s`` of two long cumulative sums, whose rounding
grows with the chunk length), the decays to a chunk's end are suffix sums and
those from its start prefix sums (with a per-key decay, sums of whole
sub-chunks and of the steps of one). The exceptions, with a per-key decay:
inside a chunk that decays by at most ``e^-30`` on every key, the decay from
``s`` to ``t`` is ``exp(b_t) exp(-b_s)``, both exponents within ``[-30, 30]``
(no overflow, no underflow to 0); inside a chunk that decays more, between two
steps of the same sub-chunk it is ``exp(c_t - c_s)``, ``c`` the sums of at
most ``l`` log-decays from the sub-chunk start, its exponent clamped to
``<= 0``. Their rounding is that of a sum of at most ``L`` (or ``l``) terms:
an error of a few ulps of ``|b_s|`` (``|c_s|``) in the exponent.

``reset`` and ``lengths`` follow :func:`jaxseq.recurrent.linear_recurrence`:
a reset step starts from an empty state (``S_{t-1}`` is replaced by zero);
padded steps (``t >= lengths``) leave the state unchanged and output zeros,
and their inputs, NaN or inf, reach no arithmetic; ``reverse=True`` runs each
sequence's valid part backwards (outputs stay in time order).
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
from jaxseq.recurrent.sequence import processing_resets, valid_steps

__all__ = [
    "LINEAR_ATTENTION_MODES",
    "linear_attention",
]

LINEAR_ATTENTION_MODES = ("auto", "recurrent", "chunked", "parallel")

_HIGHEST = jax.lax.Precision.HIGHEST
_CHUNK, _PER_KEY_CHUNK = 64, 32  # default chunk lengths: scalar or no decay, per-key decay
_DECAYED_RANGE = 30.0  # largest |exponent| of the per-key decay's decayed queries and keys


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


# --------------------------------------------------------------------------- recurrent


def _recurrent(q, k, v, g, reset, s0):
    """``q, k: [T, N, Dk]``, ``v: [T, N, Dv]``, ``g: [T, N, G]`` (G = 1 or Dk),
    ``reset: bool[T, N]`` or None, ``s0: [N, Dk, Dv]`` -> ``(S_T, ys [T, N, Dv])``."""

    def body(s, xs):
        q_t, k_t, v_t, g_t = xs[:4]
        s = jnp.exp(g_t)[..., None] * s
        if reset is not None:  # no select per step without resets
            s = jnp.where(xs[4][:, None, None], jnp.zeros((), s.dtype), s)
        s = s + k_t[..., :, None] * v_t[..., None, :]
        return s, _einsum("nd,nde->ne", q_t, s)

    xs = (q, k, v, g) if reset is None else (q, k, v, g, reset)
    return jax.lax.scan(body, s0, xs)


# --------------------------------------------------------------------------- chunked


def _segment_sums(g, later):
    """``out[..., t, s, :] = g[s+1] + ... + g[t]`` (0 for ``t <= s``) from ``g: [..., L, G]``:
    ``[..., L, L, G]``, each a sum of its own terms (not a difference of two long
    cumulative sums, which loses the small decays of a long chunk to rounding).
    ``later: bool[L, L]``, ``t > s``."""
    later = later.reshape((1,) * (g.ndim - 2) + later.shape + (1,))
    terms = jnp.where(later, g[..., :, None, :], jnp.zeros((), g.dtype))
    return jnp.cumsum(terms, axis=-3)


def _intra_scalar(q, k, v, g, seg):
    """Inside every chunk, scalar decay: ``[C, N, L, Dv]``. ``g: [C, N, L, 1]``,
    ``seg: int[C, N, L]`` resets so far."""
    steps = jnp.arange(q.shape[2])
    later = steps[:, None] > steps[None, :]
    causal = (later | (steps[:, None] == steps[None, :]))[None, None]
    same = causal & (seg[..., :, None] == seg[..., None, :])  # the pairs that contribute
    w = jnp.where(same, jnp.exp(_segment_sums(g, later)[..., 0]), jnp.zeros((), q.dtype))
    scores = _einsum("cntd,cnsd->cnts", q, k) * w
    return _einsum("cnts,cnse->cnte", scores, v)


def _sub_chunk(length: int) -> int:
    """Sub-chunk length ``l`` of the per-key decay: the largest divisor of ``L`` up
    to ``max(8, sqrt(L))``, balancing the ``[L/l, l, l, Dk]`` decay weights inside
    sub-chunks against the ``[L/l, L/l, l, Dk]`` queries decayed from each earlier
    sub-chunk.

    >>> _sub_chunk(16), _sub_chunk(64), _sub_chunk(300), _sub_chunk(7)
    (8, 8, 15, 7)
    """
    top = max(8, math.isqrt(length))
    return max(d for d in range(1, min(top, length) + 1) if length % d == 0)


def _suffix_sums(g, axis: int):
    """``out[s] = g[s+1] + ... + g[-1]`` along ``axis`` (a direct sum, no difference)."""
    incl = jnp.flip(jnp.cumsum(jnp.flip(g, axis), axis=axis), axis)
    incl = jnp.moveaxis(incl, axis, 0)
    out = jnp.concatenate([incl[1:], jnp.zeros_like(incl[:1])], axis=0)
    return jnp.moveaxis(out, 0, axis)


def _prefix_sums(g, axis: int):
    """``out[s] = g[0] + ... + g[s-1]`` along ``axis`` (a direct sum, 0 first)."""
    g = jnp.moveaxis(g, axis, 0)
    out = jnp.cumsum(jnp.concatenate([jnp.zeros_like(g[:1]), g[:-1]], axis=0), axis=0)
    return jnp.moveaxis(out, 0, axis)


def _per_key_decays(g, sub: int):
    """Log-decays of one chunk, ``g: [N, L, Dk]`` in sub-chunks of ``sub`` steps:
    ``c [N, n, l, Dk]`` from the sub-chunk start through step ``t``, ``e`` from
    after step ``s`` to the sub-chunk end, ``tot [N, n, Dk]`` each sub-chunk's
    sum, ``b, after [N, L, Dk]`` the same from the chunk start and to the chunk
    end, ``total [N, Dk]``. All direct sums of log-decays (no differences), ``<= 0``."""
    heads, length, dk = g.shape
    gs = g.reshape(heads, length // sub, sub, dk)
    c = jnp.cumsum(gs, axis=2)
    e = _suffix_sums(gs, 2)
    tot = jnp.sum(gs, axis=2)
    b = (_prefix_sums(tot, 1)[:, :, None] + c).reshape(g.shape)
    after = (_suffix_sums(tot, 1)[:, :, None] + e).reshape(g.shape)
    return c, e, tot, b, after, jnp.sum(tot, axis=1)


def _per_key_chunk(s, xs, sub: int):
    """One chunk of the per-key decay, a step of the scan over chunks: ``s [N, Dk, Dv]``
    the state entering it, ``xs``: ``q, k, g [L, N, Dk]``, ``v [L, N, Dv]``,
    ``reset bool[L, N]`` -> ``(state at its end, ys [L, N, Dv])``."""
    q, k, v, g = (jnp.swapaxes(x, 0, 1) for x in xs[:4])  # [N, L, D]
    seg = jnp.cumsum(jnp.swapaxes(xs[4], 0, 1).astype(jnp.int32), axis=1)  # [N, L]: resets
    zero = jnp.zeros((), q.dtype)
    c, e, tot, b, after, total = _per_key_decays(g, sub)
    seg_end = seg[:, -1:]
    k_end = k * jnp.where((seg == seg_end)[..., None], jnp.exp(after), zero)
    q_in = q * jnp.where((seg == 0)[..., None], jnp.exp(b), zero)
    ys = _einsum("nld,nde->nle", q_in, s)  # the state entering the chunk
    split = lambda x: x.reshape((x.shape[0], -1, sub) + x.shape[2:])
    ys = ys + jax.lax.cond(
        jnp.min(total) >= -_DECAYED_RANGE,  # every exponent of the decayed form within range
        jax.checkpoint(lambda: _intra_decayed(q, k, v, b, seg)),  # rebuilt in the backward:
        jax.checkpoint(  # residuals of the untaken branch are zeros to fill
            lambda: _intra_per_key(split(q), split(k), split(v), c, e, tot, split(seg))
        ),
    )
    decay = jnp.where(seg_end == 0, jnp.exp(total), zero)
    s = decay[..., None] * s + _einsum("nld,nle->nde", k_end, v)
    return s, jnp.swapaxes(ys, 0, 1)


def _intra_decayed(q, k, v, b, seg):
    """Inside one chunk whose log-decays sum to ``>= -_DECAYED_RANGE`` on every key:
    ``q, k, b [N, L, Dk]``, ``v [N, L, Dv]``, ``seg int[N, L]`` -> ``[N, L, Dv]``.

    The decay from ``s`` to ``t`` is ``exp(b_t) exp(-b_s)``: queries and keys
    decayed from and to the chunk start meet in one ``L x L`` matmul, as with a
    scalar decay. Every exponent is within ``[-_DECAYED_RANGE, _DECAYED_RANGE]``,
    so nothing overflows or underflows to 0."""
    steps = jnp.arange(q.shape[1])
    causal = (steps[:, None] >= steps[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    scores = _einsum("ntd,nsd->nts", q * jnp.exp(b), k * jnp.exp(-b))
    return _einsum("nts,nse->nte", jnp.where(causal, scores, jnp.zeros((), q.dtype)), v)


def _intra_per_key(qs, ks, vs, c, e, tot, segs):
    """Inside one chunk: ``qs, ks [N, n, l, Dk]``, ``vs [N, n, l, Dv]``, the decays of
    :func:`_per_key_decays`, ``segs int[N, n, l]`` resets so far -> ``[N, L, Dv]``.

    Inside a sub-chunk, the weight of key ``s`` at query ``t`` is
    ``sum_d q_td k_sd exp(c_td - c_sd)``, elementwise: a difference of two sums of
    at most ``l`` log-decays, clamped to ``<= 0``. Between sub-chunks ``j < i``, the
    decay factors into three direct sums (``s`` to the end of ``j``, the whole
    sub-chunks between, the start of ``i`` to ``t``), one batched matmul of keys
    and decayed queries (gated linear attention's secondary chunking)."""
    heads, n, sub = qs.shape[:3]
    zero = jnp.zeros((), qs.dtype)
    steps = jnp.arange(sub)
    causal = (steps[:, None] >= steps[None, :])[None, None] & (
        segs[..., :, None] == segs[..., None, :]
    )
    diff = c[..., :, None, :] - c[..., None, :, :]  # <= 0 up to rounding; not a min (its
    w = jnp.exp(jnp.where(diff > zero, zero, diff))  # gradient halves at equal arguments)
    w = jnp.where(causal[..., None], w, zero)  # [N, n, l(t), l(s), Dk]
    scores = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * w, axis=-1)
    ys = _einsum("nits,nise->nite", scores, vs)
    if n > 1:
        m = jnp.arange(n)
        i, j, mid = m[:, None, None], m[None, :, None], m[None, None, :]
        strictly = ((j < mid) & (mid < i)).astype(qs.dtype)  # the sub-chunks between j and i
        between = _einsum("ijm,nmd->nijd", strictly, tot)
        q_ij = (qs * jnp.exp(c))[:, :, None] * jnp.exp(between)[:, :, :, None]
        scores = _einsum("nijtd,njsd->nitjs", q_ij, ks * jnp.exp(e))
        mask = (m[None, :] < m[:, None])[None, :, None, :, None] & (
            segs[:, :, :, None, None] == segs[:, None, None, :, :]
        )
        ys = ys + _einsum("nitjs,njse->nite", jnp.where(mask, scores, zero), vs)
    return ys.reshape((heads, n * sub, -1))


def _chunked_per_key(q, k, v, g, reset, s0, length: int):
    """:func:`_chunked` for a per-key decay: one scan over the chunks, each chunk's
    work rebuilt in the backward (``jax.checkpoint``), so only the state entering
    every chunk is stored."""
    t = q.shape[0]
    if reset is None:
        reset = jnp.zeros(q.shape[:2], bool)
    xs = _pad_steps(length, q, k, v, g, reset)
    xs = tuple(x.reshape((-1, length) + x.shape[1:]) for x in xs)  # [C, L, N, ...]
    step = jax.checkpoint(functools.partial(_per_key_chunk, sub=_sub_chunk(length)))
    s, ys = jax.lax.scan(step, s0, xs)
    return s, ys.reshape((-1,) + ys.shape[2:])[:t]


def _to_chunks(x, length: int):
    """``[C L, N, ...] -> [C, N, L, ...]``."""
    x = x.reshape((x.shape[0] // length, length) + x.shape[1:])
    return jnp.swapaxes(x, 1, 2)


def _pad_steps(length, q, k, v, g, reset):
    """Pads ``T`` to a multiple of ``length`` with steps that change nothing
    (``k = 0``, ``log_decay = 0``, no reset)."""
    pad = -q.shape[0] % length
    if not pad:
        return q, k, v, g, reset
    zeros = lambda x: jnp.zeros((pad,) + x.shape[1:], x.dtype)
    cat = lambda x: jnp.concatenate([x, zeros(x)], axis=0)
    return cat(q), cat(k), cat(v), cat(g), cat(reset)


def _chunked(q, k, v, g, reset, s0, length: int):
    """As :func:`_recurrent`, with chunks of ``length`` steps (``length = T``: the
    parallel form)."""
    if g.shape[-1] != 1:
        return _chunked_per_key(q, k, v, g, reset, s0, length)
    t = q.shape[0]
    if reset is None:
        reset = jnp.zeros(q.shape[:2], bool)
    q, k, v, g, reset = (_to_chunks(x, length) for x in _pad_steps(length, q, k, v, g, reset))
    b = jnp.cumsum(g, axis=2)  # [C, N, L, G]: log-decay since the chunk start, <= 0
    after = _suffix_sums(g, 2)  # log-decay from each step to the chunk end
    seg = jnp.cumsum(reset.astype(jnp.int32), axis=2)  # [C, N, L]: resets so far
    seg_end = seg[:, :, -1:]
    zero = jnp.zeros((), q.dtype)

    # each chunk's own contribution to the state at its end, and the decay across it
    k_end = k * jnp.where((seg == seg_end)[..., None], jnp.exp(after), zero)
    ds = _einsum("cnld,cnle->cnde", k_end, v)  # [C, N, Dk, Dv]
    across = jnp.where(seg_end[..., None] == 0, jnp.exp(b[:, :, -1:]), zero)[:, :, 0]  # [C, N, G]

    def carry(s, xs):
        decay, d = xs
        return decay[..., None] * s + d, s

    s_last, s_in = jax.lax.scan(carry, s0, (across, ds))  # s_in [C, N, Dk, Dv]

    # the state entering the chunk, seen from every step of it
    fresh = (seg == 0)[..., None]
    q_in = q * jnp.where(fresh, jnp.exp(b), zero)
    ys = _einsum("cnld,cnde->cnle", q_in, s_in)

    ys = ys + _intra_scalar(q, k, v, g, seg)
    ys = jnp.swapaxes(ys, 1, 2)
    return s_last, ys.reshape((-1,) + ys.shape[2:])[:t]


# --------------------------------------------------------------------------- checks


def _check_qkv(q, k, v, lead: str = "T, *B, K"):
    """``lead``: the layout of the dimensions before the feature dimension."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array [{lead}, D], got {type(x).__name__}")
        _checks.check_floating(name, x)
        _checks.check_min_ndim(name, x, 3, f"[{lead}, D]")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(
            f"k: expected the shape of q {_checks.describe(q)} ([{lead}, Dk]), "
            f"got {_checks.describe(k)}"
        )
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(
            f"v: expected shape {[*q.shape[:-1], 'Dv']} ([{lead}, Dv] of q "
            f"{_checks.describe(q)}), got {_checks.describe(v)}"
        )


def _check_log_decay(log_decay, q):
    log_decay = _checks.as_array("log_decay", log_decay)
    _checks.check_floating("log_decay", log_decay)
    if tuple(log_decay.shape) not in (tuple(q.shape[:-1]), tuple(q.shape)):
        raise ValueError(
            f"log_decay: expected shape {list(q.shape[:-1])} ([T, *B, K], a decay per head) or "
            f"{list(q.shape)} ([T, *B, K, Dk], a decay per key) of q {_checks.describe(q)}, "
            f"got {_checks.describe(log_decay)}"
        )
    return log_decay


def _check_state(initial_state, q, v):
    want = (*q.shape[1:], v.shape[-1])
    initial_state = _checks.as_array("initial_state", initial_state)
    _checks.check_floating("initial_state", initial_state)
    if tuple(initial_state.shape) != want:
        raise ValueError(
            f"initial_state: expected shape {list(want)} ([*B, K, Dk, Dv] of q "
            f"{_checks.describe(q)} and v {_checks.describe(v)}), "
            f"got {_checks.describe(initial_state)}"
        )
    return initial_state


def _layout_dims(q, heads_major: bool = False):
    """``(T, batch_shape, K)`` of ``q``: ``[T, *B, K, Dk]``, or ``[*B, K, T, Dk]``
    with ``heads_major``."""
    if heads_major:
        return q.shape[-2], tuple(q.shape[:-3]), q.shape[-3]
    return q.shape[0], tuple(q.shape[1:-2]), q.shape[-2]


def _check_options(q, reset, lengths, reverse, mode, chunk, heads_major: bool = False):
    """``heads_major``: ``q`` is ``[*B, K, T, Dk]`` and ``reset`` ``[*B, T]``."""
    t, batch_shape, _ = _layout_dims(q, heads_major)
    if heads_major:
        flags_shape, flags_layout = (*batch_shape, t), "[*B, T]"
    else:
        flags_shape, flags_layout = (t, *batch_shape), "[T, *B]"
    _checks.check_choice("mode", mode, LINEAR_ATTENTION_MODES)
    chunk = _checks.check_positive_int("chunk", chunk)
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"reverse: expected a bool, got {reverse!r}")
    if lengths is not None:
        lengths = _checks.check_step_lengths(lengths, batch_shape, t, q)
    if reset is not None:
        reset = _checks.check_step_flags("reset", reset, flags_shape, flags_layout, "q", q)
    return reset, lengths, bool(reverse), chunk


# --------------------------------------------------------------------------- public


def linear_attention(
    q,
    k,
    v,
    log_decay=None,
    *,
    initial_state=None,
    reset=None,
    lengths=None,
    reverse=False,
    mode="auto",
    chunk=None,
    mesh=None,
    sequence_axis=None,
):
    """Runs ``S_t = exp(log_decay_t) ⊙ S_{t-1} + k_t v_tᵀ``, ``y_t = S_tᵀ q_t`` over ``T`` steps.

    Args:
      q: ``[T, *B, K, Dk]`` floating queries (``K`` heads).
      k: ``[T, *B, K, Dk]`` floating keys, the shape of ``q``.
      v: ``[T, *B, K, Dv]`` floating values.
      log_decay: ``[T, *B, K]`` (one decay per head: Mamba-2, RetNet),
        ``[T, *B, K, Dk]`` (one per key, scaling the rows of ``S``: gated linear
        attention), or None (no decay). Finite and ``<= 0``; positive values are
        clipped to 0.
      initial_state: optional ``[*B, K, Dk, Dv]`` state before the first step
        (zeros when None).
      reset: optional ``bool[T, *B]``: the state is emptied before step ``t``;
        in reverse a flag keeps its forward-time meaning, as in
        :func:`jaxseq.rollout`.
      lengths: optional ``int[*B]`` right padding: steps ``t >= lengths`` leave
        the state unchanged and output zeros, so the returned state is the one
        after the last valid step.
      reverse: run from the last valid step of each sequence down to step 0;
        outputs stay in time order.
      mode: ``"auto"``, ``"recurrent"``, ``"chunked"`` or ``"parallel"`` (see the
        module docstring; ``"auto"``: ``"parallel"`` for ``T <= L``, else
        ``"chunked"``).
      chunk: chunk length ``L`` of the chunked mode; None: 64, or 32 with a
        per-key decay (whose work per step grows with ``L``).
      mesh: optional ``jax.sharding.Mesh`` for sequence parallelism, with
        ``sequence_axis``, the name of one of its axes: ``q``, ``k``, ``v``,
        ``log_decay``, ``reset`` and ``ys`` are split along ``T`` over that
        axis's ``n`` devices (``T`` must be a multiple of ``n``: pad it and pass
        ``lengths``), everything else is replicated. Each device runs its
        ``T / n`` steps: its end state from empty (one product of decayed
        keys and values), the devices exchange that ``[*B, K, Dk, Dv]`` state
        and the decay across their slice each, and each runs its slice (in
        ``mode``, ``"auto"`` deciding by ``T / n``) from the state entering it;
        same values and gradients as on one device, up to rounding.
        ``lengths`` stay global step counts. Both or neither.
      sequence_axis: the mesh axis ``T`` is split over (see ``mesh``).

    Returns:
      ``(final_state [*B, K, Dk, Dv], ys [T, *B, K, Dv])`` in the result dtype of
      the inputs; arithmetic runs in at least float32. With a ``mesh``, ``ys``
      is split along ``T`` over ``sequence_axis`` and ``final_state`` replicated.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> q = k = jnp.ones((3, 1, 1))  # [T, K, Dk], no batch dims
    >>> v = jnp.ones((3, 1, 1))
    >>> log_decay = jnp.log(jnp.full((3, 1), 0.5))  # [T, K]: one decay per head
    >>> state, ys = js.recurrent.linear_attention(q, k, v, log_decay)
    >>> ys[:, 0, 0].tolist(), state.shape
    ([1.0, 1.5, 1.75], (1, 1, 1))
    >>> _, ys = js.recurrent.linear_attention(q, k, v, log_decay, reset=jnp.array([False, True, False]))
    >>> ys[:, 0, 0].tolist()
    [1.0, 1.0, 1.5]

    Split over the devices of a mesh axis (here one device; with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on a CPU, eight):

    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> state, ys = js.recurrent.linear_attention(q, k, v, log_decay, mesh=mesh, sequence_axis="seq")
    >>> ys[:, 0, 0].tolist()
    [1.0, 1.5, 1.75]
    """
    _check_qkv(q, k, v)
    if log_decay is not None:
        log_decay = _check_log_decay(log_decay, q)
    if initial_state is not None:
        initial_state = _check_state(initial_state, q, v)
    if chunk is None:
        per_key = log_decay is not None and log_decay.ndim == q.ndim
        chunk = _PER_KEY_CHUNK if per_key else _CHUNK
    reset, lengths, reverse, chunk = _check_options(q, reset, lengths, reverse, mode, chunk)
    inputs = (q, k, v, log_decay, initial_state, reset, lengths)
    if seqpar.check_mesh(mesh, sequence_axis, q.shape[0]) is not None:
        return _sharded(*inputs, mesh, sequence_axis, reverse=reverse, mode=mode, chunk=chunk)
    return _solve_checked(*inputs, reverse=reverse, mode=mode, chunk=chunk)


def _solve_checked(q, k, v, log_decay, initial_state, reset, lengths, *, reverse, mode, chunk):
    """:func:`linear_attention` on one device, its arguments checked."""
    valid = None if lengths is None else valid_steps(lengths, q.shape[0])
    return _solve(q, k, v, log_decay, initial_state, reset, valid, reverse, mode, chunk)


# outside jit, one compiled program instead of op-by-op dispatch
_solve_checked = _checks.compiled_after_checks(_solve_checked, ("reverse", "mode", "chunk"))


def _slice_decay(q, log_decay, reset, valid):
    """The decay across one device's slice, ``[*B, K, G, 1]`` (``G`` = 1 or ``Dk``)
    to scale a ``[*B, K, Dk, Dv]`` state: the exp of the sum of its valid steps'
    log-decays, 0 when a reset inside the slice empties the state."""
    zero = jnp.zeros((), q.dtype)
    if log_decay is None:
        total = jnp.zeros((*q.shape[1:-1], 1), q.dtype)
    else:
        g = log_decay if log_decay.ndim == q.ndim else log_decay[..., None]
        if valid is not None:  # padded steps: no decay, whatever they hold
            g = jnp.where(valid[..., None, None], g, zero)
        total = jnp.sum(jnp.minimum(g, zero), axis=0)
    decay = jnp.exp(total)
    live = seqpar.live_resets(reset, valid)
    if live is not None:
        decay = jnp.where(jnp.any(live, axis=0)[..., None, None], zero, decay)
    return decay[..., None]


def _end_state(q, k, v, log_decay, reset, valid, reverse):
    """The state after one device's slice from an empty one, ``[*B, K, Dk, Dv]``:
    ``sum_s (decay from s to the end) k_s v_sᵀ`` over the steps after the last reset
    in processing order. The chunked form's state update with one chunk of the
    whole slice: decays as suffix sums of log-decays (direct sums), one
    ``[Dk, T] x [T, Dv]`` product per head, no ``T x T`` or per-step states."""
    _, fk, fv, g, fr, _ = _flatten(q, k, v, log_decay, None, reset, valid, reverse)
    w = jnp.exp(_suffix_sums(g, 0))  # [T, N, G]: the decay from each step to the end
    if fr is not None:  # steps before the last reset do not reach the end
        seg = jnp.cumsum(fr.astype(jnp.int32), axis=0)
        w = jnp.where((seg == seg[-1:])[..., None], w, jnp.zeros((), w.dtype))
    s = _einsum("tnd,tne->nde", fk * w, fv)
    return s.reshape((*q.shape[1:], v.shape[-1]))


def _slice_body(q, k, v, log_decay, reset, s0, lengths, *, axis, reverse, mode, chunk):
    """One device's slice of :func:`_sharded` (inside ``shard_map``): its end state
    from empty and its decay, combined with every other slice's, then the slice
    run from the state entering it."""
    valid = seqpar.local_valid(axis, q.shape[0], lengths)
    s_end = _end_state(q, k, v, log_decay, reset, valid, reverse)
    cut = seqpar.reverse_cut(reset, valid, reverse)
    if cut is not None:
        s_end = jnp.where(cut[..., None, None, None], jnp.zeros((), s_end.dtype), s_end)
    decays, ends = seqpar.gather(axis, _slice_decay(q, log_decay, reset, valid), s_end)
    s_in, final = seqpar.entering(axis, decays, ends, s0, reverse)
    _, ys = _solve(q, k, v, log_decay, s_in, reset, valid, reverse, mode, chunk)
    return final, ys


def _sharded(q, k, v, log_decay, s0, reset, lengths, mesh, axis, *, reverse, mode, chunk):
    """:func:`linear_attention` with ``T`` split over the mesh axis ``axis``."""
    inputs = (q, k, v, log_decay, s0)
    out_dtype = jnp.result_type(*(x for x in inputs if x is not None))
    acc = acc_dtype(*(x for x in inputs if x is not None))
    if s0 is None:
        s0 = jnp.zeros((*q.shape[1:], v.shape[-1]), acc)
    q, k, v, s0 = (x.astype(acc) for x in (q, k, v, s0))
    log_decay = None if log_decay is None else log_decay.astype(acc)
    body = functools.partial(_slice_body, axis=axis, reverse=reverse, mode=mode, chunk=chunk)
    sharded = (True, True, True, True, True, False, False)
    run = seqpar.shard(body, mesh, axis, sharded, (False, True))
    state, ys = run(q, k, v, log_decay, reset, s0, lengths)
    return state.astype(out_dtype), ys.astype(out_dtype)


def _flatten(q, k, v, log_decay, initial_state, reset, valid, reverse):
    """Everything in the accumulation dtype, heads flattened (``N = prod(B) K``),
    padding and resets applied, in processing order."""
    t, heads = q.shape[0], math.prod(q.shape[1:-1])
    batch_shape, nk, dk = q.shape[1:-2], q.shape[-2], q.shape[-1]
    per_key = log_decay is not None and log_decay.shape == q.shape
    acc = acc_dtype(*(x for x in (q, k, v, log_decay, initial_state) if x is not None))
    flat = lambda x, d: x.astype(acc).reshape((t, heads, d))
    per_head = lambda m: jnp.broadcast_to(m[..., None], (t, *batch_shape, nk)).reshape((t, heads))
    q, k, v = flat(q, q.shape[-1]), flat(k, k.shape[-1]), flat(v, v.shape[-1])
    if log_decay is None:
        g = jnp.zeros((t, heads, 1), acc)
    else:
        g = flat(log_decay, dk if per_key else 1)
    if initial_state is None:
        s0 = jnp.zeros((heads, dk, v.shape[-1]), acc)
    else:
        s0 = initial_state.astype(acc).reshape((heads, dk, v.shape[-1]))
    reset = processing_resets(reset, valid, reverse)
    reset = None if reset is None else per_head(reset)
    zero = jnp.zeros((), acc)
    if valid is not None:  # padded steps: nothing added, nothing decayed
        keep = per_head(valid)[..., None]
        q, k, v = (jnp.where(keep, x, zero) for x in (q, k, v))
        g = jnp.where(keep, g, zero)
    g = jnp.minimum(g, zero)
    if reverse:
        q, k, v, g = (jnp.flip(x, 0) for x in (q, k, v, g))
        reset = None if reset is None else jnp.flip(reset, 0)
    return q, k, v, g, reset, s0


def _solve(q, k, v, log_decay, initial_state, reset, valid, reverse, mode, chunk):
    t = q.shape[0]
    state_shape = (*q.shape[1:], v.shape[-1])
    out_dtype = jnp.result_type(*(x for x in (q, k, v, log_decay, initial_state) if x is not None))
    fq, fk, fv, g, fr, s0 = _flatten(q, k, v, log_decay, initial_state, reset, valid, reverse)
    if t == 0:
        return s0.reshape(state_shape).astype(out_dtype), jnp.zeros(v.shape, out_dtype)
    if mode == "auto":
        mode = "parallel" if t <= chunk else "chunked"
    if mode == "recurrent":
        s, ys = _recurrent(fq, fk, fv, g, fr, s0)
    else:
        s, ys = _chunked(fq, fk, fv, g, fr, s0, t if mode == "parallel" else min(chunk, t))
    if reverse:
        ys = jnp.flip(ys, 0)
    ys = ys.reshape(v.shape)
    if valid is not None:
        ys = jnp.where(valid[..., None, None], ys, jnp.zeros((), ys.dtype))
    return s.reshape(state_shape).astype(out_dtype), ys.astype(out_dtype)
