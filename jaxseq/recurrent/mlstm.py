"""xLSTM's mLSTM (Beck et al. 2024): a matrix memory with exponential gating.

Per head, with ``K`` heads, keys and queries of size ``Dk`` and values of size
``Dv``, the stabilised recurrence of the paper, time-major::

    log f_t = log sigmoid(f_pre_t)          (forget_gate="sigmoid", the default)
            = f_pre_t                       (forget_gate="exp")
    log i_t = i_pre_t                       exponential input gate
    m_t = max(log f_t + m_{t-1}, log i_t)   stabiliser
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(log i_t - m_t) k_t v_tᵀ    [Dk, Dv]
    n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(log i_t - m_t) k_t         [Dk]
    h_t = C_tᵀ q'_t / (max(|n_tᵀ q'_t|, exp(-m_t)) + eps),   q'_t = q_t / sqrt(Dk)

``C`` is stored ``[Dk, Dv]`` (``k vᵀ``), as ``S`` of
:func:`jaxseq.recurrent.linear_attention`; the state starts (and a reset starts
it again) from ``C = 0``, ``n = 0``, ``m = 0``. The scaling of ``q``, ``eps =
1e-6`` (added after the max), ``m_0 = 0`` and the log-sigmoid forget gate are
those of the ``mlstm_kernels`` library, whose kernels give the same outputs.
``m`` only stabilises: ``C exp(m)`` and ``n exp(m)`` are the unscaled memory and
normaliser, and ``h_t`` depends on ``m_t`` only through ``eps``.

Modes of :func:`mlstm_recurrence` (the same values and gradients up to rounding,
all differentiated by plain autodiff):

* ``"recurrent"``: one ``lax.scan`` over the steps (the generation form).
* ``"chunked"``: chunks of ``L = chunk`` steps (``T`` need not be a multiple).
  Inside a chunk, the ``L x L`` log-weights ``log i_s + log f_{s+1} + ... + log
  f_t`` (differences of the log forget gates summed from the chunk start, as
  ``mlstm_kernels`` forms them: the chunk keeps those sums short), each row
  stabilised by its own maximum (which is ``m_t``), so every ``exp`` is of a
  number ``<= 0``; the chunk's contribution to the state at its end as one
  matmul per chunk for all chunks at once; across chunks a scan over ``(C, n,
  m)`` that only rescales and adds. It stores one state per chunk, never one
  per step. Sums along a chunk are matmuls with triangular 0/1 matrices.
* ``"parallel"``: the chunked form with one chunk of ``T`` steps (memory ``T^2``).
* ``"auto"``: ``"parallel"`` when ``T <= chunk``, ``"chunked"`` otherwise.

Arithmetic runs in float32 (float64 for float64 inputs) whatever the input
dtype. ``exp(-m_t)`` is capped at ``exp(80)`` in float32 (``exp(700)`` in
float64), so a run whose every gate is closed (``m_t < -80``) gives outputs near 0
with finite gradients instead of ``0 * inf``.

``reset``, ``lengths`` and ``reverse`` as for
:func:`jaxseq.recurrent.linear_attention`: a reset step starts from the empty
state; padded steps (``t >= lengths``) leave the state unchanged and output
zeros, and their inputs, NaN or inf, reach no arithmetic; ``reverse=True``
runs each sequence's valid part backwards.

:class:`MLSTM` is the mLSTM layer core as a cell: ``q, k, v``, the gate
pre-activations per head and an output gate from the input, ``y_t = sigmoid(o_t)
⊙ h_t`` (heads concatenated); its rollout is :func:`mlstm_recurrence`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import acc_dtype, add_bias, matmul_f32
from jaxseq.recurrent import _sequence_parallel as seqpar
from jaxseq.recurrent.cells import _CellBase
from jaxseq.recurrent.linear_attention import (
    LINEAR_ATTENTION_MODES,
    _check_options,
    _check_qkv,
    _layout_dims,
    _to_chunks,
)
from jaxseq.recurrent.minimal import _StepView
from jaxseq.recurrent.rollouts import RolloutOptions, run
from jaxseq.recurrent.sequence import Sequence, compute_dtype, processing_resets, valid_steps

__all__ = [
    "MLSTM",
    "MLSTMParams",
    "MLSTMState",
    "mlstm_recurrence",
]

MLSTM_MODES = LINEAR_ATTENTION_MODES
LAYOUTS = ("time_major", "heads_major")
FORGET_GATES = ("sigmoid", "exp")
_HIGHEST = jax.lax.Precision.HIGHEST
_UNROLL_CHUNKS = 16  # the chunked mode's loop across at most this many chunks is unrolled


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


class MLSTMParams(NamedTuple):
    """mLSTM weights, blocks q, k, v, o (``H`` each) and i, f (``K`` each):
    ``w_ih [D, 4H + 2K]``, ``b [4H + 2K]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.recurrent.MLSTM(8, num_heads=2).init(jax.random.key(0), 3)]
    [(3, 36), (36,)]
    """

    w_ih: jax.Array  # [D, 4H + 2K], blocks q, k, v, o, i, f
    b: jax.Array  # [4H + 2K]


class MLSTMState(NamedTuple):
    """The mLSTM state per head, also :class:`MLSTM`'s carry: memory ``c [*B, K, Dk, Dv]``,
    normaliser ``n [*B, K, Dk]``, stabiliser ``m [*B, K]`` (log scale of ``c`` and ``n``).

    >>> import jaxseq as js
    >>> carry = js.recurrent.MLSTM(8, num_heads=2).initial_carry((3,))
    >>> carry.c.shape, carry.n.shape, carry.m.shape
    ((3, 2, 4, 4), (3, 2, 4), (3, 2))
    """

    c: jax.Array  # [*B, K, Dk, Dv]
    n: jax.Array  # [*B, K, Dk]
    m: jax.Array  # [*B, K]


# --------------------------------------------------------------------------- numerics


def _floor(m):
    """``exp(-m)``, capped so that it stays finite (and its gradient too)."""
    cap = 700.0 if m.dtype == jnp.float64 else 80.0
    return jnp.exp(jnp.minimum(-m, cap))


def _log_forget(f_pre, forget_gate: str):
    return jax.nn.log_sigmoid(f_pre) if forget_gate == "sigmoid" else f_pre


def _cast_state(state: MLSTMState, dtype) -> MLSTMState:
    """The state in ``dtype``, ``c`` and ``n`` rescaled to the rounded ``m`` (so a
    bfloat16 ``m`` stays the log scale of what it scales)."""
    c, n, m = state
    if jnp.dtype(dtype) == m.dtype:
        return state
    m_r = m.astype(dtype)
    scale = jnp.exp(m - m_r.astype(m.dtype))
    return MLSTMState(
        (c * scale[..., None, None]).astype(dtype), (n * scale[..., None]).astype(dtype), m_r
    )


def _update(state: MLSTMState, q, k, v, li, lf, eps: float):
    """One step for every head: ``q, k: [N, Dk]`` (``q`` unscaled: scaled by
    ``1/sqrt(Dk)`` here), ``v: [N, Dv]``, ``li, lf: [N]`` log gates -> ``(state, h [N, Dv])``."""
    c, n, m = state
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    m_new = jnp.maximum(lf + m, li)
    decay = jnp.exp(lf + m - m_new)
    gain = jnp.exp(li - m_new)
    c = decay[:, None, None] * c + gain[:, None, None] * (k[:, :, None] * v[:, None, :])
    n = decay[:, None] * n + gain[:, None] * k
    num = _einsum("nd,nde->ne", q, c)
    den = jnp.maximum(jnp.abs(jnp.sum(q * n, axis=-1)), _floor(m_new)) + eps
    return MLSTMState(c, n, m_new), num / den[:, None]


# --------------------------------------------------------------------------- recurrent


def _recurrent(q, k, v, li, lf, keep, reset, state, eps: float):
    """``q, k: [T, N, Dk]`` (``q`` unscaled), ``v: [T, N, Dv]``, ``li, lf: [T, N]``,
    ``keep, reset: bool[T, N]`` or None -> ``(state, h [T, N, Dv])``."""

    def body(s, xs):
        q_t, k_t, v_t, i_t, f_t, keep_t, r_t = xs
        prev = s
        if r_t is not None:
            s = MLSTMState(*(jnp.where(_expand(r_t, x), jnp.zeros((), x.dtype), x) for x in s))
        new, h = _update(s, q_t, k_t, v_t, i_t, f_t, eps)
        if keep_t is not None:
            new = MLSTMState(*(jnp.where(_expand(keep_t, a), a, b) for a, b in zip(new, prev)))
        return new, h

    return jax.lax.scan(body, state, (q, k, v, li, lf, keep, reset))


def _expand(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


# --------------------------------------------------------------------------- chunked


def _pad(length: int, axis: int, q, k, v, li, lf, keep, reset):
    """Pads ``T`` (the ``axis`` of ``[T, N, ...]`` or ``[N, T, ...]``) to a multiple of
    ``length`` with steps that change nothing (``keep`` False)."""
    pad = -q.shape[axis] % length
    if not pad:
        return q, k, v, li, lf, keep, reset
    if keep is None:
        keep = jnp.ones(q.shape[:2], bool)

    def cat(x):
        shape = list(x.shape)
        shape[axis] = pad
        return jnp.concatenate([x, jnp.zeros(shape, x.dtype)], axis)

    reset = None if reset is None else cat(reset)
    return cat(q), cat(k), cat(v), cat(li), cat(lf), cat(keep), reset


def _chunk_states(axis: int, k, v, li, after, keep, seg, start, state):
    """The last state and the state entering every chunk. Chunks along ``axis`` of the
    two leading dims (``[C, N, ...]`` or ``[N, C, ...]``): ``k: [., ., L, Dk]``, ``li,
    start: [., ., L]``, ``after: [., ., L]`` the log forget gates summed from step ``s +
    1`` to the chunk end, ``keep: bool[., ., L]``, ``seg: int[., ., L]`` resets so far in
    the chunk or None; the entering states ``c [., ., Dk, Dv], n [., ., Dk], m [., .]``."""
    neg = jnp.finfo(k.dtype).min
    last = None if seg is None else seg == seg[..., -1:]  # steps that reach the chunk end
    src = keep if last is None else (last if keep is None else last & keep)
    a = after + li  # log-weight of step s in the chunk-end state
    if src is not None:
        a = jnp.where(src, a, neg)
    a_max = jnp.max(a, axis=-1)
    w = jnp.exp(a - a_max[..., None])
    kw = k * w[..., None]
    dc = _einsum("xyld,xyle->xyde", kw, v)  # each chunk's own part, scaled by exp(-a_max)
    dn = jnp.sum(kw, axis=2)
    through = None if seg is None else seg[..., -1] == 0  # the entering state reaches the end
    decay = start[..., -1]  # log f summed over the chunk (over its last segment)

    def body(s, xs):
        c, n, m = s
        dc_i, dn_i, a_i, g_i, th_i = xs
        base = g_i + m if th_i is None else jnp.where(th_i, g_i + m, g_i)
        m_new = jnp.maximum(base, a_i)
        old = jnp.exp(base - m_new)
        if th_i is not None:
            old = jnp.where(th_i, old, jnp.zeros((), old.dtype))
        new = jnp.exp(a_i - m_new)
        c_new = old[:, None, None] * c + new[:, None, None] * dc_i
        n_new = old[:, None] * n + new[:, None] * dn_i
        return MLSTMState(c_new, n_new, m_new), s

    xs: tuple = (dc, dn, a_max, decay, through)
    chunks = dc.shape[axis]
    if through is None and chunks <= _UNROLL_CHUNKS:  # no resets, few chunks
        return _states_at_once(axis, dc, dn, a_max, decay, state)
    if chunks <= _UNROLL_CHUNKS:
        # few chunks: straight-line code (no loop, no per-step copies of the carried state,
        # XLA fuses across the steps), the entering states stacked along the chunk axis
        entering = []
        for i in range(chunks):
            xs_i = tuple(None if x is None else jax.lax.index_in_dim(x, i, axis, False) for x in xs)
            state, prev = body(state, xs_i)
            entering.append(prev)
        return state, MLSTMState(*(jnp.stack(parts, axis) for parts in zip(*entering)))
    xs = tuple(None if x is None else jnp.moveaxis(x, axis, 0) for x in xs)
    state, entering = jax.lax.scan(body, state, xs)
    return state, MLSTMState(*(jnp.moveaxis(x, 0, axis) for x in entering))


def _states_at_once(axis: int, dc, dn, a_max, decay, state):
    """:func:`_chunk_states`' recurrence across chunks without resets, solved at once:
    after chunk j, ``m_j = max(m_0 + g_0 + ... + g_j, max_{i <= j} a_i + g_{i+1} + ... +
    g_j)`` (its max-plus unrolling) and ``c_j = sum_{i <= j} exp(a_i + g_{i+1} + ... + g_j
    - m_j) dc_i + exp(m_0 + g_0 + ... + g_j - m_j) c_0`` (``n`` alike). Each exponent is a
    direct sum of its own log forget gates (no difference of running sums, which lose
    precision as they grow) and at most 0. Two small products over the chunk axis
    replace one sequential state update per chunk."""
    c0, n0, m0 = state
    count = dc.shape[axis]
    g = jnp.moveaxis(decay, axis, -1)  # [N, C]
    a = jnp.moveaxis(a_max, axis, -1)
    idx = jnp.arange(count)
    upto = idx[None, :] <= idx[:, None]  # [j, i]: i <= j
    between = (idx[None, None, :] > idx[None, :, None]) & (idx[None, None, :] <= idx[:, None, None])
    span = _einsum("nk,jik->nji", g, between.astype(g.dtype))  # g_{i+1} + ... + g_j
    total = _einsum("nk,jk->nj", g, upto.astype(g.dtype)) + m0[..., None]  # m_0 + g_0..g_j
    terms = jnp.where(upto, a[:, None, :] + span, -jnp.inf)  # [N, j, i]
    m = jnp.maximum(total, jnp.max(terms, axis=-1))  # [N, C]: m after chunk j
    w = jnp.exp(terms - m[..., None])
    w0 = jnp.exp(total - m)
    # the state entering chunk j is the one after chunk j - 1: rows shifted down by one
    w_in = jnp.concatenate([jnp.zeros_like(w[:, :1]), w[:, :-1]], axis=1)
    w0_in = jnp.concatenate([jnp.ones_like(w0[:, :1]), w0[:, :-1]], axis=1)
    m_in = jnp.concatenate([m0[:, None], m[:, :-1]], axis=1)
    x = "inde" if axis == 0 else "nide"
    y = "jnde" if axis == 0 else "njde"
    c_in = _einsum(f"nji,{x}->{y}", w_in, dc)
    n_in = _einsum(f"nji,{x[:-1]}->{y[:-1]}", w_in, dn)
    w0_b = jnp.moveaxis(w0_in, 1, axis)
    c_in = c_in + w0_b[..., None, None] * jnp.expand_dims(c0, axis)
    n_in = n_in + w0_b[..., None] * jnp.expand_dims(n0, axis)
    last_c = _einsum(f"ni,{x}->nde", w[:, -1], dc) + w0[:, -1, None, None] * c0
    last_n = _einsum(f"ni,{x[:-1]}->nd", w[:, -1], dn) + w0[:, -1, None] * n0
    last = MLSTMState(last_c, last_n, m[:, -1])
    return last, MLSTMState(c_in, n_in, jnp.moveaxis(m_in, 1, axis))


@jax.custom_jvp
def _entering_part(q, inter, c_in, n_in):
    """The entering state's part of every step's numerator and denominator, ``(q ⊙
    inter) · c_in`` and ``(q ⊙ inter) · n_in``: ``q: [., ., L, Dk]``, ``inter: [., .,
    L]``, ``c_in: [., ., Dk, Dv]``, ``n_in: [., ., Dk]``.

    Undifferentiated, the products' rows are scaled afterwards, so ``q ⊙ inter`` is
    never written out (the forward alone 0.91-0.97x at T=1024 on CPU, ``benchmarks/README.md``).
    Differentiated, the rule below computes the plain formula and its tangent: the
    reverse pass keeps ``q ⊙ inter`` as before (scaling afterwards made it 1.07x)."""
    return (
        _einsum("xyld,xyde->xyle", q, c_in) * inter[..., None],
        _einsum("xyld,xyd->xyl", q, n_in) * inter,
    )


@_entering_part.defjvp
def _entering_part_jvp(primals, tangents):
    q, inter, c_in, n_in = primals
    dq, dinter, dc, dn = tangents
    q_in = q * inter[..., None]
    dq_in = dq * inter[..., None] + q * dinter[..., None]
    out = (_einsum("xyld,xyde->xyle", q_in, c_in), _einsum("xyld,xyd->xyl", q_in, n_in))
    tangent = (
        _einsum("xyld,xyde->xyle", dq_in, c_in) + _einsum("xyld,xyde->xyle", q_in, dc),
        _einsum("xyld,xyd->xyl", dq_in, n_in) + _einsum("xyld,xyd->xyl", q_in, dn),
    )
    return out, tangent


def _chunked(q, k, v, li, lf, keep, reset, state, length: int, eps: float, axis: int = 0):
    """As :func:`_recurrent`, with chunks of ``length`` steps (``length = T``: parallel).
    ``axis`` is the time axis: 0 (``q: [T, N, Dk]``, ``li: [T, N]``, ... -> ``h [T, N,
    Dv]``, chunks ``[C, N, L, ...]``) or 1 (heads first, ``[N, T, ...]``, chunks ``[N, C,
    L, ...]``: a reshape, no transpose)."""
    t = q.shape[axis]

    def to_chunks(x):
        if axis == 1:
            return x.reshape((x.shape[0], -1, length) + x.shape[2:])
        return _to_chunks(x, length)

    q, k, v, li, lf, keep, reset = (
        None if x is None else to_chunks(x)
        for x in _pad(length, axis, q, k, v, li, lf, keep, reset)
    )
    steps = jnp.arange(length)
    causal = steps[:, None] >= steps[None, :]  # [t, s]: s <= t
    # sums along the chunk as matmuls with triangular 0/1 matrices (a cumulative sum is a
    # reduce-window on CPU, many times slower): each a direct sum of its own terms
    sums = lambda x, mask: _einsum("xyu,ut->xyt", x, mask.astype(x.dtype))
    b = sums(lf, causal.T)  # log f summed from the chunk start to t (inclusive)
    after = sums(lf, ~causal.T)  # from s + 1 to the chunk end
    same = causal[None, None]  # [1, 1, L, L]
    if reset is None:
        seg, start = None, b  # log f summed from the segment start: the chunk's
    else:
        seg = sums(reset.astype(lf.dtype), causal.T).astype(jnp.int32)  # resets so far
        same = same & (seg[..., :, None] == seg[..., None, :])
        start = jnp.sum(jnp.where(same, lf[..., None, :], jnp.zeros((), lf.dtype)), axis=-1)
    last, (c_in, n_in, m_in) = _chunk_states(axis, k, v, li, after, keep, seg, start, state)

    # log-weight of step s at step t: log i_s + log f_{s+1} + ... + log f_t = b_t - b_s +
    # log i_s, a difference of two sums from the chunk start (mlstm_kernels' form; the
    # chunk keeps them short)
    # (log_w[t, s] = b_t + u[t, s]: the row's max and the stabilised weights from u directly)
    neg = jnp.finfo(q.dtype).min
    if keep is None and seg is None:
        # every step reaches every later one: the mask is one [L, L] matrix added (finite,
        # so no inf - inf), not a select over [., ., L, L] written out before its two uses
        u = (li - b)[..., None, :] + jnp.where(same, jnp.zeros((), q.dtype), neg)
    else:
        pairs = same if keep is None else same & keep[..., None, :]  # step s reaches step t
        u = jnp.where(pairs, (li - b)[..., None, :], neg)  # [., ., L, L]
    entering = start + m_in[..., None]  # log-weight of the entering state at step t
    if seg is not None:
        entering = jnp.where(seg == 0, entering, start)  # after a reset: the empty state, m = 0
    m = jnp.maximum(entering, b + jnp.max(u, axis=-1))  # [., ., L]: m_t of the recurrence
    # q's 1/sqrt(Dk) in the exponents: no pass over q of its own
    log_scale = jnp.asarray(-0.5 * math.log(q.shape[-1]), q.dtype)
    scores = _einsum("xytd,xysd->xyts", q, k) * jnp.exp(u + (b - m + log_scale)[..., None])
    inter = jnp.exp(entering - m + log_scale)
    if seg is not None:
        inter = jnp.where(seg == 0, inter, jnp.zeros((), inter.dtype))
    num_in, den_in = _entering_part(q, inter, c_in, n_in)
    num = num_in + _einsum("xyts,xyse->xyte", scores, v)
    den = den_in + jnp.sum(scores, axis=-1)
    h = num / (jnp.maximum(jnp.abs(den), _floor(m)) + eps)[..., None]
    if axis == 1:
        return last, h.reshape((h.shape[0], -1, h.shape[-1]))[:, :t]
    h = jnp.swapaxes(h, 1, 2)  # [C, L, N, Dv]
    return last, h.reshape((-1,) + h.shape[2:])[:t]


# --------------------------------------------------------------------------- checks


def _check_number(name: str, value, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < math.inf:
        raise ValueError(f"{name}: expected a finite number >= {low:g}, got {value!r}")
    return float(value)


def _check_gates(i_pre, f_pre, q, lead: str = "T, *B, K"):
    out = []
    for name, x in (("i_pre", i_pre), ("f_pre", f_pre)):
        x = _checks.as_array(name, x)
        _checks.check_floating(name, x)
        if tuple(x.shape) != tuple(q.shape[:-1]):
            raise ValueError(
                f"{name}: expected shape {list(q.shape[:-1])} ([{lead}], one gate per head, "
                f"of q {_checks.describe(q)}), got {_checks.describe(x)}"
            )
        out.append(x)
    return out


def _check_state(initial_state, q, v, heads_major: bool = False) -> MLSTMState:
    if not isinstance(initial_state, tuple) or len(initial_state) != 3:
        raise TypeError(
            f"initial_state: expected an MLSTMState (c, n, m), got {type(initial_state).__name__}"
        )
    _, batch_shape, nk = _layout_dims(q, heads_major)
    lead = (*batch_shape, nk)
    wants = (
        ("c", (*lead, q.shape[-1], v.shape[-1]), "[*B, K, Dk, Dv]"),
        ("n", (*lead, q.shape[-1]), "[*B, K, Dk]"),
        ("m", lead, "[*B, K]"),
    )
    out = []
    for x, (field, want, layout) in zip(initial_state, wants):
        name = f"initial_state.{field}"
        x = _checks.as_array(name, x)
        _checks.check_floating(name, x)
        if tuple(x.shape) != want:
            raise ValueError(
                f"{name}: expected shape {list(want)} ({layout} of q {_checks.describe(q)} and "
                f"v {_checks.describe(v)}), got {_checks.describe(x)}"
            )
        out.append(x)
    return MLSTMState(*out)


# --------------------------------------------------------------------------- public


def mlstm_recurrence(
    q,
    k,
    v,
    i_pre,
    f_pre,
    *,
    initial_state=None,
    reset=None,
    lengths=None,
    reverse=False,
    mode="auto",
    chunk=64,
    forget_gate="sigmoid",
    eps=1e-6,
    layout="time_major",
):
    """Runs the stabilised mLSTM recurrence (see the module docstring) over ``T`` steps.

    Args:
      q: ``[T, *B, K, Dk]`` floating queries (``K`` heads); scaled by ``1/sqrt(Dk)``
        inside.
      k: ``[T, *B, K, Dk]`` floating keys, the shape of ``q``.
      v: ``[T, *B, K, Dv]`` floating values.
      i_pre: ``[T, *B, K]`` input-gate pre-activations: ``log i_t`` (exponential gate).
      f_pre: ``[T, *B, K]`` forget-gate pre-activations: ``log f_t = log sigmoid(f_pre)``
        (``forget_gate="exp"``: ``log f_t = f_pre``).
      initial_state: optional :class:`MLSTMState` ``(c [*B, K, Dk, Dv], n [*B, K, Dk],
        m [*B, K])`` before the first step (zeros when None).
      reset: optional ``bool[T, *B]``: the state is emptied (``c = 0, n = 0, m = 0``)
        before step ``t``; in reverse a flag keeps its forward-time meaning.
      lengths: optional ``int[*B]`` right padding: steps ``t >= lengths`` leave the
        state unchanged and output zeros.
      reverse: run from the last valid step of each sequence down to step 0;
        outputs stay in time order.
      mode: ``"auto"``, ``"recurrent"``, ``"chunked"`` or ``"parallel"`` (see the module).
      chunk: chunk length ``L`` of the chunked mode.
      forget_gate: ``"sigmoid"`` (default) or ``"exp"``.
      eps: added to the normaliser's denominator (default ``1e-6``).
      layout: ``"time_major"`` (default: the shapes above) or ``"heads_major"``:
        ``q, k: [*B, K, T, Dk]``, ``v: [*B, K, T, Dv]``, ``i_pre, f_pre: [*B, K, T]``,
        ``reset: bool[*B, T]``, ``h [*B, K, T, Dv]`` (``lengths`` and the state as
        above): the layout of ``mlstm_kernels`` and flash-linear-attention, in which
        the chunked mode's chunks are a reshape (time-major inputs are transposed
        to it inside, and its outputs back).

    Returns:
      ``(final_state, h [T, *B, K, Dv])``: the :class:`MLSTMState` after the last
      (valid) step and the normalised outputs (before any output gate), in the
      result dtype of the inputs; arithmetic runs in at least float32.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> q = k = jnp.ones((3, 1, 1))  # [T, K, Dk], no batch dims
    >>> v = jnp.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)  # [T, K, Dv]
    >>> i_pre = jnp.zeros((3, 1))  # i = 1
    >>> f_pre = jnp.full((3, 1), 30.0)  # f = 1: h_t is the running mean of v
    >>> state, h = js.recurrent.mlstm_recurrence(q, k, v, i_pre, f_pre)
    >>> [round(x, 4) for x in h[:, 0, 0].tolist()], state.c.shape
    ([1.0, 1.5, 2.0], (1, 1, 1))
    >>> heads_major = [jnp.moveaxis(x, 0, 1) for x in (q, k, v, i_pre, f_pre)]  # [K, T, ...]
    >>> _, h_hm = js.recurrent.mlstm_recurrence(*heads_major, layout="heads_major")
    >>> h_hm.shape, bool(jnp.allclose(h_hm[0], h[:, 0]))
    ((1, 3, 1), True)
    >>> _, h = js.recurrent.mlstm_recurrence(q, k, v, i_pre, f_pre, reset=jnp.array([False, False, True]))
    >>> [round(x, 4) for x in h[:, 0, 0].tolist()]
    [1.0, 1.5, 3.0]
    """
    _checks.check_choice("layout", layout, LAYOUTS)
    heads_major = layout == "heads_major"
    lead = "*B, K, T" if heads_major else "T, *B, K"
    _check_qkv(q, k, v, lead)
    i_pre, f_pre = _check_gates(i_pre, f_pre, q, lead)
    if initial_state is not None:
        initial_state = _check_state(initial_state, q, v, heads_major)
    _checks.check_choice("forget_gate", forget_gate, FORGET_GATES)
    eps = _check_number("eps", eps, 0.0)
    reset, lengths, reverse, chunk = _check_options(
        q, reset, lengths, reverse, mode, chunk, heads_major
    )
    if heads_major and reset is not None:
        reset = jnp.moveaxis(reset, -1, 0)  # [T, *B], as solve takes it
    args = (q, k, v, i_pre, f_pre, initial_state, reset, lengths)
    options = dict(mode=mode, chunk=chunk, forget_gate=forget_gate, eps=eps)
    return _solve_checked(*args, reverse=reverse, heads_major=heads_major, **options)


def _solve_checked(q, k, v, i_pre, f_pre, initial_state, reset, lengths, **options):
    """:func:`mlstm_recurrence` on checked arguments (``options``: :func:`solve`'s)."""
    t, _, _ = _layout_dims(q, options["heads_major"])
    valid = None if lengths is None else valid_steps(lengths, t)
    return solve(q, k, v, i_pre, f_pre, initial_state, reset, valid, **options)


# outside jit, one compiled program instead of op-by-op dispatch
_solve_checked = _checks.compiled_after_checks(
    _solve_checked, ("reverse", "heads_major", "mode", "chunk", "forget_gate", "eps")
)


def _flatten(q, k, v, i_pre, f_pre, state, reset, valid, reverse, forget_gate, heads_major):
    """Everything in the accumulation dtype, heads flattened (``N = prod(B) K``), padded
    steps selected away, in processing order: ``[T, N, ...]`` time-major, ``[N, T, ...]``
    heads-major (``reset, valid: bool[T, *B]`` either way)."""
    t, batch_shape, nk = _layout_dims(q, heads_major)
    heads, dk, dv = math.prod(batch_shape) * nk, q.shape[-1], v.shape[-1]
    lead = (heads, t) if heads_major else (t, heads)
    acc = acc_dtype(q, k, v, i_pre, f_pre, *(() if state is None else state))
    flat = lambda x, *d: x.astype(acc).reshape((*lead, *d))

    def per_head(m):  # bool[T, *B] -> [T, N] or [N, T]
        if heads_major:
            m = jnp.moveaxis(m, 0, -1)[..., None, :]  # [*B, 1, T]
            return jnp.broadcast_to(m, (*batch_shape, nk, t)).reshape(lead)
        return jnp.broadcast_to(m[..., None], (t, *batch_shape, nk)).reshape(lead)

    q, k, v, li, fp = flat(q, dk), flat(k, dk), flat(v, dv), flat(i_pre), flat(f_pre)
    keep = None if valid is None else per_head(valid)
    zero = jnp.zeros((), acc)
    if keep is not None:  # padded steps: whatever they hold reaches no arithmetic
        q, k, v = (jnp.where(keep[..., None], x, zero) for x in (q, k, v))
        li, fp = (jnp.where(keep, x, zero) for x in (li, fp))
    lf = _log_forget(fp, forget_gate)
    if keep is not None:
        lf = jnp.where(keep, lf, zero)
    if state is None:
        state = MLSTMState(
            jnp.zeros((heads, dk, dv), acc), jnp.zeros((heads, dk), acc), jnp.zeros((heads,), acc)
        )
    else:
        first = len(batch_shape) + 1  # [*B, K] first, then the state's own dims
        state = MLSTMState(*(x.astype(acc).reshape((heads, *x.shape[first:])) for x in state))
    reset = processing_resets(reset, valid, reverse)
    reset = None if reset is None else per_head(reset)
    xs = (q, k, v, li, lf, keep, reset)
    if reverse:
        xs = tuple(None if x is None else jnp.flip(x, int(heads_major)) for x in xs)
    return xs, state


def solve(
    q,
    k,
    v,
    i_pre,
    f_pre,
    initial_state,
    reset,
    valid,
    *,
    reverse=False,
    mode="auto",
    chunk=64,
    forget_gate="sigmoid",
    eps=1e-6,
    heads_major=False,
):
    """:func:`mlstm_recurrence` on checked inputs, with the padding mask ``valid:
    bool[T, *B]`` (or None) instead of ``lengths`` and ``reset: bool[T, *B]`` whatever
    the layout; nothing is checked again."""
    t, batch_shape, nk = _layout_dims(q, heads_major)
    lead = (*batch_shape, nk)
    dk, dv = q.shape[-1], v.shape[-1]
    out_dtype = jnp.result_type(
        q, k, v, i_pre, f_pre, *(() if initial_state is None else initial_state)
    )
    xs, state = _flatten(
        q, k, v, i_pre, f_pre, initial_state, reset, valid, reverse, forget_gate, heads_major
    )
    swap = lambda xs: tuple(None if x is None else jnp.swapaxes(x, 0, 1) for x in xs)
    if t == 0:
        h, h_heads_first = jnp.zeros((0, state.c.shape[0], dv), state.c.dtype), False
    elif mode == "recurrent":  # a scan over steps: time first
        state, h = _recurrent(*(swap(xs) if heads_major else xs), state, eps)
        h_heads_first = False
    else:  # in the inputs' layout
        parallel = mode == "parallel" or (mode == "auto" and t <= chunk)
        length = t if parallel else min(chunk, t)
        state, h = _chunked(*xs, state, length, eps, axis=int(heads_major))
        h_heads_first = heads_major
    if reverse:  # back to time order
        h = jnp.flip(h, int(h_heads_first))
    if h_heads_first != heads_major:
        h = jnp.swapaxes(h, 0, 1)
    h = h.reshape(v.shape)
    if valid is not None:
        mask = (
            jnp.moveaxis(valid, 0, -1)[..., None, :, None]
            if heads_major
            else valid[..., None, None]
        )
        h = jnp.where(mask, h, jnp.zeros((), h.dtype))
    state = MLSTMState(
        state.c.reshape((*lead, dk, dv)), state.n.reshape((*lead, dk)), state.m.reshape(lead)
    )
    return _cast_state(state, out_dtype), h.astype(out_dtype)


# --------------------------------------------------------------------------- split along T

# The m of "nothing yet": below any reachable log scale, yet finite, so that sums with
# it and exp() of differences with it stay exact zeros (never inf - inf).
_NOTHING = -1e30


def _split_combine(state: MLSTMState, total, end: MLSTMState) -> MLSTMState:
    """The state after a slice from the state before it: the slice's summed log-forget
    gates ``total [N]`` and its end state from nothing ``end``. Unrolled,
    ``m_t = max(m_0 + sum log f, max_s (log i_s + sum_{r > s} log f_r))``, so the
    stabiliser, and with it ``c`` and ``n``, combine exactly."""
    m = jnp.maximum(state.m + total, end.m)
    a, b = jnp.exp(state.m + total - m), jnp.exp(end.m - m)
    c = a[..., None, None] * state.c + b[..., None, None] * end.c
    return MLSTMState(c, a[..., None] * state.n + b[..., None] * end.n, m)


def _split_slice(q, k, v, i, f, s0, reset, lengths, *, axis, reverse, kw):
    """One device's slice (inside ``shard_map``): its end state from nothing and its
    summed log-forget gates, combined over the devices in processing order into the
    state entering the slice, then the slice solved from that state."""
    valid = seqpar.local_valid(axis, q.shape[0], lengths)
    acc = s0.c.dtype
    nothing = MLSTMState(jnp.zeros_like(s0.c), jnp.zeros_like(s0.n), jnp.full_like(s0.m, _NOTHING))
    end, _ = solve(q, k, v, i, f, nothing, reset, valid, reverse=reverse, **kw)
    f, zero = f.astype(acc), jnp.zeros((), acc)
    if valid is not None:  # padded steps pass the state through, whatever they hold
        f = jnp.where(valid[..., None], f, zero)
    lf = _log_forget(f, kw["forget_gate"])
    if valid is not None:
        lf = jnp.where(valid[..., None], lf, zero)
    total = jnp.sum(lf, axis=0)
    live = seqpar.live_resets(reset, valid)
    if live is not None:  # a reset in the slice: what enters it does not pass through
        total = jnp.where(jnp.any(live, axis=0)[..., None], jnp.asarray(_NOTHING, acc), total)
    cut = seqpar.reverse_cut(reset, valid, reverse)
    if cut is not None:  # reverse: the slice passes on the empty state (c, n, m = 0)
        end = MLSTMState(
            *(jnp.where(_expand(cut[..., None], x), jnp.zeros((), acc), x) for x in end)
        )
    totals, ends = seqpar.gather(axis, total, end)

    def body(state, x):
        return _split_combine(state, *x), state

    final, entering = jax.lax.scan(body, s0, (totals, MLSTMState(*ends)), reverse=reverse)
    here = jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_index_in_dim(x, jax.lax.axis_index(axis), 0, keepdims=False),
        entering,
    )
    _, h = solve(q, k, v, i, f, here, reset, valid, reverse=reverse, **kw)
    return final, h


