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
from jax import lax

from jaxseq import _checks
from jaxseq._numerics import acc_dtype, masked_softmax, matmul_f32
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
    """A ``mask``/``bias`` shared by the heads ``[*B, Tq, Tk]`` (vmap axis ``None``)
    or one per head ``[*B, K, Tq, Tk]`` (vmap axis 0 once the batch dims are mapped).

    Returns ``(x, axis)``; ``(None, None)`` for ``None``.
    """
    if x is None:
        return None, None
    x = _checks.as_array(name, x)
    if x.shape == batch + (tq, tk):
        return x, None
    if x.shape == batch + (num_heads, tq, tk):
        return x, 0
    lead = "".join(f"{d}, " for d in batch)
    raise ValueError(
        f"{name}: expected shape [{lead}Tq={tq}, Tk={tk}] or "
        f"[{lead}K={num_heads}, Tq={tq}, Tk={tk}], got {_checks.describe(x)}"
    )


def _check_lengths_arg(name, lengths, batch, t, t_name, batch_what):
    """``lengths: int[*batch]`` with values in ``[0, t]`` (``None`` passes); returns an array."""
    if lengths is None:
        return None
    lengths = _checks.as_array(name, lengths)
    _checks.check_integer(name, lengths)
    if tuple(lengths.shape) != tuple(batch):
        raise ValueError(
            f"{name}: expected shape {list(batch)} ({batch_what}), got {_checks.describe(lengths)}"
        )
    _checks.check_in_range(name, lengths, 0, t, f" ({t_name}={t})")
    return lengths


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
    acc = acc_dtype(q, k)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    s = s * jnp.asarray(_scale_of(scale, q.shape[1]), acc)
    if bias is not None:
        s = s + bias.astype(acc)
    w = masked_softmax(s, mask)
    return w if v is None else (_weighted_values(w, v), w)


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
    return _attend(q, k, None, mask, bias, causal, scale, causal_alignment)


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
    return _attend(q, k, v, mask, bias, causal, scale, causal_alignment)[0]


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
    return_weights=False,
):
    """:func:`dot_product_attention` vmapped over heads and leading batch dims.

    Args:
      q: ``[*B, Tq, K, Dk]``; k: ``[*B, Tk, K, Dk]``; v: ``[*B, Tk, K, Dv]``
        (the layout of ``jax.nn.dot_product_attention``).
      mask: optional ``bool[*B, Tq, Tk]`` (shared by all heads) or ``bool[*B, K, Tq, Tk]``.
      bias: optional ``[*B, K, Tq, Tk]`` or ``[*B, Tq, Tk]``.
      causal, causal_alignment, scale: as :func:`dot_product_attention`.
      return_weights: also return the weights ``float32[*B, K, Tq, Tk]``.

    Returns ``[*B, Tq, K, Dv]`` (and the weights when asked).

    >>> q = jnp.ones((2, 5, 4, 8))  # [B, T, K, D]
    >>> out, w = batched_dot_product_attention(q, q, q, causal=True, return_weights=True)
    >>> out.shape, w.shape
    ((2, 5, 4, 8), (2, 4, 5, 5))
    """
    batch, tq, tk, (nh,) = _check_batched_qkv(q, k, v, heads=True)
    _check_alignment(causal_alignment)
    mask, m_ax = _per_head_arg("mask", mask, batch, nh, tq, tk)
    bias, b_ax = _per_head_arg("bias", bias, batch, nh, tq, tk)

    if mask is not None:
        _checks.check_bool("mask", mask)
    if bias is not None:
        _checks.check_floating("bias", bias)

    def one(q1, k1, v1, m1, b1):
        return _attend(q1, k1, v1, m1, b1, causal, scale, causal_alignment)

    fn = jax.vmap(one, in_axes=(1, 1, 1, m_ax, b_ax), out_axes=(1, 0))
    for _ in batch:
        fn = jax.vmap(fn)
    out, w = fn(q, k, v, mask, bias)
    return (out, w) if return_weights else out
