"""Attention written for ONE example and batched with ``jax.vmap``.

Shapes (per example): ``Tq`` query length, ``Tk`` key/value length, ``Dk`` key
size (queries and keys), ``Dv`` value size, ``K`` heads, ``*B`` any leading
batch dims. Batch-major at this level: the batched helpers take
``[*B, T, K, D]`` like ``jax.nn.dot_product_attention``.

The idiom: write attention for one example, then ``vmap`` over heads and batch::

    att = js.dot_product_attention                       # [Tq, Dk], [Tk, Dk], [Tk, Dv] -> [Tq, Dv]
    per_head = jax.vmap(att, in_axes=(1, 1, 1), out_axes=1)  # [T, K, D] -> [T, K, Dv]
    batched = jax.vmap(per_head)                         # [B, T, K, D] -> [B, T, K, Dv]

:func:`batched_dot_product_attention` is that composition (with masks), and
:func:`multi_head_attention` uses it.

Numerics: scores, softmax and reductions run in float32 for any input dtype
(bfloat16 included); masked scores are set to ``finfo(float32).min`` (never
``-inf``); a query row whose keys are all masked gets zero weights, so its
output and the gradients through it are exactly zero, not NaN.

Masks are boolean, ``True`` = may attend. Helpers: :func:`causal_mask`,
:func:`length_mask`, :func:`padding_mask`, :func:`combine_masks`.

:func:`blockwise_attention` computes the same thing block by block with an
online softmax (memory ``O(T * block)`` in the forward and the backward pass)
and skips causal blocks that are fully masked. Additive (Bahdanau) and
multiplicative (Luong) attention over encoder states serve RNN encoder-decoders.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq.cells import add_bias, matmul_f32

__all__ = [
    "AdditiveAttentionParams",
    "LuongAttentionParams",
    "MultiHeadAttentionParams",
    "additive_attention",
    "additive_attention_init",
    "additive_attention_keys",
    "attention_weights",
    "batched_dot_product_attention",
    "blockwise_attention",
    "causal_mask",
    "combine_masks",
    "dot_product_attention",
    "length_mask",
    "luong_attention",
    "luong_attention_init",
    "multi_head_attention",
    "multi_head_attention_init",
    "padding_mask",
]


def _acc_dtype(*xs):
    """float32, or float64 when an input is float64 (so x64 gradient checks are exact)."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


# -- masks ------------------------------------------------------------------------------


def causal_mask(tq: int, tk: int | None = None) -> jax.Array:
    """``bool[Tq, Tk]``: query ``i`` may attend to key ``j`` iff ``j <= i`` (top-left aligned)."""
    tq = _checks.check_positive_int("tq", tq)
    tk = tq if tk is None else _checks.check_positive_int("tk", tk)
    return jnp.arange(tq)[:, None] >= jnp.arange(tk)[None, :]


def length_mask(length, max_length: int) -> jax.Array:
    """``bool[*B, T]``: position ``t`` is valid iff ``t < length`` (right padding).

    ``length: int[*B]`` (a scalar for one example).
    """
    max_length = _checks.check_positive_int("max_length", max_length)
    length = _checks.as_array("length", length)
    _checks.check_integer("length", length)
    pos = jnp.arange(max_length).reshape((1,) * length.ndim + (max_length,))
    return pos < length[..., None]


def padding_mask(q_length, k_length, tq: int, tk: int) -> jax.Array:
    """``bool[*B, Tq, Tk]``: valid query rows times valid key columns.

    ``q_length`` may be ``None`` (every query row valid); ``k_length: int[*B]``.
    """
    k_valid = length_mask(k_length, tk)  # [*B, Tk]
    if q_length is None:
        q_valid = jnp.ones(k_valid.shape[:-1] + (tq,), bool)
    else:
        q_valid = length_mask(q_length, tq)
    if q_valid.shape[:-1] != k_valid.shape[:-1]:
        raise ValueError(
            f"q_length: expected the batch shape of k_length {list(k_valid.shape[:-1])}, "
            f"got {list(q_valid.shape[:-1])}"
        )
    return q_valid[..., :, None] & k_valid[..., None, :]