def _split_solve(gates, s0: MLSTMState, reset, lengths, options: RolloutOptions, kw):
    """:func:`solve` with ``T`` split over ``options.sequence_axis`` of ``options.mesh``
    (time-major ``q, k, v: [T, *B, K, D]``, ``i, f: [T, *B, K]``): each device solves
    its slice from nothing for its end state, the devices exchange those and their
    summed log-forget gates (``O(devices * state)``), a scan over devices gives each
    the exact state entering its slice, and the slice is solved from it."""
    acc = acc_dtype(*gates, *s0)
    gates = tuple(x.astype(acc) for x in gates)
    s0 = MLSTMState(*(x.astype(acc) for x in s0))
    body = functools.partial(
        _split_slice, axis=options.sequence_axis, reverse=options.reverse, kw=kw
    )
    sharded = (True, True, True, True, True, False, True, False)
    run_split = seqpar.shard(body, options.mesh, options.sequence_axis, sharded, (False, True))
    return run_split(*gates, s0, reset, lengths)


# --------------------------------------------------------------------------- cell


@dataclasses.dataclass(frozen=True)
class MLSTM:
    r"""xLSTM's mLSTM layer core as a cell: per head a matrix memory read by a query.

    From the input ``x_t [*B, D]`` alone (one projection ``[D, 4H + 2K]``)::

        q_t, k_t, v_t = x_t W_q + b_q, x_t W_k + b_k, x_t W_v + b_v   (each [*B, K, H/K])
        i_pre_t, f_pre_t = x_t W_i + b_i, x_t W_f + b_f              (each [*B, K])
        h_t = mLSTM(q, k, v, i_pre, f_pre)                           (see the module)
        y_t = sigmoid(x_t W_o + b_o) ⊙ h_t                            ([*B, H], heads concatenated)

    Args:
      hidden_size: ``H``, a multiple of ``num_heads``.
      num_heads: ``K``; each head has keys, queries and values of size ``H / K``.
      forget_gate: ``"sigmoid"`` (default: ``log f = log sigmoid(f_pre)``) or ``"exp"``.
      mode: how rollouts run the recurrence, a mode of :func:`mlstm_recurrence`
        (default ``"auto"``).
      chunk: the chunk length of the chunked mode (default 64).
      eps: added to the normaliser's denominator (default ``1e-6``).
      kernel_init: initialiser of the ``q, k, v, o`` blocks of ``w_ih`` (default
        LeCun normal); the gate blocks start at zero.
      bias_init: initialiser of the ``q, k, v, o`` blocks of ``b`` (default zeros).

    The gate biases start as xLSTM's: forget gates open, ``f_pre`` from 3 (first
    head) to 6 (last head), so ``f`` from 0.95 to 0.998 (``forget_gate="exp"``:
    ``f_pre = log sigmoid`` of those, the same ``f``); input gates at ``i_pre = -1``.

    Carry: :class:`MLSTMState` ``(c [*B, K, H/K, H/K], n [*B, K, H/K], m [*B, K])``,
    in the dtype it is given (a rollout's: see :func:`jaxseq.rollout`); the
    arithmetic runs in float32 (float64) whatever that dtype, and a bfloat16
    carry is rounded once per step (``step``) or once per rollout, with ``c``
    and ``n`` rescaled to the rounded ``m``. ``js.rollout`` runs
    :func:`mlstm_recurrence` with the cell's ``mode`` after one input projection
    (``kernel="scan"`` steps the cell instead); lengths, resets (the carry
    emptied: ``c, n, m = 0``) and reverse as for any cell.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.recurrent.MLSTM(8, num_heads=2)
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> xs = jax.random.normal(jax.random.key(1), (6, 2, 3))  # [T, B, D]
    >>> carry, ys = js.rollout(cell, params, xs)  # the whole sequence at once
    >>> _, ys_steps = js.rollout(cell, params, xs, kernel="scan")  # one step at a time
    >>> ys.shape, carry.c.shape, bool(jnp.allclose(ys, ys_steps, atol=1e-5))
    ((6, 2, 8), (2, 2, 4, 4), True)
    """

    hidden_size: int
    num_heads: int = 4
    forget_gate: str = "sigmoid"
    mode: str = "auto"
    chunk: int = 64
    eps: float = 1e-6
    kernel_init: Any = None
    bias_init: Any = None

    carry_type: ClassVar[type] = MLSTMState
    params_type: ClassVar[type] = MLSTMParams
    # js.rollout(..., mesh=, sequence_axis=) splits T over a mesh axis (see _split_solve)
    sequence_parallel: ClassVar[bool] = True

    def __post_init__(self):
        h = _checks.check_positive_int("hidden_size", self.hidden_size)
        k = _checks.check_positive_int("num_heads", self.num_heads)
        if h % k:
            raise ValueError(
                f"hidden_size, num_heads: expected hidden_size a multiple of num_heads, "
                f"got {h} and {k}"
            )
        _checks.check_choice("forget_gate", self.forget_gate, FORGET_GATES)
        _checks.check_choice("mode", self.mode, MLSTM_MODES)
        _checks.check_positive_int("chunk", self.chunk)
        _check_number("eps", self.eps, 0.0)
        for name in ("kernel_init", "bias_init"):
            f = getattr(self, name)
            if f is not None and not callable(f):
                raise TypeError(f"{name}: expected an initializer (key, shape, dtype) -> array")

    @property
    def output_size(self) -> int:
        return self.hidden_size

    @property
    def head_size(self) -> int:
        """``H / K``: the size of every head's keys, queries and values."""
        return self.hidden_size // self.num_heads

    @property
    def _width(self) -> int:
        return 4 * self.hidden_size + 2 * self.num_heads

    # -- parameters -----------------------------------------------------------------
    def init(self, key, input_size: int, dtype=jnp.float32) -> MLSTMParams:
        """Fresh params for inputs of size ``D = input_size`` (see the class for the
        initialisation): ``w_ih [D, 4H + 2K]``, ``b [4H + 2K]``."""
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        h, k = self.hidden_size, self.num_heads
        k_init = self.kernel_init or inits.lecun_normal()
        b_init = self.bias_init or inits.zeros()
        kx, kb = jax.random.split(key)
        w = [k_init(s, (d, h), dtype) for s in jax.random.split(kx, 4)]
        b = [b_init(s, (h,), dtype) for s in jax.random.split(kb, 4)]
        f_bias = jnp.linspace(3.0, 6.0, k, dtype=jnp.promote_types(dtype, jnp.float32))
        if self.forget_gate == "exp":
            f_bias = jax.nn.log_sigmoid(f_bias)
        w += [jnp.zeros((d, 2 * k), dtype)]
        b += [jnp.full((k,), -1.0, dtype), f_bias.astype(dtype)]
        return MLSTMParams(jnp.concatenate(w, axis=1), jnp.concatenate(b, axis=0))

    def input_size(self, params) -> int:
        """The input size ``D`` the parameters were made for."""
        self.check_params(params)
        return int(params.w_ih.shape[0])

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are :class:`MLSTMParams` with ``w_ih [D, 4H + 2K]``,
        ``b [4H + 2K]``, floating."""
        if not isinstance(params, MLSTMParams):
            raise TypeError(f"{name}: expected MLSTMParams for MLSTM, got {type(params).__name__}")
        width, h, k = self._width, self.hidden_size, self.num_heads
        if params.w_ih.ndim != 2 or params.w_ih.shape[1] != width:
            raise ValueError(
                f"{name}.w_ih: expected shape [D, {width}] (4H + 2K with H={h}, K={k}), "
                f"got {_checks.describe(params.w_ih)}"
            )
        _checks.check_shape(f"{name}.b", params.b, (width,))
        for field in params._fields:
            _checks.check_floating(f"{name}.{field}", getattr(params, field))

    # -- carry ----------------------------------------------------------------------
    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> MLSTMState:
        """The empty state ``c, n, m = 0`` for batch ``*B = batch_shape``."""
        batch_shape = _CellBase._carry_spec(batch_shape, dtype)
        lead, d = (*batch_shape, self.num_heads), self.head_size
        z = lambda *s: jnp.zeros((*lead, *s), dtype)
        return MLSTMState(z(d, d), z(d), z())

    def check_carry(self, carry, batch_shape, name: str = "carry") -> None:
        """Raises unless ``carry`` is an :class:`MLSTMState` of this cell for batch ``*B``."""
        if not isinstance(carry, MLSTMState):
            raise TypeError(
                f"{name}: expected MLSTMState('c', 'n', 'm') for MLSTM, got {type(carry).__name__}"
            )
        lead, d = (*batch_shape, self.num_heads), self.head_size
        wants = {"c": (*lead, d, d), "n": (*lead, d), "m": lead}
        layouts = {"c": "[*B, K, H/K, H/K]", "n": "[*B, K, H/K]", "m": "[*B, K]"}
        for field, want in wants.items():
            leaf = getattr(carry, field)
            if not hasattr(leaf, "shape") or tuple(leaf.shape) != want:
                got = _checks.describe(leaf) if hasattr(leaf, "shape") else type(leaf).__name__
                raise ValueError(
                    f"{name}.{field}: expected shape {list(want)} ({layouts[field]} with batch "
                    f"{list(batch_shape)}, K={self.num_heads}, H/K={d}), got {got}"
                )
            _checks.check_floating(f"{name}.{field}", leaf)

    # ``x: [..., D]`` against ``params.w_ih [D, ...]``, as every built-in cell checks it.
    check_input = _CellBase.check_input

    # -- computation ----------------------------------------------------------------
    def project(self, params, x):
        """The input projection ``x @ w_ih + b``: ``[..., D] -> [..., 4H + 2K]`` in float32."""
        self.check_params(params)
        self.check_input(params, x)
        return add_bias(matmul_f32(x, params.w_ih), params.b)

    def _split(self, xp):
        """``xp [..., 4H + 2K]`` -> ``q, k, v [..., K, H/K]``, ``o [..., H]``, ``i, f [..., K]``."""
        h, k = self.hidden_size, self.num_heads
        q, kk, v, o, i, f = jnp.split(xp, [h, 2 * h, 3 * h, 4 * h, 4 * h + k], axis=-1)
        heads = lambda a: a.reshape((*a.shape[:-1], k, self.head_size))
        return heads(q), heads(kk), heads(v), o, i, f

    def recur(self, params, carry: MLSTMState, xp):
        """One step given ``xp = project(params, x)``: ``(carry, y [*B, H])``."""
        q, k, v, o, i, f = self._split(xp)
        batch_shape, d = q.shape[:-2], self.head_size
        flat = lambda a, *s: a.reshape((-1, *s))
        acc = xp.dtype
        state = MLSTMState(*(a.astype(acc) for a in carry))
        state = MLSTMState(flat(state.c, d, d), flat(state.n, d), flat(state.m))
        lf = _log_forget(flat(f), self.forget_gate)
        state, h = _update(state, flat(q, d), flat(k, d), flat(v, d), flat(i), lf, self.eps)
        lead = (*batch_shape, self.num_heads)
        state = MLSTMState(
            state.c.reshape((*lead, d, d)), state.n.reshape((*lead, d)), state.m.reshape(lead)
        )
        y = jax.nn.sigmoid(o) * h.reshape(o.shape)
        return _cast_state(state, carry.c.dtype), y.astype(carry.c.dtype)

    def step(self, params, carry: MLSTMState, x):
        """One step: ``x: [*B, D]`` -> ``(carry, y: [*B, H])``."""
        self.check_params(params)
        self.check_input(params, x)  # type: ignore[misc]  # _CellBase's, shared
        self.check_carry(carry, x.shape[:-1])
        return self.recur(params, carry, self.project(params, x))

    def rollout(self, params, seq: Sequence, carry, options: RolloutOptions, key=None):
        """The cell over ``seq.xs: [T, *B, D] -> ys: [T, *B, H]`` (run by :func:`jaxseq.rollout`).

        ``kernel="auto"`` or ``"fused"``: one input projection, then
        :func:`mlstm_recurrence` with the cell's ``mode`` and ``chunk``
        (``unroll`` and ``checkpoint_every`` are not used). ``kernel="scan"``: the
        cell's ``step`` scanned like any other cell's. ``key`` is not used.
        Returns ``(MLSTMState, ys)``, zeros at padded steps.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> cell = js.recurrent.MLSTM(8, num_heads=2)
        >>> params = cell.init(jax.random.key(0), 3)
        >>> carry, ys = js.rollout(cell, params, jnp.ones((6, 2, 3)), lengths=jnp.array([6, 2]))
        >>> ys.shape, bool(jnp.all(ys[2:, 1] == 0))
        ((6, 2, 8), True)
        """
        if options.kernel == "scan":  # (with sequence_axis: refused by run())
            return run(_StepView(self), params, seq, carry, options)
        if carry is None:
            carry = self.initial_carry(seq.batch_shape, compute_dtype(params, seq.xs))
        q, k, v, o, i, f = self._split(self.project(params, seq.xs))
        if options.sequence_axis is not None:
            state, h = _split_solve(
                (q, k, v, i, f),
                MLSTMState(*(a.astype(q.dtype) for a in carry)),
                seq.reset,
                seq.lengths,
                options,
                dict(mode=self.mode, chunk=self.chunk, forget_gate=self.forget_gate, eps=self.eps),
            )
            ys = jax.nn.sigmoid(o) * h.reshape(o.shape)
            dtype = carry.c.dtype
            return _cast_state(state, dtype), ys.astype(dtype)
        state, h = solve(
            q,
            k,
            v,
            i,
            f,
            MLSTMState(*(a.astype(q.dtype) for a in carry)),
            seq.reset,
            seq.valid,
            reverse=options.reverse,
            mode=self.mode,
            chunk=self.chunk,
            forget_gate=self.forget_gate,
            eps=self.eps,
        )
        ys = jax.nn.sigmoid(o) * h.reshape(o.shape)
        dtype = carry.c.dtype
        return _cast_state(state, dtype), ys.astype(dtype)
