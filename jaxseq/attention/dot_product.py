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

Padding: a key that no query may attend (its mask column all False) and a query
row that may attend no key are replaced by zeros with ``jnp.where`` before any
arithmetic, and so are the values of such keys. Whatever padded rows hold (NaN,
inf, 1e30) never reaches an output or a gradient, and their own gradients are
exactly zero.

Masks are boolean, ``True`` = may attend. Helpers in :mod:`jaxseq.masks`:
:func:`~jaxseq.masks.causal_mask`, :func:`~jaxseq.masks.length_mask`,
:func:`~jaxseq.masks.padding_mask`, :func:`~jaxseq.masks.combine_masks`.

:func:`blockwise_attention` computes the same thing block by block with an
online softmax (memory ``O(T * block)`` in the forward and the backward pass)
and skips causal blocks that are fully masked. Additive (Bahdanau) and
multiplicative (Luong) attention over encoder states serve RNN encoder-decoders.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq._numerics import einsum_acc, masked_softmax, matmul_f32
from jaxseq.masks import CAUSAL_ALIGNMENTS, causal_mask, combine_masks

__all__ = [
    "attention_weights",
    "batched_dot_product_attention",
    "dot_product_attention",
]


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


def _check_batched_qkv(q, k, v, heads: bool):
    """Validates batched ``q, k, v``: ``[*B, T, K, D]`` (``heads``) or ``[*B, T, D]``.

    Returns ``(batch, Tq, Tk, mid)`` with ``mid == (K,)`` or ``()``.
    """
    core = 3 if heads else 2
    layout = "[*B, T, K, D]" if heads else "[*B, T, D]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        _checks.check_floating(name, x)
        _checks.check_min_ndim(name, x, core, f"{layout} for {name}")
    batch = tuple(q.shape[:-core])
    tq, mid, dk = q.shape[-core], tuple(q.shape[-core + 1 : -1]), q.shape[-1]
    tk = k.shape[-core]
    what = "batch, K and Dk" if heads else "batch and Dk"
    if k.shape != batch + (tk,) + mid + (dk,):
        raise ValueError(
            f"k: expected shape {list(batch) + ['Tk', *mid, dk]} ({what} of q), "
            f"got {_checks.describe(k)}"
        )
    if v.ndim != q.ndim or v.shape[:-1] != batch + (tk,) + mid:
        what = "batch and K" if heads else "batch"
        raise ValueError(
            f"v: expected shape {list(batch) + [tk, *mid, 'Dv']} ({what} of q, Tk of k), "
            f"got {_checks.describe(v)}"
        )
    return batch, tq, tk, mid


def _per_head_arg(name, x, batch, num_heads, tq, tk):
    """A ``mask``/``bias`` for ``[*B, K, Tq, Tk]`` scores, broadcast over the leading dims.

    Accepted (by rank, never by the sizes): ``[Tq, Tk]`` (every example and head),
    ``[*B, Tq, Tk]`` (shared by the heads) and ``[*B, K, Tq, Tk]``, where any dim may
    be 1 to broadcast (as ``jax.nn.dot_product_attention``'s 4-D masks).

    Returns ``(x, head_axis, batch_axes)``: ``x`` with its broadcast batch and head dims
    dropped and its last two dims ``[Tq, Tk]``; ``head_axis`` (0 or ``None``) and
    ``batch_axes`` (one 0 or ``None`` per batch dim, outermost first) are the vmap axes.
    ``(None, None, (None, ...))`` for ``None``.
    """
    nb = len(batch)
    if x is None:
        return None, None, (None,) * nb
    x = _checks.as_array(name, x)
    heads = x.shape[nb] if x.ndim == nb + 3 else None
    lead = x.shape[:nb] if x.ndim in (nb + 2, nb + 3) else (1,) * nb
    if (
        x.ndim not in (2, nb + 2, nb + 3)
        or any(a not in (1, b) for a, b in zip(lead, batch, strict=True))
        or heads not in (None, 1, num_heads)
        or any(a not in (1, t) for a, t in zip(x.shape[-2:], (tq, tk), strict=True))
    ):
        dims = "".join(f"{d}, " for d in batch)
        raise ValueError(
            f"{name}: expected shape [{dims}Tq={tq}, Tk={tk}] or "
            f"[{dims}K={num_heads}, Tq={tq}, Tk={tk}] (or one that broadcasts to it: "
            f"size-1 dims, or [Tq, Tk] for every example), got {_checks.describe(x)}"
        )
    x = x.reshape(tuple(lead) + x.shape[x.ndim - (2 if heads is None else 3) :])
    batch_axes = tuple(0 if a != 1 else None for a in lead)
    head_axis = 0 if heads is not None and heads != 1 else None
    drop = tuple(i for i, a in enumerate(batch_axes) if a is None)
    if heads is not None and head_axis is None:
        drop += (nb,)
    x = jnp.squeeze(x, drop) if drop else x
    return jnp.broadcast_to(x, x.shape[:-2] + (tq, tk)), head_axis, batch_axes