def combine_masks(*masks) -> jax.Array | None:
    """Logical AND of boolean masks of one shape; ``None`` entries are ignored."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for i, m in enumerate(masks[1:], start=1):
        _checks.check_bool(f"masks[{i}]", m)
        if m.shape != out.shape:
            raise ValueError(
                f"masks[{i}]: expected shape {list(out.shape)}, got {_checks.describe(m)}"
            )
        out = out & m
    return out


# -- dense attention for one example ----------------------------------------------------


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        _checks.check_floating(name, x)
    _checks.check_ndim("q", q, 2, "[Tq, Dk]")
    _checks.check_ndim("k", k, 2, "[Tk, Dk]")
    _checks.check_ndim("v", v, 2, "[Tk, Dv]")
    tk, dk = k.shape
    if q.shape[1] != dk:
        raise ValueError(f"q: expected shape [Tq, Dk={dk}] (Dk of k), got {_checks.describe(q)}")
    if v.shape[0] != tk:
        raise ValueError(f"v: expected shape [Tk={tk}, Dv] (Tk of k), got {_checks.describe(v)}")


def _scale_of(scale, dk: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(dk)
    return scale


def attention_weights(q, k, mask=None, *, bias=None, causal: bool = False, scale=None):
    """Softmax attention weights ``float32[Tq, Tk]`` for one example.

    ``weights = softmax(q k^T * scale + bias)`` over keys, with masked entries
    (``mask`` False, or ``j > i`` when ``causal``) exactly zero; a fully masked
    row is all zeros. ``scale`` defaults to ``1/sqrt(Dk)``.

    Args:
      q: ``[Tq, Dk]``; k: ``[Tk, Dk]``.
      mask: optional ``bool[Tq, Tk]`` (True = attend).
      bias: optional additive ``[Tq, Tk]`` score bias.
      causal: also mask keys after the query position (top-left aligned).
    """
    _check_qkv(q, k, k[:, :1])
    tq, tk = q.shape[0], k.shape[0]
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        _checks.check_bool("mask", mask)
        _checks.check_shape("mask", mask, (tq, tk), ("Tq", "Tk"))
    if bias is not None:
        bias = _checks.as_array("bias", bias)
        _checks.check_floating("bias", bias)
        _checks.check_shape("bias", bias, (tq, tk), ("Tq", "Tk"))
    if causal:
        mask = combine_masks(mask, causal_mask(tq, tk))
    acc = _acc_dtype(q, k)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    s = s * jnp.asarray(_scale_of(scale, q.shape[1]), acc)
    if bias is not None:
        s = s + bias.astype(acc)
    return _masked_softmax(s, mask)


def dot_product_attention(q, k, v, mask=None, *, bias=None, causal: bool = False, scale=None):
    """Scaled dot-product attention for ONE example: ``softmax(q k^T * scale) v``.

    Args:
      q: ``[Tq, Dk]`` queries; k: ``[Tk, Dk]`` keys; v: ``[Tk, Dv]`` values.
      mask: optional ``bool[Tq, Tk]``, True where query ``i`` may attend to key ``j``.
      bias: optional additive score bias ``[Tq, Tk]`` (e.g. relative positions).
      causal: also mask ``j > i`` (top-left aligned).
      scale: score scale, default ``1/sqrt(Dk)``.

    Returns ``[Tq, Dv]`` in the dtype of ``v``. A fully masked query row gives zeros.
    For batches and heads use ``jax.vmap`` (see the module docstring) or
    :func:`batched_dot_product_attention`.
    """
    _check_qkv(q, k, v)
    w = attention_weights(q, k, mask, bias=bias, causal=causal, scale=scale)
    out = lax.dot_general(
        w.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=_acc_dtype(v)
    )
    return out.astype(v.dtype)


def batched_dot_product_attention(
    q, k, v, mask=None, *, bias=None, causal: bool = False, scale=None, return_weights=False
):
    """:func:`dot_product_attention` vmapped over heads and leading batch dims.

    Args:
      q: ``[*B, Tq, K, Dk]``; k: ``[*B, Tk, K, Dk]``; v: ``[*B, Tk, K, Dv]``
        (the layout of ``jax.nn.dot_product_attention``).
      mask: optional ``bool[*B, Tq, Tk]`` (shared by all heads) or ``bool[*B, K, Tq, Tk]``.
      bias: optional ``[*B, K, Tq, Tk]`` or ``[*B, Tq, Tk]``.
      return_weights: also return the weights ``float32[*B, K, Tq, Tk]``.

    Returns ``[*B, Tq, K, Dv]`` (and the weights when asked).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        _checks.check_min_ndim(name, x, 3, f"[*B, T, K, D] for {name}")
    batch = tuple(q.shape[:-3])
    tq, nh, dk = q.shape[-3:]
    tk = k.shape[-3]
    if k.shape != batch + (tk, nh, dk):
        raise ValueError(
            f"k: expected shape {list(batch) + ['Tk', nh, dk]} (batch, K and Dk of q), "
            f"got {_checks.describe(k)}"
        )
    if v.ndim != q.ndim or v.shape[:-1] != batch + (tk, nh):
        raise ValueError(
            f"v: expected shape {list(batch + (tk, nh))} + [Dv], got {_checks.describe(v)}"
        )

    def per_head_arg(name, x):
        if x is None:
            return None, None
        if x.shape == batch + (tq, tk):
            return x, None
        if x.shape == batch + (nh, tq, tk):
            return x, 0
        raise ValueError(
            f"{name}: expected shape {list(batch + (tq, tk))} or {list(batch + (nh, tq, tk))}, "
            f"got {_checks.describe(x)}"
        )

    mask, m_ax = per_head_arg("mask", mask)
    bias, b_ax = per_head_arg("bias", bias)

    def one(q1, k1, v1, m1, b1):
        w = attention_weights(q1, k1, m1, bias=b1, causal=causal, scale=scale)
        o = lax.dot_general(
            w.astype(v1.dtype),
            v1,
            (((1,), (0,)), ((), ())),
            preferred_element_type=_acc_dtype(v1),
        )
        return o.astype(v1.dtype), w

    fn = jax.vmap(one, in_axes=(1, 1, 1, m_ax, b_ax), out_axes=(1, 0))
    for _ in batch:
        fn = jax.vmap(fn)
    out, w = fn(q, k, v, mask, bias)
    return (out, w) if return_weights else out


# -- blockwise attention ------------------------------------------------------------------


def _cdiv(a, b):
    return (a + b - 1) // b


