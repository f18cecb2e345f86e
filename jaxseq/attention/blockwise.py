"""Blockwise attention: the same result as dense attention computed block by block
with an online softmax, ``O(T * block)`` memory in the forward and backward pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxseq import _checks
from jaxseq._numerics import acc_dtype
from jaxseq.attention.dot_product import _check_batched_qkv, _check_lengths_arg, _scale_of
from jaxseq.masks import causal_offset, length_mask

__all__ = [
    "blockwise_attention",
]


def _keep_steps(x, valid):
    """``x: [*B, T, D]`` with the steps where ``valid: bool[*B, T]`` is False set to zeros."""
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def _cdiv(a, b):
    return (a + b - 1) // b


def _k_range(i, *, causal, bq, bk, tk, nk, offset=0, k_min=None, k_max=None, q_max=None):
    """Key blocks for query block ``i``: ``[0, n_full)`` fully visible, ``[n_full, n_end)`` masked.

    Causal: row ``r`` sees keys ``j <= r + offset``, so the block's first row sees
    ``i * bq + offset + 1`` keys and its last row ``(i + 1) * bq + offset``.
    Lengths (the shortest and longest of the rows processed together): blocks past
    ``k_min`` hold padding for some row (masked), blocks from ``k_max`` on are
    padding for every row, and a query block from ``q_max`` on is padding (skipped).
    """
    full_k = tk // bk  # key blocks with no padding
    if causal:
        n_full = jnp.clip((i * bq + offset + 1) // bk, 0, full_k)
        n_end = jnp.clip(_cdiv((i + 1) * bq + offset, bk), 0, nk)
    else:
        n_full, n_end = jnp.int32(full_k), jnp.int32(nk)
    if k_min is not None:
        n_full = jnp.minimum(n_full, k_min // bk)
        n_end = jnp.minimum(n_end, _cdiv(k_max, bk))
    if q_max is not None:
        n_end = jnp.where(i * bq >= q_max, 0, n_end)
    return jnp.minimum(n_full, n_end), n_end


def _q_range(j, *, causal, bq, bk, tk, nq, offset=0, k_min=None, k_max=None):
    """Query blocks that see key block ``j``: ``[start, full)`` masked, ``[full, nq)`` unmasked.

    Causal: key ``j * bk`` is first seen by row ``j * bk - offset``; the whole block by
    row ``(j + 1) * bk - 1 - offset`` and every later row. With key lengths, a block
    past ``k_min`` is masked for every query block, one from ``k_max`` on is skipped
    (``start == full == nq``).
    """
    padded = (j + 1) * bk > tk
    if k_min is not None:
        padded = padded | ((j + 1) * bk > k_min)
    if causal:
        start = jnp.maximum(j * bk - offset, 0) // bq
        full = jnp.minimum(_cdiv(jnp.maximum((j + 1) * bk - 1 - offset, 0), bq), nq)
    else:
        start, full = jnp.int32(0), jnp.int32(0)
    full = jnp.where(padded, nq, full)
    if k_max is not None:
        full = jnp.where(j * bk >= k_max, nq, full)
        start = jnp.where(j * bk >= k_max, nq, start)
    start = jnp.minimum(start, full)
    return start, full


def _block_mask(i, j, *, causal, bq, bk, tk, offset=0, kl=None):
    """``bool[1 or N, bq, bk]``: key inside ``Tk`` (and its row's length ``kl: [N]``)
    and, with ``causal``, ``k_pos <= q_pos + offset``."""
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    valid = k_pos < tk
    if causal:
        valid = valid & (q_pos + offset >= k_pos)
    if kl is not None:
        return valid[None] & (k_pos[None] < kl[:, None, None])  # [N, bq, bk]
    return valid[None]  # [1, bq, bk]


def _bounds(ql, kl):
    """The shortest/longest key length and the longest query length of the rows
    processed together (``None`` without lengths): the block loops' extra limits."""
    out = {}
    if kl is not None:
        out.update(k_min=jnp.min(kl), k_max=jnp.max(kl))
    if ql is not None:
        out.update(q_max=jnp.max(ql))
    return out


def _q_ok(ok, r0, ql):
    """``ok: bool[N, rows]`` and, with query lengths ``ql: [N]``, ``r0 + row < ql``."""
    if ql is None:
        return ok
    q_pos = r0 + lax.broadcasted_iota(jnp.int32, ok.shape, 1)
    return ok & (q_pos < ql[:, None])


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


def _bw_forward(q, k, v, ql, kl, causal, bq, bk, scale, offset):
    """q: [N, Tq, Dk], k: [N, Tk, Dk], v: [N, Tk, Dv], lengths ql, kl: int32[N] or None
    -> (out [N, Tq, Dv], residuals). Padded rows of q, k, v must hold zeros."""
    n, tq, _ = q.shape
    tk, dv = k.shape[1], v.shape[2]
    nq, nk = _cdiv(tq, bq), _cdiv(tk, bk)
    qs = _pad_time((q * jnp.asarray(scale, q.dtype)).astype(q.dtype), nq * bq)
    kp, vp = _pad_time(k, nk * bk), _pad_time(v, nk * bk)
    geo = dict(causal=causal, bq=bq, bk=bk, tk=tk, offset=offset)
    acc_t = acc_dtype(q)
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
                    valid = _block_mask(i, j, kl=kl, **geo)
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
        n_full, n_end = _k_range(i, nk=nk, **geo, **_bounds(ql, kl))
        state = lax.fori_loop(0, n_full, body(False), state)
        state = lax.fori_loop(n_full, n_end, body(True), state)
        m, l, acc = state
        ok = _q_ok(l > 0, i * bq, ql)  # False: the row sees no key, or is padding
        l_safe = jnp.where(ok, l, 1.0)
        o = jnp.where(ok[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(ok, m + jnp.log(l_safe), jnp.inf)  # inf: p = exp(s - inf) = 0
        return None, (o.astype(v.dtype), lse)

    _, (o, lse) = lax.scan(q_block, None, jnp.arange(nq))
    o = jnp.moveaxis(o, 0, 1).reshape(n, nq * bq, dv)
    lse = jnp.moveaxis(lse, 0, 1).reshape(n, nq * bq)
    return o[:, :tq], (qs, kp, vp, o, lse, ql, kl)


def _bw_backward(causal, bq, bk, scale, offset, tq, tk, res, g):
    qs, kp, vp, o, lse, ql, kl = res
    n, tqp, dk = qs.shape
    dv = vp.shape[2]
    nq, nk = tqp // bq, kp.shape[1] // bk
    do = _pad_time(g.astype(o.dtype), tqp)
    acc_t = acc_dtype(qs)
    delta = jnp.sum(do.astype(acc_t) * o.astype(acc_t), axis=-1)  # [N, Tq]
    geo = dict(causal=causal, bq=bq, bk=bk, tk=tk, offset=offset)

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
                    p = jnp.where(_block_mask(i, j, kl=kl, **geo), p, 0.0)
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
        start, full = _q_range(j, nq=nq, **geo, **_bounds(None, kl))
        # rows past their query length have lse = inf, so p = 0 there; query blocks
        # past the longest query length are skipped
        nq_end = nq if ql is None else jnp.minimum(_cdiv(jnp.max(ql), bq), nq)
        state = lax.fori_loop(start, jnp.minimum(full, nq_end), body(True), state)
        state = lax.fori_loop(full, nq_end, body(False), state)
        dk_j, dv_j, dq = state
        return dq, (dk_j, dv_j)

    dq, (dk, dvv) = lax.scan(k_block, jnp.zeros((n, tqp, dk), acc_t), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 1).reshape(n, nk * bk, dk.shape[-1])[:, :tk]
    dvv = jnp.moveaxis(dvv, 0, 1).reshape(n, nk * bk, dv)[:, :tk]
    dq = (dq[:, :tq] * scale).astype(qs.dtype)
    return dq, dk.astype(kp.dtype), dvv.astype(vp.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _blockwise(q, k, v, ql, kl, causal, bq, bk, scale, offset, tk):
    return _bw_forward(q, k, v, ql, kl, causal, bq, bk, scale, offset)[0]


def _blockwise_fwd(q, k, v, ql, kl, causal, bq, bk, scale, offset, tk):
    return _bw_forward(q, k, v, ql, kl, causal, bq, bk, scale, offset)


def _blockwise_bwd(causal, bq, bk, scale, offset, tk, res, g):
    return _bw_backward(causal, bq, bk, scale, offset, g.shape[1], tk, res, g)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _rows_blocks(tq, tk, bq, causal, offset=0):
    """Static ``(r0, r1, kend)`` per query block: rows ``[r0, r1)`` see keys ``[0, kend)``
    (``kend == 0``: the block sees no key)."""
    out = []
    for r0 in range(0, tq, bq):
        r1 = min(r0 + bq, tq)
        out.append((r0, r1, min(max(r1 + offset, 0), tk) if causal else tk))
    return out


def _rows_valid(r0, r1, kend, offset=0):
    q_pos = r0 + lax.broadcasted_iota(jnp.int32, (r1 - r0, kend), 0)
    k_pos = lax.broadcasted_iota(jnp.int32, (r1 - r0, kend), 1)
    return (q_pos + offset >= k_pos)[None]


def _rows_mask(r0, r1, kend, causal, offset, kl):
    """``bool[1 or N, rows, kend]`` (causal and/or key lengths ``kl: [N]``) or ``None``."""
    valid = _rows_valid(r0, r1, kend, offset) if causal else None
    if kl is not None:
        k_pos = lax.broadcasted_iota(jnp.int32, (1, r1 - r0, kend), 2)
        in_len = k_pos < kl[:, None, None]
        valid = in_len if valid is None else valid & in_len
    return valid


def _rows_forward(q, k, v, ql, kl, causal, bq, scale, offset):
    """Query blocks unrolled, each against all the keys it can see: no online softmax.

    q: [N, Tq, Dk], k: [N, Tk, Dk], v: [N, Tk, Dv] -> (out [N, Tq, Dv], residuals).
    """
    n, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    acc_t = acc_dtype(q)
    neg = float(jnp.finfo(acc_t).min)
    qs = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)
    outs, lses = [], []
    for r0, r1, kend in _rows_blocks(tq, tk, bq, causal, offset):
        if kend == 0:  # no row of this block sees a key: zeros, and p = exp(s - inf) = 0
            outs.append(jnp.zeros((n, r1 - r0, v.shape[2]), v.dtype))
            lses.append(jnp.full((n, r1 - r0), jnp.inf, acc_t))
            continue
        s = _mm_qk(qs[:, r0:r1], k[:, :kend], acc_t)
        valid = _rows_mask(r0, r1, kend, causal, offset, kl)
        if valid is not None:
            s = jnp.where(valid, s, neg)
        m = jnp.max(s, axis=-1)
        p = jnp.exp(s - m[..., None])
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        l = jnp.sum(p, axis=-1)
        ok = _q_ok(l > 0, r0, ql)  # False: the row sees no key, or is padding
        l_safe = jnp.where(ok, l, 1.0)
        o = _mm_pv(p.astype(v.dtype), v[:, :kend], acc_t) / l_safe[..., None]
        outs.append(jnp.where(ok[..., None], o, 0.0).astype(v.dtype))
        lses.append(jnp.where(ok, m + jnp.log(l_safe), jnp.inf))
    o = jnp.concatenate(outs, axis=1)
    return o, (qs, k, v, o, jnp.concatenate(lses, axis=1), kl)


def _rows_backward(causal, bq, scale, offset, res, g):
    qs, k, v, o, lse, kl = res
    tq, tk = qs.shape[1], k.shape[1]
    acc_t = acc_dtype(qs)
    do = g.astype(o.dtype)
    delta = jnp.sum(do.astype(acc_t) * o.astype(acc_t), axis=-1)  # [N, Tq]
    dq, dk, dv = [], jnp.zeros(k.shape, acc_t), jnp.zeros(v.shape, acc_t)
    for r0, r1, kend in _rows_blocks(tq, tk, bq, causal, offset):
        if kend == 0:
            dq.append(jnp.zeros((qs.shape[0], r1 - r0, qs.shape[2]), acc_t))
            continue
        qi, doi = qs[:, r0:r1], do[:, r0:r1]
        kp, vp = k[:, :kend], v[:, :kend]
        p = jnp.exp(_mm_qk(qi, kp, acc_t) - lse[:, r0:r1, None])
        valid = _rows_mask(r0, r1, kend, causal, offset, kl)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        dv = dv.at[:, :kend].add(_mm_tn(p.astype(doi.dtype), doi, acc_t))
        ds = p * (_mm_qk(doi, vp, acc_t) - delta[:, r0:r1, None])
        dk = dk.at[:, :kend].add(_mm_tn(ds.astype(qi.dtype), qi, acc_t))
        dq.append(_mm_pv(ds.astype(kp.dtype), kp, acc_t))
    dq = jnp.concatenate(dq, axis=1) * scale
    return dq.astype(qs.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _rows(q, k, v, ql, kl, causal, bq, scale, offset):
    return _rows_forward(q, k, v, ql, kl, causal, bq, scale, offset)[0]


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
    causal_alignment: str = "top_left",
    scale=None,
    block_q: int = 128,
    block_k: int = 128,
    batch_chunk: int | None = None,
    method: str = "auto",
    q_lengths=None,
    k_lengths=None,
):
    """Exact attention computed block by block, never forming ``[Tq, Tk]`` (memory ``O(T * block)``).

    Same result as :func:`dot_product_attention` (without ``bias``; padding by
    lengths instead of a ``mask``),
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
      causal: mask ``j > i + offset``.
      causal_alignment: ``"top_left"`` (default, ``offset = 0``) or
        ``"bottom_right"`` (``offset = Tk - Tq``: the queries are the last ``Tq``
        positions), as :func:`~jaxseq.masks.causal_mask`. Query rows that see no
        key (bottom-right with ``Tq > Tk``) give zeros.
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
      q_lengths, k_lengths: optional ``int[*B]`` valid lengths in ``[0, Tq]`` and
        ``[0, Tk]`` (right padding), or their leading dims: ``int[B]`` for
        ``q: [B, K, T, D]`` is per example, shared by the heads (size-1 dims
        broadcast too). The same as the dense path with
        ``mask = padding_mask(q_lengths, k_lengths, Tq, Tk)``. Padded rows of
        ``q``, ``k`` and ``v`` are never read (NaN there reaches no output and no
        gradient; their gradients are zero), padded query rows and rows with no
        valid key give zeros. Key blocks past the longest key length and query
        blocks past the longest query length of the rows processed together are
        skipped.

    Returns ``[*B, Tq, Dv]`` in the dtype of ``v``.

    >>> q = jax.random.normal(jax.random.key(0), (2, 6, 4))  # [B, T, D]
    >>> out = blockwise_attention(q, q, q, causal=True, block_q=4, block_k=4)
    >>> out.shape, bool(jnp.allclose(out[:, 0], q[:, 0], atol=1e-6))
    ((2, 6, 4), True)

    One new query against all six keys (decoding): the last row of the above.

    >>> last = blockwise_attention(q[:, 5:], q, q, causal=True, causal_alignment="bottom_right")
    >>> bool(jnp.allclose(last, out[:, 5:], atol=1e-6))
    True

    Padding: the second example has 3 valid steps (NaN after them).

    >>> lengths = jnp.array([6, 3])
    >>> qp = q.at[1, 3:].set(jnp.nan)
    >>> outp = blockwise_attention(qp, qp, qp, q_lengths=lengths, k_lengths=lengths)
    >>> bool(jnp.isfinite(outp).all()), outp[1, 3:].tolist() == [[0.0] * 4] * 3
    (True, True)
    """
    batch, tq, tk, _ = _check_batched_qkv(q, k, v, heads=False)
    offset = causal_offset(tq, tk, causal_alignment, "causal_alignment")
    q_lengths = _check_lengths_arg("q_lengths", q_lengths, batch, tq, "Tq", "the batch dims of q")
    k_lengths = _check_lengths_arg("k_lengths", k_lengths, batch, tk, "Tk", "the batch dims of q")
    dk = q.shape[-1]
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
    options = dict(causal=bool(causal), bq=bq, bk=bk, scale=scale, offset=offset, chunk=c)
    return _blockwise_checked(q, k, v, q_lengths, k_lengths, method=method, **options)


def _blockwise_checked(
    q, k, v, q_lengths, k_lengths, *, causal, bq, bk, scale, offset, method, chunk
):
    """:func:`blockwise_attention` on checked arguments, its settings resolved
    (``chunk``: examples per block step)."""
    batch, tq, tk, dk = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]
    n, c = math.prod(batch), chunk
    dtype = jnp.result_type(q, k, v)
    dv = v.shape[-1]
    ql = kl = None
    if q_lengths is not None:  # padded rows zeroed before any product (NaN * 0 is NaN)
        q = _keep_steps(q, length_mask(q_lengths, tq))
        ql = q_lengths.astype(jnp.int32).reshape(n // c, c)
    if k_lengths is not None:
        k_valid = length_mask(k_lengths, tk)
        k, v = _keep_steps(k, k_valid), _keep_steps(v, k_valid)
        kl = k_lengths.astype(jnp.int32).reshape(n // c, c)
    args = (
        q.reshape(n // c, c, tq, dk).astype(dtype),
        k.reshape(n // c, c, tk, dk).astype(dtype),
        v.reshape(n // c, c, tk, dv).astype(dtype),
        ql,
        kl,
    )
    if method == "unrolled":
        run = lambda a: _rows(*a, causal, bq, scale, offset)
    else:
        run = lambda a: _blockwise(*a, causal, bq, bk, scale, offset, tk)
    if c == n:
        out = run(jax.tree_util.tree_map(lambda a: a[0], args))
    else:
        out = lax.map(run, args)
    return out.reshape(batch + (tq, v.shape[-1])).astype(v.dtype)


# outside jit, one compiled program instead of op-by-op dispatch
_blockwise_checked = _checks.compiled_after_checks(
    _blockwise_checked, ("causal", "bq", "bk", "scale", "offset", "method", "chunk")
)