def _check_lengths_arg(name, lengths, batch, t, t_name, batch_what):
    """``lengths: int[*batch]`` with values in ``[0, t]`` (``None`` passes), broadcast to
    ``batch``: a leading part of the batch dims (``[B]`` for ``[B, K]``: per example,
    shared by the heads) and size-1 dims broadcast. Returns an ``int[*batch]`` array."""
    if lengths is None:
        return None
    lengths = _checks.as_array(name, lengths)
    _checks.check_integer(name, lengths)
    n = lengths.ndim
    if n > len(batch) or any(
        a not in (1, b) for a, b in zip(lengths.shape, batch[:n], strict=True)
    ):
        more = "; or its leading dims, size-1 dims broadcast" if batch else ""
        raise ValueError(
            f"{name}: expected shape {list(batch)} ({batch_what}{more}), "
            f"got {_checks.describe(lengths)}"
        )
    _checks.check_in_range(name, lengths, 0, t, f" ({t_name}={t})")
    lengths = lengths.reshape(lengths.shape + (1,) * (len(batch) - n))
    return jnp.broadcast_to(lengths, tuple(batch))


def _keep_rows(x, valid):
    """``x: [T, D]`` with the rows where ``valid: bool[T]`` is False replaced by zeros
    (a selection, so NaN or inf there reaches neither the result nor the gradient)."""
    return jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))


def _check_mask_bias(mask, bias, tq, tk):
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        _checks.check_bool("mask", mask)
        _checks.check_shape("mask", mask, (tq, tk), ("Tq", "Tk"))
    if bias is not None:
        bias = _checks.as_array("bias", bias)
        _checks.check_floating("bias", bias)
        _checks.check_shape("bias", bias, (tq, tk), ("Tq", "Tk"))
    return mask, bias


def _check_alignment(causal_alignment):
    _checks.check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)


def _attend(q, k, v, mask, bias, causal, scale, alignment="top_left"):
    """Weights ``float32[Tq, Tk]`` and, when ``v`` is given, ``(out [Tq, Dv], weights)``.

    Inputs are validated by the caller. Queries with no visible key and keys no query
    sees are zeroed (and their values) before the products, so padding never leaks.
    """
    tq, tk = q.shape[0], k.shape[0]
    if causal:
        mask = combine_masks(mask, causal_mask(tq, tk, alignment=alignment))
    if mask is not None:
        k_seen = jnp.any(mask, axis=0)
        q = _keep_rows(q, jnp.any(mask, axis=1))
        k = _keep_rows(k, k_seen)
        if v is not None:
            v = _keep_rows(v, k_seen)
    s = einsum_acc("qd,kd->qk", q, k)
    s = s * jnp.asarray(_scale_of(scale, q.shape[1]), s.dtype)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    w = masked_softmax(s, mask)
    return w if v is None else (_weighted_values(w, v), w)


def _attend_checked(q, k, v, mask, bias, scale, *, causal, alignment):
    """:func:`_attend` on checked arguments, its settings by keyword."""
    return _attend(q, k, v, mask, bias, causal, scale, alignment)


# outside jit, one compiled program instead of op-by-op dispatch
_attend_checked = _checks.compiled_after_checks(_attend_checked, ("causal", "alignment"))


def _weighted_values(w, v):
    """``w: float32[..., Tk] @ v: [Tk, Dv] -> [..., Dv]`` in the dtype of ``v``
    (weights rounded to ``v``'s dtype, accumulated in at least float32)."""
    return matmul_f32(w.astype(v.dtype), v).astype(v.dtype)