def _k_range(i, *, causal, bq, bk, tk, nk):
    """Key blocks for query block ``i``: ``[0, n_full)`` fully visible, ``[n_full, n_end)`` masked."""
    full_k = tk // bk  # key blocks with no padding
    if causal:
        n_full = jnp.minimum((i * bq + 1) // bk, full_k)
        n_end = jnp.minimum(((i + 1) * bq - 1) // bk + 1, nk)
    else:
        n_full, n_end = jnp.int32(full_k), jnp.int32(nk)
    return n_full, n_end


def _q_range(j, *, causal, bq, bk, tk, nq):
    """Query blocks that see key block ``j``: ``[start, full)`` masked, ``[full, nq)`` unmasked."""
    padded = (j + 1) * bk > tk
    if causal:
        start = (j * bk) // bq
        full = jnp.minimum(_cdiv((j + 1) * bk - 1, bq), nq)
    else:
        start, full = jnp.int32(0), jnp.int32(0)
    full = jnp.where(padded, nq, full)
    start = jnp.minimum(start, full)
    return start, full


def _block_mask(i, j, *, causal, bq, bk, tk):
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    valid = k_pos < tk
    if causal:
        valid = valid & (q_pos >= k_pos)
    return valid[None]  # [1, bq, bk]


def _mm_qk(a, b, acc=jnp.float32):  # [N, x, D] x [N, y, D] -> f32[N, x, y]
    return lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), preferred_element_type=acc)


def _mm_pv(p, v, acc=jnp.float32):  # [N, x, y] x [N, y, D] -> f32[N, x, D]
    return lax.dot_general(p, v, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc)


def _mm_tn(a, b, acc=jnp.float32):  # [N, x, y] x [N, x, D] -> f32[N, y, D]
    return lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc)


def _pad_time(x, t_to):
    t = x.shape[1]
    if t == t_to:
        return x
    return jnp.pad(x, ((0, 0), (0, t_to - t), (0, 0)))


def _bw_forward(q, k, v, causal, bq, bk, scale):
    """q: [N, Tq, Dk], k: [N, Tk, Dk], v: [N, Tk, Dv] -> (out [N, Tq, Dv], residuals)."""
    n, tq, _ = q.shape
    tk, dv = k.shape[1], v.shape[2]
    nq, nk = _cdiv(tq, bq), _cdiv(tk, bk)
    qs = _pad_time((q * jnp.asarray(scale, q.dtype)).astype(q.dtype), nq * bq)
    kp, vp = _pad_time(k, nk * bk), _pad_time(v, nk * bk)
    geo = dict(causal=causal, bq=bq, bk=bk, tk=tk)
    acc_t = _acc_dtype(q)
    neg = float(jnp.finfo(acc_t).min)

    def q_block(_, i):
        qi = lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)

        def body(masked):
            def f(j, state):
                m, l, acc = state
                kj = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)
                vj = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)
                s = _mm_qk(qi, kj, acc_t)  # [N, bq, bk]
                if masked:
                    valid = _block_mask(i, j, **geo)
                    s = jnp.where(valid, s, neg)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
                if masked:
                    p = jnp.where(valid, p, 0.0)
                corr = jnp.exp(m - m_new)
                l = l * corr + jnp.sum(p, axis=-1)
                acc = acc * corr[..., None] + _mm_pv(p.astype(vj.dtype), vj, acc_t)
                return m_new, l, acc

            return f

        state = (
            jnp.full((n, bq), neg, acc_t),
            jnp.zeros((n, bq), acc_t),
            jnp.zeros((n, bq, dv), acc_t),
        )
        n_full, n_end = _k_range(i, nk=nk, **geo)
        state = lax.fori_loop(0, n_full, body(False), state)
        state = lax.fori_loop(n_full, n_end, body(True), state)
        m, l, acc = state
        ok = l > 0
        l_safe = jnp.where(ok, l, 1.0)
        o = jnp.where(ok[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(ok, m + jnp.log(l_safe), jnp.inf)  # inf: p = exp(s - inf) = 0
        return None, (o.astype(v.dtype), lse)

    _, (o, lse) = lax.scan(q_block, None, jnp.arange(nq))
    o = jnp.moveaxis(o, 0, 1).reshape(n, nq * bq, dv)
    lse = jnp.moveaxis(lse, 0, 1).reshape(n, nq * bq)
    return o[:, :tq], (qs, kp, vp, o, lse)


def _bw_backward(causal, bq, bk, scale, tq, tk, res, g):
    qs, kp, vp, o, lse = res
    n, tqp, dk = qs.shape
    dv = vp.shape[2]
    nq, nk = tqp // bq, kp.shape[1] // bk
    do = _pad_time(g.astype(o.dtype), tqp)
    acc_t = _acc_dtype(qs)
    delta = jnp.sum(do.astype(acc_t) * o.astype(acc_t), axis=-1)  # [N, Tq]
    geo = dict(causal=causal, bq=bq, bk=bk, tk=tk)

    def k_block(dq, j):
        kj = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)
        vj = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)

        def body(masked):
            def f(i, state):
                dk_j, dv_j, dq = state
                qi = lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)
                doi = lax.dynamic_slice_in_dim(do, i * bq, bq, axis=1)
                lse_i = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=1)
                delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=1)
                s = _mm_qk(qi, kj, acc_t)
                p = jnp.exp(s - lse_i[..., None])
                if masked:
                    p = jnp.where(_block_mask(i, j, **geo), p, 0.0)
                dv_j = dv_j + _mm_tn(p.astype(doi.dtype), doi, acc_t)
                dp = _mm_qk(doi, vj, acc_t)
                ds = p * (dp - delta_i[..., None])
                dk_j = dk_j + _mm_tn(ds.astype(qi.dtype), qi, acc_t)
                dq_i = lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1)
                dq_i = dq_i + _mm_pv(ds.astype(kj.dtype), kj, acc_t)
                dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=1)
                return dk_j, dv_j, dq

            return f

        state = (
            jnp.zeros((n, bk, dk), acc_t),
            jnp.zeros((n, bk, dv), acc_t),
            dq,
        )
        start, full = _q_range(j, nq=nq, **geo)
        state = lax.fori_loop(start, full, body(True), state)
        state = lax.fori_loop(full, nq, body(False), state)
        dk_j, dv_j, dq = state
        return dq, (dk_j, dv_j)

    dq, (dk, dvv) = lax.scan(k_block, jnp.zeros((n, tqp, dk), acc_t), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 1).reshape(n, nk * bk, dk.shape[-1])[:, :tk]
    dvv = jnp.moveaxis(dvv, 0, 1).reshape(n, nk * bk, dv)[:, :tk]
    dq = (dq[:, :tq] * scale).astype(qs.dtype)
    return dq, dk.astype(kp.dtype), dvv.astype(vp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _blockwise(q, k, v, causal, bq, bk, scale, tk):
    return _bw_forward(q, k, v, causal, bq, bk, scale)[0]


def _blockwise_fwd(q, k, v, causal, bq, bk, scale, tk):
    return _bw_forward(q, k, v, causal, bq, bk, scale)


def _blockwise_bwd(causal, bq, bk, scale, tk, res, g):
    return _bw_backward(causal, bq, bk, scale, g.shape[1], tk, res, g)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _rows_blocks(tq, tk, bq, causal):
    """Static ``(r0, r1, kend)`` per query block: rows ``[r0, r1)`` see keys ``[0, kend)``."""
    out = []
    for r0 in range(0, tq, bq):
        r1 = min(r0 + bq, tq)
        out.append((r0, r1, min(r1, tk) if causal else tk))
    return out


def _rows_valid(r0, r1, kend):
    q_pos = r0 + lax.broadcasted_iota(jnp.int32, (r1 - r0, kend), 0)
    k_pos = lax.broadcasted_iota(jnp.int32, (r1 - r0, kend), 1)
    return (q_pos >= k_pos)[None]


def _rows_forward(q, k, v, causal, bq, scale):
    """Query blocks unrolled, each against all the keys it can see: no online softmax.

    q: [N, Tq, Dk], k: [N, Tk, Dk], v: [N, Tk, Dv] -> (out [N, Tq, Dv], residuals).
    """
    tq, tk = q.shape[1], k.shape[1]
    acc_t = _acc_dtype(q)
    neg = float(jnp.finfo(acc_t).min)
    qs = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)
    outs, lses = [], []
    for r0, r1, kend in _rows_blocks(tq, tk, bq, causal):
        s = _mm_qk(qs[:, r0:r1], k[:, :kend], acc_t)
        if causal:
            valid = _rows_valid(r0, r1, kend)
            s = jnp.where(valid, s, neg)
        m = jnp.max(s, axis=-1)
        p = jnp.exp(s - m[..., None])
        if causal:
            p = jnp.where(valid, p, 0.0)
        l = jnp.sum(p, axis=-1)
        o = _mm_pv(p.astype(v.dtype), v[:, :kend], acc_t) / l[..., None]
        outs.append(o.astype(v.dtype))
        lses.append(m + jnp.log(l))
    o = jnp.concatenate(outs, axis=1)
    return o, (qs, k, v, o, jnp.concatenate(lses, axis=1))


def _rows_backward(causal, bq, scale, res, g):
    qs, k, v, o, lse = res
    tq, tk = qs.shape[1], k.shape[1]
    acc_t = _acc_dtype(qs)
    do = g.astype(o.dtype)
    delta = jnp.sum(do.astype(acc_t) * o.astype(acc_t), axis=-1)  # [N, Tq]
    dq, dk, dv = [], jnp.zeros(k.shape, acc_t), jnp.zeros(v.shape, acc_t)
    for r0, r1, kend in _rows_blocks(tq, tk, bq, causal):
        qi, doi = qs[:, r0:r1], do[:, r0:r1]
        kp, vp = k[:, :kend], v[:, :kend]
        p = jnp.exp(_mm_qk(qi, kp, acc_t) - lse[:, r0:r1, None])
        if causal:
            p = jnp.where(_rows_valid(r0, r1, kend), p, 0.0)
        dv = dv.at[:, :kend].add(_mm_tn(p.astype(doi.dtype), doi, acc_t))
        ds = p * (_mm_qk(doi, vp, acc_t) - delta[:, r0:r1, None])
        dk = dk.at[:, :kend].add(_mm_tn(ds.astype(qi.dtype), qi, acc_t))
        dq.append(_mm_pv(ds.astype(kp.dtype), kp, acc_t))
    dq = jnp.concatenate(dq, axis=1) * scale
    return dq.astype(qs.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rows(q, k, v, causal, bq, scale):
    return _rows_forward(q, k, v, causal, bq, scale)[0]


_rows.defvjp(_rows_forward, _rows_backward)

# The unrolled query-block loop is used up to this many query blocks (compile time
# grows with the count; beyond it the scan over blocks compiles once for any length).
_ROWS_MAX_BLOCKS = 8


# Rows of the flattened batch processed together: about this many score elements per block
# step (512 KiB in float32), so one step's temporaries stay in the CPU cache.
_CHUNK_ELEMS = 1 << 17


# The unrolled schedule scores a query block against its whole key prefix at once
# ([block_q, Tk] per row); this budget gave the fastest chunk (4 rows) in a sweep at
# B=32, T=512, 8 heads, block_q=128.
_ROWS_CHUNK_ELEMS = 1 << 18


def _default_chunk(n, bq, bk, method="scan"):
    budget = _ROWS_CHUNK_ELEMS if method == "unrolled" else _CHUNK_ELEMS
    c = max(1, min(n, budget // (bq * bk)))
    while n % c:
        c -= 1
    return c


def blockwise_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale=None,
    block_q: int = 128,
    block_k: int = 128,
    batch_chunk: int | None = None,
    method: str = "auto",
):
    """Exact attention computed block by block, never forming ``[Tq, Tk]`` (memory ``O(T * block)``).

    Same result as :func:`dot_product_attention` (without ``mask``/``bias``),
    but the ``[Tq, Tk]`` score matrix is never formed: a ``lax.scan`` runs over
    query blocks and, for each, a loop over key blocks keeps a running max,
    normaliser and output (Milakov & Gimelshein 2018; Rabe & Staats 2021; Dao
    2023). The backward pass is a custom VJP that recomputes the probabilities
    of each block from the saved log-sum-exp (FlashAttention-2 style), so the
    backward pass is ``O(T * block)`` in memory too. With ``causal=True`` key
    blocks entirely above the diagonal are skipped (not computed and masked):
    about half the work for ``Tq = Tk``. Only the blocks crossing the diagonal
    or holding padding pay for masking.

    Two schedules compute the same result (``method``):

    * ``"scan"``: the online softmax above; one compilation for any length.
    * ``"unrolled"``: a Python loop over the query blocks, each attending to all
      the keys it can see in one piece (with ``causal``, the prefix up to its
      last row, so the masked part is still skipped; ``block_k`` is unused).
      Memory ``O(block_q * Tk)``, larger operations and no per-block
      rescaling: faster for short and medium lengths, but the program grows
      with the number of query blocks.
    * ``"auto"`` (default): ``"unrolled"`` when there are at most 8 query
      blocks, else ``"scan"``.

    Args:
      q: ``[*B, Tq, Dk]``; k: ``[*B, Tk, Dk]``; v: ``[*B, Tk, Dv]``. ``*B`` are
        any leading batch dims (e.g. batch and heads), none for one example; the
        blocks of all of them are processed together. ``vmap`` works too.
      causal: mask ``j > i`` (top-left aligned).
      scale: default ``1/sqrt(Dk)``.
      block_q, block_k: block sizes (clipped to the sequence lengths); ``T``
        need not be a multiple of them.
      batch_chunk: how many rows of the flattened batch ``prod(*B)`` go through
        the blocks together (a ``lax.map`` runs over the chunks; it must divide
        the batch). Default: the largest divisor of the batch with at most
        ``2**17 / (block_q * block_k)`` rows (``"scan"``) or
        ``2**18 / (block_q * Tk)`` rows (``"unrolled"``), so one block's
        temporaries stay in the CPU caches.
      method: ``"auto"``, ``"scan"`` or ``"unrolled"`` (see above).

    Returns ``[*B, Tq, Dv]`` in the dtype of ``v``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        _checks.check_floating(name, x)
        _checks.check_min_ndim(name, x, 2, f"[*B, T, D] for {name}")
    batch = tuple(q.shape[:-2])
    tq, dk = q.shape[-2:]
    tk = k.shape[-2]
    if k.shape != batch + (tk, dk):
        raise ValueError(
            f"k: expected shape {list(batch) + ['Tk', dk]} (batch and Dk of q), "
            f"got {_checks.describe(k)}"
        )
    if v.shape[:-1] != batch + (tk,) or v.ndim != q.ndim:
        raise ValueError(
            f"v: expected shape {list(batch) + [tk, 'Dv']} (batch of q, Tk of k), "
            f"got {_checks.describe(v)}"
        )
    bq = min(_checks.check_positive_int("block_q", block_q), tq)
    bk = min(_checks.check_positive_int("block_k", block_k), tk)
    scale = float(_scale_of(scale, dk))
    if method not in ("auto", "scan", "unrolled"):
        raise ValueError(f"method: expected 'auto', 'scan' or 'unrolled', got {method!r}")
    if method == "auto":
        method = "unrolled" if _cdiv(tq, bq) <= _ROWS_MAX_BLOCKS else "scan"
    n = math.prod(batch)
    if batch_chunk is None:
        c = _default_chunk(n, bq, tk if method == "unrolled" else bk, method)
    else:
        c = _checks.check_positive_int("batch_chunk", batch_chunk)
        if n % c:
            raise ValueError(
                f"batch_chunk: expected a divisor of the flattened batch size {n}, got {c}"
            )
    dtype = jnp.result_type(q, k, v)
    dv = v.shape[-1]
    args = (
        q.reshape(n // c, c, tq, dk).astype(dtype),
        k.reshape(n // c, c, tk, dk).astype(dtype),
        v.reshape(n // c, c, tk, dv).astype(dtype),
    )
    if method == "unrolled":
        run = lambda a: _rows(a[0], a[1], a[2], bool(causal), bq, scale)
    else:
        run = lambda a: _blockwise(a[0], a[1], a[2], bool(causal), bq, bk, scale, tk)
    out = run([a[0] for a in args]) if c == n else lax.map(run, args)
    return out.reshape(batch + (tq, v.shape[-1])).astype(v.dtype)


# -- multi-head attention -----------------------------------------------------------------


class MultiHeadAttentionParams(NamedTuple):
    w_q: jax.Array  # [Dq, K, Dk]
    w_k: jax.Array  # [Dc, K, Dk]
    w_v: jax.Array  # [Dc, K, Dv]
    w_o: jax.Array  # [K, Dv, Do]
    b_q: jax.Array | None  # [K, Dk]
    b_k: jax.Array | None  # [K, Dk]
    b_v: jax.Array | None  # [K, Dv]
    b_o: jax.Array | None  # [Do]


def multi_head_attention_init(
    key,
    query_size: int,
    num_heads: int,
    key_size: int,
    *,
    value_size: int | None = None,
    context_size: int | None = None,
    output_size: int | None = None,
    use_bias: bool = True,
    dtype=jnp.float32,
) -> MultiHeadAttentionParams:
    """Parameters of multi-head attention (Vaswani et al. 2017).

    Args:
      query_size: ``Dq``, the size of the inputs the queries are computed from.
      num_heads: ``K``.
      key_size: ``Dk`` per head (queries and keys).
      value_size: ``Dv`` per head (default ``key_size``).
      context_size: ``Dc``, size of the inputs keys and values are computed from
        (default ``query_size``: self-attention).
      output_size: ``Do`` (default ``query_size``).
      use_bias: biases on the four projections (zeros at init).

    Weights are LeCun normal; the head count and sizes are read back from the
    shapes, so :func:`multi_head_attention` needs no config.
    """
    _checks.check_key("key", key)
    dq = _checks.check_positive_int("query_size", query_size)
    nh = _checks.check_positive_int("num_heads", num_heads)
    dk = _checks.check_positive_int("key_size", key_size)
    dv = dk if value_size is None else _checks.check_positive_int("value_size", value_size)
    dc = dq if context_size is None else _checks.check_positive_int("context_size", context_size)
    do = dq if output_size is None else _checks.check_positive_int("output_size", output_size)
    kq, kk, kv, ko = jax.random.split(key, 4)
    init = inits.lecun_normal()
    w_q = init(kq, (dq, nh * dk), dtype).reshape(dq, nh, dk)
    w_k = init(kk, (dc, nh * dk), dtype).reshape(dc, nh, dk)
    w_v = init(kv, (dc, nh * dv), dtype).reshape(dc, nh, dv)
    w_o = init(ko, (nh * dv, do), dtype).reshape(nh, dv, do)
    if use_bias:
        b = (
            jnp.zeros((nh, dk), dtype),
            jnp.zeros((nh, dk), dtype),
            jnp.zeros((nh, dv), dtype),
            jnp.zeros((do,), dtype),
        )
    else:
        b = (None,) * 4
    return MultiHeadAttentionParams(w_q, w_k, w_v, w_o, *b)


def _check_mha_params(params):
    if not isinstance(params, MultiHeadAttentionParams):
        raise TypeError(f"params: expected MultiHeadAttentionParams, got {type(params).__name__}")
    _checks.check_ndim("params.w_q", params.w_q, 3, "[Dq, K, Dk]")
    dq, nh, dk = params.w_q.shape
    _checks.check_ndim("params.w_k", params.w_k, 3, "[Dc, K, Dk]")
    dc = params.w_k.shape[0]
    _checks.check_shape("params.w_k", params.w_k, (dc, nh, dk), ("Dc", "K", "Dk"))
    _checks.check_ndim("params.w_v", params.w_v, 3, "[Dc, K, Dv]")
    dv = params.w_v.shape[2]
    _checks.check_shape("params.w_v", params.w_v, (dc, nh, dv), ("Dc", "K", "Dv"))
    _checks.check_ndim("params.w_o", params.w_o, 3, "[K, Dv, Do]")
    do = params.w_o.shape[2]
    _checks.check_shape("params.w_o", params.w_o, (nh, dv, do), ("K", "Dv", "Do"))
    for name, b, shape in (
        ("b_q", params.b_q, (nh, dk)),
        ("b_k", params.b_k, (nh, dk)),
        ("b_v", params.b_v, (nh, dv)),
        ("b_o", params.b_o, (do,)),
    ):
        if b is not None:
            _checks.check_shape(f"params.{name}", b, shape)
    return dq, dc, nh, dk, dv, do


def _project_heads(x, w, b):
    """``x: [T, D] @ w: [D, K, E] (+ b: [K, E]) -> f32[T, K, E]`` as one matmul."""
    d, nh, e = w.shape
    y = matmul_f32(x, w.reshape(d, nh * e))
    if b is not None:
        y = add_bias(y, b.reshape(nh * e))
    return y.reshape(x.shape[0], nh, e)


def multi_head_attention(
    params: MultiHeadAttentionParams,
    x,
    context=None,
    mask=None,
    *,
    causal: bool = False,
    bias=None,
    dropout_rate: float = 0.0,
    key=None,
    return_weights: bool = False,
    blockwise: bool = False,
):
    """Multi-head attention for ONE example (``jax.vmap`` it over a batch).

    ``q = x W_q``, ``k = context W_k``, ``v = context W_v`` per head; each head
    runs :func:`attention_weights` (heads by ``vmap``); the heads' outputs are
    concatenated and projected by ``W_o``.

    Args:
      params: from :func:`multi_head_attention_init` (``K`` heads read from shapes).
      x: ``[Tq, Dq]`` queries' inputs.
      context: ``[Tk, Dc]`` keys'/values' inputs; ``None`` for self-attention (``x``).
      mask: optional ``bool[Tq, Tk]`` or per head ``bool[K, Tq, Tk]`` (True = attend).
      causal: mask keys after the query position.
      bias: optional score bias ``[Tq, Tk]`` or ``[K, Tq, Tk]``.
      dropout_rate, key: dropout on the attention weights, only when ``key`` is given.
      return_weights: also return the weights ``float32[K, Tq, Tk]`` (after masking,
        before dropout) for plotting.
      blockwise: use :func:`blockwise_attention` (long sequences; no ``mask``,
        ``bias``, dropout or weights then).

    Returns ``[Tq, Do]`` in the dtype of ``x`` (and the weights when asked).
    """
    dq, dc, nh, dk, dv, do = _check_mha_params(params)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array [Tq, Dq], got {type(x).__name__}")
    _checks.check_floating("x", x)
    _checks.check_ndim("x", x, 2, "[Tq, Dq] (one example; vmap over a batch)")
    _checks.check_shape("x", x, (None, dq), ("Tq", "Dq"))
    ctx = x if context is None else context
    if context is not None:
        _checks.check_floating("context", context)
        _checks.check_ndim("context", context, 2, "[Tk, Dc] (one example)")
    _checks.check_shape("context" if context is not None else "x", ctx, (None, dc), ("Tk", "Dc"))
    tq, tk = x.shape[0], ctx.shape[0]
    if not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"dropout_rate: expected a value in [0, 1), got {dropout_rate!r}")
    dtype = x.dtype
    q = _project_heads(x, params.w_q, params.b_q).astype(dtype)  # [Tq, K, Dk]
    k = _project_heads(ctx, params.w_k, params.b_k).astype(dtype)  # [Tk, K, Dk]
    v = _project_heads(ctx, params.w_v, params.b_v).astype(dtype)  # [Tk, K, Dv]

    if blockwise:
        if (
            mask is not None
            or bias is not None
            or return_weights
            or (key is not None and dropout_rate > 0)
        ):
            raise ValueError(
                "blockwise: supports only causal or no masking, without bias, dropout or "
                "returned weights"
            )
        o = blockwise_attention(
            jnp.swapaxes(q, 0, 1), jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1), causal=causal
        )
        o = jnp.swapaxes(o, 0, 1)  # [Tq, K, Dv]
        w = None
    else:

        def per_head_arg(name, a):
            if a is None:
                return None, None
            a = _checks.as_array(name, a)
            if a.shape == (tq, tk):
                return a, None
            if a.shape == (nh, tq, tk):
                return a, 0
            raise ValueError(
                f"{name}: expected shape [Tq={tq}, Tk={tk}] or [K={nh}, Tq={tq}, Tk={tk}], "
                f"got {_checks.describe(a)}"
            )

        mask, m_ax = per_head_arg("mask", mask)
        bias, b_ax = per_head_arg("bias", bias)
        weights_fn = jax.vmap(
            lambda q1, k1, m1, b1: attention_weights(q1, k1, m1, bias=b1, causal=causal),
            in_axes=(1, 1, m_ax, b_ax),
        )
        w = weights_fn(q, k, mask, bias)  # f32[K, Tq, Tk]
        wd = w
        if key is not None and dropout_rate > 0.0:
            _checks.check_key("key", key)
            keep = jax.random.bernoulli(key, 1.0 - dropout_rate, w.shape)
            wd = jnp.where(keep, w / (1.0 - dropout_rate), 0.0)
        o = jnp.einsum("kqt,tkd->qkd", wd.astype(dtype), v, preferred_element_type=jnp.float32)
    out = matmul_f32(o.reshape(tq, nh * dv).astype(dtype), params.w_o.reshape(nh * dv, do))
    if params.b_o is not None:
        out = add_bias(out, params.b_o)
    out = out.astype(dtype)
    return (out, w) if return_weights else out


# -- additive and multiplicative attention over encoder states --------------------------


def _masked_softmax(scores, mask):
    """float32 softmax over the last axis; masked entries 0, fully masked rows all 0."""
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def _encoder_args(query, keys, values, length, mask):
    if not hasattr(query, "shape") or not hasattr(keys, "shape"):
        raise TypeError("query, keys: expected arrays")
    _checks.check_floating("query", query)
    _checks.check_floating("keys", keys)
    if query.ndim not in (1, 2):
        raise ValueError(
            f"query: expected shape [Dq] or [Tq, Dq] (one example), got {_checks.describe(query)}"
        )
    _checks.check_ndim("keys", keys, 2, "[Tk, Dk] (encoder states of one example)")
    tk = keys.shape[0]
    if values is None:
        values = keys
    else:
        _checks.check_floating("values", values)
        _checks.check_ndim("values", values, 2, "[Tk, Dv]")
        _checks.check_shape("values", values, (tk, None), ("Tk", "Dv"))
    if length is not None:
        length = _checks.as_array("length", length)
        _checks.check_integer("length", length)
        _checks.check_shape("length", length, ())
        mask = combine_masks(mask, jnp.arange(tk) < length)
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        _checks.check_bool("mask", mask)
        _checks.check_shape("mask", mask, (tk,), ("Tk",))
    return values, mask


def _context(weights, values):
    ctx = lax.dot_general(
        weights.astype(values.dtype),
        values,
        (((weights.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return ctx.astype(values.dtype)


class AdditiveAttentionParams(NamedTuple):
    w_q: jax.Array  # [Dq, A]
    w_k: jax.Array  # [Dk, A]
    b: jax.Array  # [A]
    v: jax.Array  # [A]


def additive_attention_init(
    key, query_size: int, key_size: int, attention_size: int, dtype=jnp.float32
) -> AdditiveAttentionParams:
    """Parameters of additive attention (Bahdanau et al. 2015): ``A`` is the hidden size."""
    _checks.check_key("key", key)
    dq = _checks.check_positive_int("query_size", query_size)
    dk = _checks.check_positive_int("key_size", key_size)
    a = _checks.check_positive_int("attention_size", attention_size)
    kq, kk, kv = jax.random.split(key, 3)
    init = inits.lecun_normal()
    return AdditiveAttentionParams(
        init(kq, (dq, a), dtype),
        init(kk, (dk, a), dtype),
        jnp.zeros((a,), dtype),
        init(kv, (a, 1), dtype).reshape(a),
    )


def additive_attention(
    params: AdditiveAttentionParams,
    query,
    keys,
    values=None,
    *,
    length=None,
    mask=None,
    projected_keys=None,
):
    """Bahdanau attention for ONE example: ``e_j = v . tanh(W_q q + W_k k_j + b)``.

    Args:
      query: ``[Dq]`` (a decoder state) or ``[Tq, Dq]``.
      keys: ``[Tk, Dk]`` encoder states; values ``[Tk, Dv]`` default ``keys``.
      length: source length (int scalar): keys ``j >= length`` are masked.
      mask: optional ``bool[Tk]``.
      projected_keys: ``keys @ W_k`` ``[Tk, A]`` precomputed once per source
        sequence (see :func:`additive_attention_keys`) for use in a decoder loop.

    Returns ``(context [Dv] or [Tq, Dv], weights float32[Tk] or [Tq, Tk])``; with
    every key masked the weights and context are zeros.
    """
    if not isinstance(params, AdditiveAttentionParams):
        raise TypeError(f"params: expected AdditiveAttentionParams, got {type(params).__name__}")
    values, mask = _encoder_args(query, keys, values, length, mask)
    dq, a = params.w_q.shape
    _checks.check_shape("query", query, query.shape[:-1] + (dq,))
    tk = keys.shape[0]
    if projected_keys is None:
        _checks.check_shape("keys", keys, (tk, params.w_k.shape[0]), ("Tk", "Dk"))
        projected_keys = additive_attention_keys(params, keys)
    else:
        _checks.check_shape("projected_keys", projected_keys, (tk, a), ("Tk", "A"))
    qp = add_bias(matmul_f32(query, params.w_q), params.b)  # [..., A]
    h = jnp.tanh(
        qp[..., None, :]
        + projected_keys.astype(jnp.float32).reshape((1,) * (query.ndim - 1) + (tk, a))
    )  # [..., Tk, A]
    scores = matmul_f32(h, params.v.astype(jnp.float32).reshape(a, 1))[..., 0]  # [..., Tk]
    if mask is not None:
        mask = mask.reshape((1,) * (query.ndim - 1) + (tk,))
    w = _masked_softmax(scores, mask)
    return _context(w, values), w


def additive_attention_keys(params: AdditiveAttentionParams, keys):
    """``keys @ W_k``: ``[Tk, Dk] -> float32[Tk, A]``, computed once per source sequence."""
    if not isinstance(params, AdditiveAttentionParams):
        raise TypeError(f"params: expected AdditiveAttentionParams, got {type(params).__name__}")
    _checks.check_ndim("keys", keys, 2, "[Tk, Dk]")
    _checks.check_shape("keys", keys, (None, params.w_k.shape[0]), ("Tk", "Dk"))
    return matmul_f32(keys, params.w_k)


class LuongAttentionParams(NamedTuple):
    w: jax.Array | None  # [Dq, Dk] for score="general"; None for score="dot"


def luong_attention_init(
    key, query_size: int, key_size: int, score: str = "general", dtype=jnp.float32
) -> LuongAttentionParams:
    """Parameters of multiplicative attention (Luong et al. 2015).

    ``score="dot"``: ``e_j = q . k_j`` (no parameters; needs ``Dq == Dk``).
    ``score="general"``: ``e_j = q^T W k_j`` with ``W: [Dq, Dk]``.
    """
    _checks.check_choice("score", score, ("dot", "general"))
    dq = _checks.check_positive_int("query_size", query_size)
    dk = _checks.check_positive_int("key_size", key_size)
    if score == "dot":
        if dq != dk:
            raise ValueError(f"key_size: score='dot' needs key_size == query_size={dq}, got {dk}")
        return LuongAttentionParams(None)
    _checks.check_key("key", key)
    return LuongAttentionParams(inits.lecun_normal()(key, (dq, dk), dtype))


def luong_attention(
    params: LuongAttentionParams, query, keys, values=None, *, length=None, mask=None
):
    """Luong attention for ONE example: ``e_j = q . k_j`` (dot) or ``q^T W k_j`` (general).

    Args and returns as :func:`additive_attention`: ``query [Dq]`` or ``[Tq, Dq]``,
    ``keys [Tk, Dk]``, ``values [Tk, Dv]`` (default keys), ``length``/``mask`` over
    the source; returns ``(context, weights float32)``.
    """
    if not isinstance(params, LuongAttentionParams):
        raise TypeError(f"params: expected LuongAttentionParams, got {type(params).__name__}")
    values, mask = _encoder_args(query, keys, values, length, mask)
    tk, dk = keys.shape
    if params.w is None:
        if query.shape[-1] != dk:
            raise ValueError(
                f"query: expected last dim Dk={dk} (score='dot'), got {_checks.describe(query)}"
            )
        qw = query
    else:
        _checks.check_shape("params.w", params.w, (None, dk), ("Dq", "Dk"))
        dq = params.w.shape[0]
        if query.shape[-1] != dq:
            raise ValueError(f"query: expected last dim Dq={dq}, got {_checks.describe(query)}")
        qw = matmul_f32(query, params.w).astype(query.dtype)
    scores = lax.dot_general(
        qw, keys, (((qw.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [..., Tk]
    if mask is not None:
        mask = mask.reshape((1,) * (query.ndim - 1) + (tk,))
    w = _masked_softmax(scores, mask)
    return _context(w, values), w