def _scale_of(scale, dk: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(dk)
    return scale


def attention_weights(
    q,
    k,
    mask=None,
    *,
    bias=None,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale=None,
):
    """Softmax attention weights ``float32[Tq, Tk]`` for one example.

    ``weights = softmax(q k^T * scale + bias)`` over keys, with masked entries
    (``mask`` False, or ``j > i + offset`` when ``causal``) exactly zero; a fully
    masked row is all zeros. ``scale`` defaults to ``1/sqrt(Dk)``.

    Args:
      q: ``[Tq, Dk]``; k: ``[Tk, Dk]``.
      mask: optional ``bool[Tq, Tk]`` (True = attend).
      bias: optional additive ``[Tq, Tk]`` score bias.
      causal: also mask keys after the query position.
      causal_alignment: where the causal diagonal sits when ``Tq != Tk``:
        ``"top_left"`` (default, ``offset = 0``, as ``jax.nn.dot_product_attention``)
        or ``"bottom_right"`` (``offset = Tk - Tq``: the queries are the last ``Tq``
        positions, as when decoding with a key/value cache); see
        :func:`~jaxseq.masks.causal_mask`.
      scale: score scale, default ``1/sqrt(Dk)``.

    >>> w = attention_weights(jnp.ones((2, 4)), jnp.ones((3, 4)), causal=True)
    >>> w.round(3).tolist()
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
    >>> w = attention_weights(
    ...     jnp.ones((2, 4)), jnp.ones((3, 4)), causal=True, causal_alignment="bottom_right"
    ... )
    >>> w.round(3).tolist()
    [[0.5, 0.5, 0.0], [0.333, 0.333, 0.333]]
    """
    _check_qkv(q, k, k[:, :1])
    _check_alignment(causal_alignment)
    mask, bias = _check_mask_bias(mask, bias, q.shape[0], k.shape[0])
    options = dict(causal=bool(causal), alignment=causal_alignment)
    return _attend_checked(q, k, None, mask, bias, scale, **options)


def dot_product_attention(
    q,
    k,
    v,
    mask=None,
    *,
    bias=None,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale=None,
):
    """Scaled dot-product attention for ONE example: ``softmax(q k^T * scale) v``.

    Args:
      q: ``[Tq, Dk]`` queries; k: ``[Tk, Dk]`` keys; v: ``[Tk, Dv]`` values.
      mask: optional ``bool[Tq, Tk]``, True where query ``i`` may attend to key ``j``.
      bias: optional additive score bias ``[Tq, Tk]`` (e.g. relative positions).
      causal: also mask ``j > i + offset``.
      causal_alignment: ``"top_left"`` (default, ``offset = 0``, as
        ``jax.nn.dot_product_attention(is_causal=True)``) or ``"bottom_right"``
        (``offset = Tk - Tq``: the last query sees every key; one new query against
        a cache of ``Tk`` keys is the last row of full causal attention).
      scale: score scale, default ``1/sqrt(Dk)``.

    Returns ``[Tq, Dv]`` in the dtype of ``v``. A fully masked query row gives zeros.
    Rows of ``q`` whose mask row is all False and rows of ``k``/``v`` whose mask
    column is all False (padding) are never read: NaN there changes no output and
    no gradient, and their gradients are zero.
    For batches and heads use ``jax.vmap`` (see the module docstring) or
    :func:`batched_dot_product_attention`.

    >>> v = jnp.arange(6.0).reshape(3, 2)
    >>> dot_product_attention(jnp.ones((2, 4)), jnp.ones((3, 4)), v, causal=True).tolist()
    [[0.0, 1.0], [1.0, 2.0]]
    >>> dot_product_attention(
    ...     jnp.ones((1, 4)), jnp.ones((3, 4)), v, causal=True, causal_alignment="bottom_right"
    ... ).tolist()
    [[2.0, 3.0]]
    """
    _check_qkv(q, k, v)
    _check_alignment(causal_alignment)
    mask, bias = _check_mask_bias(mask, bias, q.shape[0], k.shape[0])
    options = dict(causal=bool(causal), alignment=causal_alignment)
    return _attend_checked(q, k, v, mask, bias, scale, **options)[0]


def batched_dot_product_attention(
    q,
    k,
    v,
    mask=None,
    *,
    bias=None,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale=None,
    q_lengths=None,
    k_lengths=None,
    return_weights=False,
):
    """:func:`dot_product_attention` vmapped over heads and leading batch dims.

    Args:
      q: ``[*B, Tq, K, Dk]``; k: ``[*B, Tk, K, Dk]``; v: ``[*B, Tk, K, Dv]``
        (the layout of ``jax.nn.dot_product_attention``).
      mask: optional ``bool[*B, Tq, Tk]`` (shared by all heads) or
        ``bool[*B, K, Tq, Tk]``; any dim may be 1 to broadcast, and a ``[Tq, Tk]``
        mask serves every example (as ``jax.nn.dot_product_attention``'s masks:
        ``[B, 1, Tq, Tk]``, ``[1, K, Tq, Tk]``, ``[B, 1, 1, Tk]`` for key padding).
        The layout is told by the rank, never by the sizes.
      bias: optional score bias, the layouts of ``mask``.
      causal, causal_alignment, scale: as :func:`dot_product_attention`.
      q_lengths, k_lengths: optional valid lengths ``int[*B]`` in ``[0, Tq]`` and
        ``[0, Tk]`` (right padding), or their leading dims (``int[B]``: per example),
        shared by the heads: the same as a ``mask`` from
        :func:`~jaxseq.masks.padding_mask`, padded rows never read.
      return_weights: also return the weights ``float32[*B, K, Tq, Tk]``.

    Returns ``[*B, Tq, K, Dv]`` (and the weights when asked). A query row that sees
    no key gives zeros, not NaN.

    >>> q = jnp.ones((2, 5, 4, 8))  # [B, T, K, D]
    >>> out, w = batched_dot_product_attention(q, q, q, causal=True, return_weights=True)
    >>> out.shape, w.shape
    ((2, 5, 4, 8), (2, 4, 5, 5))
    >>> out = batched_dot_product_attention(q, q, q, jnp.eye(5, dtype=bool))  # one [Tq, Tk] mask
    >>> out = batched_dot_product_attention(q, q, q, k_lengths=jnp.array([5, 0]))
    >>> out[1].tolist() == jnp.zeros((5, 4, 8)).tolist()  # no key: zeros
    True
    """
    batch, tq, tk, (nh,) = _check_batched_qkv(q, k, v, heads=True)
    _check_alignment(causal_alignment)
    mask, m_ax, m_b = _per_head_arg("mask", mask, batch, nh, tq, tk)
    bias, b_ax, b_b = _per_head_arg("bias", bias, batch, nh, tq, tk)
    if mask is not None:
        _checks.check_bool("mask", mask)
    if bias is not None:
        _checks.check_floating("bias", bias)
    what = "the batch dims of q"
    ql = _check_lengths_arg("q_lengths", q_lengths, batch, tq, "Tq", what)
    kl = _check_lengths_arg("k_lengths", k_lengths, batch, tk, "Tk", what)
    options = dict(causal=bool(causal), alignment=causal_alignment, weights=bool(return_weights))
    axes = (m_ax, b_ax, tuple(m_b), tuple(b_b))
    return _batched_checked(q, k, v, mask, bias, ql, kl, scale, axes=axes, **options)


def _batched_checked(q, k, v, mask, bias, ql, kl, scale, *, axes, causal, alignment, weights):
    """:func:`batched_dot_product_attention` on checked arguments; ``axes``: the vmap axes
    of the mask and bias (:func:`_per_head_arg`)."""
    m_ax, b_ax, m_b, b_b = axes
    tq, tk = q.shape[-3], k.shape[-3]
    l_ax = 0 if ql is not None or kl is not None else None

    def one(q1, k1, v1, m1, b1, ql1, kl1):
        if l_ax is not None:
            pad = (jnp.arange(tq) < (tq if ql1 is None else ql1))[:, None] & (
                jnp.arange(tk) < (tk if kl1 is None else kl1)
            )[None, :]
            m1 = pad if m1 is None else m1 & pad
        return _attend(q1, k1, v1, m1, b1, causal, scale, alignment)

    fn = jax.vmap(one, in_axes=(1, 1, 1, m_ax, b_ax, None, None), out_axes=(1, 0))
    for i in reversed(range(q.ndim - 3)):
        fn = jax.vmap(fn, in_axes=(0, 0, 0, m_b[i], b_b[i], l_ax, l_ax))
    out, w = fn(q, k, v, mask, bias, ql, kl)
    return (out, w) if weights else out


# outside jit, one compiled program instead of op-by-op dispatch
_batched_checked = _checks.compiled_after_checks(
    _batched_checked, ("axes", "causal", "alignment", "weights")
)
