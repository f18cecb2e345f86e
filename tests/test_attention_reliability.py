"""Attention under padding and unequal lengths: non-finite values in padded rows never
reach outputs or gradients, causal masks aligned top-left or bottom-right, and blockwise
attention with per-example lengths, every path against a NumPy float64 reference."""

import _np_models as npm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxseq as js

# What a padded row may hold: none of it may reach a valid output or any gradient.
POISONS = (np.nan, np.inf, 1e30)


def _np(a):
    return np.asarray(a, np.float64)


def _np_causal(tq, tk, alignment):
    """``j <= i + offset``: offset 0 (top-left) or ``tk - tq`` (bottom-right)."""
    offset = 0 if alignment == "top_left" else tk - tq
    return np.arange(tk)[None, :] <= np.arange(tq)[:, None] + offset


def _np_pad_mask(lq, lk, tq, tk):
    return (np.arange(tq)[:, None] < lq) & (np.arange(tk)[None, :] < lk)


def _np_attention_vjp(q, k, v, mask, g, scale=None):
    """Float64 ``softmax(q k^T * scale) v`` with ``mask`` (True = attend; a fully masked
    row gives zeros) and its vjp for the cotangent ``g``: ``(out, dq, dk, dv)``."""
    q, k, v, g = _np(q), _np(k), _np(v), _np(g)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.where(mask, q @ k.T * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)
    dp = g @ v.T
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return p @ v, ds @ k * scale, ds.T @ q * scale, p.T @ g


def _poison(x, valid, value):
    """``x`` with ``value`` in the rows where ``valid`` (``bool[..., T]``) is False."""
    return jnp.where(jnp.asarray(valid)[..., None], x, jnp.asarray(value, x.dtype))


def _randn(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _assert_tree_close(got, want, tol=1e-5, msg=""):
    """Leaves finite and equal up to float32 round-off: ``tol`` relative, and absolute
    relative to the largest entry of ``want`` (a gradient that is zero in exact
    arithmetic, such as that of the key bias, is a sum of large cancelling terms)."""
    wants = jax.tree_util.tree_leaves(want)
    atol = tol * max([1.0] + [float(np.max(np.abs(b), initial=0.0)) for b in wants])
    for a, b in zip(jax.tree_util.tree_leaves(got), wants, strict=True):
        assert np.isfinite(np.asarray(a)).all(), f"{msg}: non-finite values in {np.asarray(a)}"
        np.testing.assert_allclose(a, b, atol=atol, rtol=tol, err_msg=msg)


# -- 1. non-finite values in padded rows ------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_padded_rows_do_not_leak(causal):
    """One example, padding mask from lengths (0 included): NaN/inf/1e30 in the padded
    q, k and v rows leave the outputs and the three gradients equal to the float64
    reference; padded query rows give zeros with zero gradients."""
    tq, tk = 6, 7
    q, k, v, g = _randn(0, (tq, 4), (tk, 4), (tk, 3), (tq, 3))

    @jax.jit
    def run(q, k, v, mask):
        f = lambda q, k, v: js.dot_product_attention(q, k, v, mask, causal=causal)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(g))

    for lq, lk in ((4, 5), (6, 0), (0, 7), (1, 1)):
        mask = _np_pad_mask(lq, lk, tq, tk)
        full = mask & np.tril(np.ones((tq, tk), bool)) if causal else mask
        qv, kv = np.arange(tq) < lq, np.arange(tk) < lk
        clean = [_poison(x, m, 0.0) for x, m in ((q, qv), (k, kv), (v, kv))]
        want = _np_attention_vjp(*clean, full, g)
        for bad in POISONS:
            args = [_poison(x, m, bad) for x, m in ((q, qv), (k, kv), (v, kv))]
            got = run(*args, jnp.asarray(mask))
            _assert_tree_close(got, want)
            np.testing.assert_array_equal(got[0][lq:], 0.0)
            np.testing.assert_array_equal(got[1][lq:], 0.0)


def test_batched_attention_padded_rows_do_not_leak():
    """``batched_dot_product_attention`` with a ``[B, Tq, Tk]`` padding mask and per-head
    masks: NaN in padded rows of every example and head never reaches outputs or grads."""
    b, tq, tk, nh = 3, 5, 6, 2
    q, k, v, g = _randn(1, (b, tq, nh, 4), (b, tk, nh, 4), (b, tk, nh, 3), (b, tq, nh, 3))
    lq, lk = np.array([5, 2, 0]), np.array([3, 6, 4])
    mask = _np_pad_mask(lq[:, None, None], lk[:, None, None], tq, tk)  # [B, Tq, Tk]
    qv, kv = np.arange(tq)[None] < lq[:, None], np.arange(tk)[None] < lk[:, None]

    @jax.jit
    def run(q, k, v):
        f = lambda q, k, v: js.batched_dot_product_attention(q, k, v, jnp.asarray(mask))
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(g))

    for bad in POISONS:
        args = [_poison(x, m[:, :, None], bad) for x, m in ((q, qv), (k, kv), (v, kv))]
        got = run(*args)
        for i in range(b):
            for h in range(nh):
                want = _np_attention_vjp(q[i, :, h], k[i, :, h], v[i, :, h], mask[i], g[i, :, h])
                # the reference's padded rows hold real numbers: never attended (keys) or
                # fully masked (queries), their gradients are exactly zero
                _assert_tree_close([x[i, :, h] for x in got], want)


def _mha_loss_and_grads(p, x, ctx, out_rows, **kw):
    """Output rows ``[:out_rows]`` and the gradients of ``sum(out[:out_rows] * g)`` w.r.t.
    the params, ``x`` and ``context``."""
    g = jnp.asarray(np.random.default_rng(9).standard_normal((out_rows, p.w_o.shape[-1])))

    def loss(p, x, c):
        out = js.attention.multi_head_attention(p, x, c, **kw)
        return jnp.sum(out[:out_rows] * g), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(p, x, ctx)
    return out, grads


@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_attention_padded_rows_do_not_leak(key, cross):
    """Self- and cross-attention with a padding mask: NaN/inf/1e30 in the padded rows of
    ``x`` and ``context`` leave the valid outputs and every gradient (params, valid rows of
    the inputs) equal to attention over the inputs with the padded rows removed, and
    finite; padded inputs get zero gradients."""
    tq, tk, lq, lk = 6, (7 if cross else 6), 4, (5 if cross else 4)
    p = npm.perturb(
        js.attention.MultiHeadAttention(2, 3).init(key, 8, context_size=5 if cross else 8), 3
    )
    x, ctx = _randn(2, (tq, 8), (tk, 5 if cross else 8))
    mask = jnp.asarray(_np_pad_mask(lq, lk, tq, tk))
    qv, kv = np.arange(tq) < lq, np.arange(tk) < lk

    @jax.jit
    def padded(p, x, c):
        return _mha_loss_and_grads(p, x, c if cross else None, lq, mask=mask)

    @jax.jit
    def trimmed(p, x, c):
        return _mha_loss_and_grads(p, x[:lq], c[:lk] if cross else None, lq)

    want_out, (wp, wx, wc) = trimmed(p, x, ctx)
    for bad in POISONS:
        xb = _poison(x, qv if cross else qv & kv, bad)
        cb = _poison(ctx, kv, bad)
        out, (gp, gx, gc) = padded(p, xb, cb)
        _assert_tree_close(out[:lq], want_out)
        _assert_tree_close(gp, wp)
        _assert_tree_close(gx[:lq], wx)
        np.testing.assert_array_equal(gx[lq:], 0.0)
        # a fully masked query row: zero attention, so its output is the output bias
        np.testing.assert_allclose(out[lq:], np.broadcast_to(p.b_o, (tq - lq, 8)), atol=1e-6)
        if cross:
            _assert_tree_close(gc[:lk], wc)
            np.testing.assert_array_equal(gc[lk:], 0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_block_padded_rows_do_not_leak(key, causal):
    """``lengths=``: NaN/inf/1e30 in the padded rows leave the valid outputs and the
    parameter gradients equal to the block on the trimmed sequence; padded outputs are
    zeros and padded inputs get zero gradients."""
    p = npm.perturb(js.attention.TransformerBlock(2, mlp_size=12).init(key, 8), seed=4)
    t, n = 7, 4
    (x,) = _randn(3, (t, 8))
    g = jnp.asarray(np.random.default_rng(5).standard_normal((n, 8)), jnp.float32)

    def loss(p, x, lengths):
        y = js.attention.transformer_block(p, x, lengths=lengths, causal=causal)
        return jnp.sum(y[:n] * g), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, want_y), (want_p, want_x) = grad(p, x[:n], None)
    for bad in POISONS:
        xb = _poison(x, np.arange(t) < n, bad)
        (_, y), (gp, gx) = grad(p, xb, jnp.array(n))
        _assert_tree_close(y[:n], want_y)
        np.testing.assert_array_equal(y[n:], 0.0)
        _assert_tree_close(gp, want_p)
        _assert_tree_close(gx[:n], want_x)
        np.testing.assert_array_equal(gx[n:], 0.0)


@pytest.mark.parametrize("kind", ["additive", "additive_projected", "luong"])
def test_encoder_attention_padded_keys_do_not_leak(key, kind):
    """Additive (also with precomputed projected keys) and Luong attention with
    ``lengths=``: non-finite padded keys and values change neither the context, the
    weights nor any gradient (params, query, valid keys and values); length 0 gives
    zeros with zero gradients."""
    tk, n = 6, 4
    if kind == "luong":
        p = npm.perturb(js.attention.LuongAttention().init(key, 5, 4), seed=1)
    else:
        p = npm.perturb(js.attention.AdditiveAttention(3).init(key, 5, 4), seed=1)
    query, keys, values = _randn(6, (2, 5), (tk, 4), (tk, 3))

    def loss(p, query, keys, values, lengths):
        if kind == "luong":
            ctx, w = js.attention.luong_attention(p, query, keys, values, lengths=lengths)
        elif kind == "additive":
            ctx, w = js.attention.additive_attention(p, query, keys, values, lengths=lengths)
        else:
            pk = js.attention.additive_attention_keys(p, keys, lengths=lengths)
            ctx, w = js.attention.additive_attention(
                p, query, keys, values, lengths=lengths, projected_keys=pk
            )
        return jnp.sum(ctx**2) + jnp.sum(w[:, :n] ** 2), (ctx, w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, (want_c, want_w)), want_g = grad(p, query, keys[:n], values[:n], None)
    valid = np.arange(tk) < n
    for bad in POISONS:
        kb, vb = _poison(keys, valid, bad), _poison(values, valid, bad)
        (_, (c, w)), (gp, gq, gk, gv) = grad(p, query, kb, vb, jnp.array(n))
        _assert_tree_close((c, w[:, :n]), (want_c, want_w))
        np.testing.assert_array_equal(w[:, n:], 0.0)
        _assert_tree_close((gp, gq, gk[:n], gv[:n]), want_g)
        np.testing.assert_array_equal(gk[n:], 0.0)
        np.testing.assert_array_equal(gv[n:], 0.0)
        # every key padded: zero context and weights, zero and finite gradients
        (_, (c0, w0)), g0 = grad(p, query, kb, vb, jnp.array(0))
        np.testing.assert_array_equal(c0, 0.0)
        np.testing.assert_array_equal(w0, 0.0)
        for leaf in jax.tree_util.tree_leaves(g0):
            np.testing.assert_array_equal(leaf, 0.0)


# -- 2. causal masks when the query and key lengths differ -------------------------------

SHAPES = ((1, 10), (4, 9), (9, 4))


def test_causal_mask_alignments_match_numpy():
    for tq, tk in (*SHAPES, (5, 5)):
        np.testing.assert_array_equal(js.causal_mask(tq, tk), _np_causal(tq, tk, "top_left"))
        for al in ("top_left", "bottom_right"):
            got = js.causal_mask(tq, tk, alignment=al)
            np.testing.assert_array_equal(got, _np_causal(tq, tk, al))
    # bottom-right, one query: the last position sees every key
    np.testing.assert_array_equal(js.causal_mask(1, 10, alignment="bottom_right"), True)
    np.testing.assert_array_equal(js.causal_mask(1, 10)[0], np.arange(10) == 0)
    with pytest.raises(
        ValueError, match=r"^alignment: expected one of \['top_left', 'bottom_right'\]"
    ):
        js.causal_mask(2, 3, alignment="lower_right")


def test_top_left_causal_equals_jax_nn_for_unequal_lengths():
    """The default (``causal_alignment="top_left"``) is ``jax.nn``'s ``is_causal``."""

    @jax.jit
    def run(q, k, v):
        ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        batched, one = [], []
        for kw in ({}, {"causal_alignment": "top_left"}):
            batched.append(js.batched_dot_product_attention(q, k, v, causal=True, **kw))
            one.append(
                js.dot_product_attention(q[0, :, 0], k[0, :, 0], v[0, :, 0], causal=True, **kw)
            )
        return ref, batched, one

    for tq, tk in SHAPES:
        ref, batched, one = run(*_randn(tq * tk, (2, tq, 3, 4), (2, tk, 3, 4), (2, tk, 3, 4)))
        for b, o in zip(batched, one):
            np.testing.assert_allclose(b, ref, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(o, ref[0, :, 0], atol=1e-5, rtol=1e-5)


def _bottom_right_paths():
    """Every path's causal attention, bottom-right aligned, on ``[N, T, D]`` inputs."""
    dense = jax.vmap(
        lambda q, k, v: js.dot_product_attention(
            q, k, v, causal=True, causal_alignment="bottom_right"
        )
    )

    def batched(q, k, v):
        f = js.batched_dot_product_attention
        out = f(
            q[:, :, None],
            k[:, :, None],
            v[:, :, None],
            causal=True,
            causal_alignment="bottom_right",
        )
        return out[:, :, 0]

    def blockwise(method):
        return lambda q, k, v: js.blockwise_attention(
            q,
            k,
            v,
            causal=True,
            causal_alignment="bottom_right",
            block_q=2,
            block_k=3,
            method=method,
        )

    return {
        "dense": dense,
        "batched": batched,
        "scan": blockwise("scan"),
        "unrolled": blockwise("unrolled"),
    }


def test_bottom_right_causal_matches_numpy_values_and_grads():
    """Query ``i`` sees keys ``j <= i + Tk - Tq``; with ``Tq > Tk`` the first rows see no
    key and give zeros with zero gradients. Dense, batched and both blockwise schedules."""
    paths = _bottom_right_paths()

    @jax.jit
    def run(q, k, v, g):
        res = {}
        for name, f in paths.items():
            out, vjp = jax.vjp(f, q, k, v)
            res[name] = (out, *vjp(g))
        return res

    for tq, tk in SHAPES:
        q, k, v, g = _randn(tq + tk, (2, tq, 4), (2, tk, 4), (2, tk, 3), (2, tq, 3))
        mask = _np_causal(tq, tk, "bottom_right")
        got = run(q, k, v, g)
        for i in range(2):
            want = _np_attention_vjp(q[i], k[i], v[i], mask, g[i])
            for name, res in got.items():
                _assert_tree_close([r[i] for r in res], want, msg=name)
        if tq > tk:
            for name, res in got.items():
                np.testing.assert_array_equal(res[0][:, : tq - tk], 0.0, err_msg=name)


def test_bottom_right_single_query_is_the_last_row_of_full_causal():
    """Decoding with a cache: one query against ``Tk`` keys is the last row of causal
    attention over the whole sequence (every path)."""
    q, k, v = _randn(11, (2, 10, 4), (2, 10, 4), (2, 10, 3))
    paths = _bottom_right_paths()

    @jax.jit  # every path in one compile, not one per eager operation
    def run(q, k, v):
        full = jax.vmap(lambda q, k, v: js.dot_product_attention(q, k, v, causal=True))(q, k, v)
        return full, {name: f(q[:, -1:], k, v) for name, f in paths.items()}

    full, lasts = run(q, k, v)
    for name, last in lasts.items():
        np.testing.assert_allclose(last, full[:, -1:], atol=1e-5, rtol=1e-5, err_msg=name)


def test_multi_head_bottom_right_equals_the_explicit_mask(key):
    """``multi_head_attention(causal_alignment="bottom_right")`` (dense and blockwise)
    equals the same attention with the NumPy bottom-right mask given explicitly."""
    p = npm.perturb(js.attention.MultiHeadAttention(2, 3).init(key, 8, context_size=5), 3)

    @jax.jit
    def run(p, x, ctx, mask):
        kw = dict(causal=True, causal_alignment="bottom_right")
        return js.attention.multi_head_attention(p, x, ctx, mask), [
            js.attention.multi_head_attention(p, x, ctx, blockwise=b, **kw) for b in (False, True)
        ]

    for tq, tk in ((1, 6), (6, 3)):
        x, ctx = _randn(tq, (tq, 8), (tk, 5))
        want, outs = run(p, x, ctx, jnp.asarray(_np_causal(tq, tk, "bottom_right")))
        for out in outs:
            np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_causal_alignment_is_validated():
    q = jnp.zeros((2, 3, 4))
    msg = r"^causal_alignment: expected one of \['top_left', 'bottom_right'\], got 'lower_right'"
    calls = (
        lambda: js.dot_product_attention(q[0], q[0], q[0], causal_alignment="lower_right"),
        lambda: js.attention.attention_weights(q[0], q[0], causal_alignment="lower_right"),
        lambda: js.batched_dot_product_attention(
            q[..., None, :], q[..., None, :], q[..., None, :], causal_alignment="lower_right"
        ),
        lambda: js.blockwise_attention(q, q, q, causal_alignment="lower_right"),
    )
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()
    p = js.attention.MultiHeadAttention(1, 4).init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=msg):
        js.attention.multi_head_attention(p, q[0], causal_alignment="lower_right")


# -- 3. blockwise attention with per-example lengths -------------------------------------

CAUSAL_CASES = ((False, "top_left"), (True, "top_left"), (True, "bottom_right"))


@pytest.mark.parametrize("method", ["scan", "unrolled"])
def test_blockwise_lengths_equal_dense_padding_mask(method):
    """``q_lengths``/``k_lengths`` (0 and full included) against the float64 reference
    and the dense path with the same padding mask: values and the three gradients,
    causal or not (both alignments), one chunk or a ``lax.map`` over chunks, with
    NaN/1e30 in the padded rows; padded query rows give zeros, padded rows zero grads."""
    tq, tk = 7, 9
    lq, lk = np.array([7, 3, 0, 6]), np.array([5, 9, 2, 0])
    q, k, v, g = _randn(7, (4, tq, 4), (4, tk, 4), (4, tk, 3), (4, tq, 3))
    qv, kv = np.arange(tq)[None] < lq[:, None], np.arange(tk)[None] < lk[:, None]
    pad = qv[:, :, None] & kv[:, None, :]  # [B, Tq, Tk]

    def paths(causal, al, lq, lk):
        """The dense path with the padding mask, blockwise in one chunk and in two."""

        def dense(q, k, v):
            f = lambda q, k, v, m: js.dot_product_attention(
                q, k, v, m, causal=causal, causal_alignment=al
            )
            return jax.vmap(f)(q, k, v, jnp.asarray(pad))

        def blockwise(chunk):
            return lambda q, k, v: js.blockwise_attention(
                q, k, v, causal=causal, causal_alignment=al, q_lengths=lq, k_lengths=lk,
                block_q=3, block_k=4, method=method, batch_chunk=chunk,
            )  # fmt: skip

        return dense, blockwise(None), blockwise(2)

    @jax.jit
    def run(q, k, v, lq, lk):
        res = []
        for causal, al in CAUSAL_CASES:
            for f in paths(causal, al, lq, lk):
                out, vjp = jax.vjp(f, q, k, v)
                res.append((out, *vjp(g)))
        return res

    clean = [_poison(x, m, 0.0) for x, m in ((q, qv), (k, kv), (v, kv))]
    for bad in (np.nan, 1e30):
        args = [_poison(x, m, bad) for x, m in ((q, qv), (k, kv), (v, kv))]
        got = run(*args, jnp.asarray(lq), jnp.asarray(lk))
        for c, (causal, al) in enumerate(CAUSAL_CASES):
            dense, one_chunk, chunks = got[3 * c : 3 * c + 3]
            for i in range(4):
                mask = pad[i] & _np_causal(tq, tk, al) if causal else pad[i]
                want = _np_attention_vjp(*(x[i] for x in clean), mask, g[i])
                for name, res in (("dense", dense), ("blockwise", one_chunk), ("chunks", chunks)):
                    _assert_tree_close([r[i] for r in res], want, msg=f"{name} {causal} {al} {i}")
            np.testing.assert_array_equal(one_chunk[0][~qv], 0.0)
            np.testing.assert_array_equal(one_chunk[1][~qv], 0.0)


def test_blockwise_skips_key_blocks_past_every_length():
    """Key blocks that are padding for every row of the batch are never visited: the
    forward and backward block ranges end at the longest key length."""
    bw = js.attention.blockwise
    geo = dict(causal=False, bq=4, bk=4, tk=32)
    ends = [int(bw._k_range(i, nk=8, k_min=5, k_max=13, **geo)[1]) for i in range(8)]
    assert ends == [4] * 8  # ceil(13 / 4) blocks of keys, none of the last four
    fulls = [int(bw._k_range(i, nk=8, k_min=5, k_max=13, **geo)[0]) for i in range(8)]
    assert fulls == [1] * 8  # only the first block is valid for every row
    for j in range(8):
        start, full = (int(a) for a in bw._q_range(j, nq=8, k_min=5, k_max=13, **geo))
        if j >= 4:  # entirely padding: no query block visits it
            assert start == full == 8
        else:  # [0, 8) masked unless every row sees the whole block
            assert (start, full) == ((0, 0) if j == 0 else (0, 8))


def test_multi_head_and_transformer_blockwise_lengths_equal_dense(key):
    """``multi_head_attention(q_lengths=, k_lengths=, blockwise=True)`` and
    ``transformer_block(lengths=, blockwise=True)`` equal their dense paths (values and
    parameter gradients) with NaN in the padded rows; the dense ``q_lengths``/``k_lengths``
    equal the padding mask given as ``mask``."""
    p = npm.perturb(js.attention.MultiHeadAttention(2, 3).init(key, 8, context_size=5), 3)
    blk = npm.perturb(js.attention.TransformerBlock(2, mlp_size=12).init(key, 8), seed=4)
    tq, tk, lq, lk = 6, 7, 4, 5
    x, ctx = _randn(8, (tq, 8), (tk, 5))
    x = _poison(x, np.arange(tq) < lq, np.nan)
    ctx = _poison(ctx, np.arange(tk) < lk, np.nan)
    mask = jnp.asarray(_np_pad_mask(lq, lk, tq, tk))

    def mha(p, x, ctx, **kw):
        return jnp.sum(js.attention.multi_head_attention(p, x, ctx, **kw)[:lq] ** 2)

    def block(p, x, **kw):
        return jnp.sum(js.attention.transformer_block(p, x, lengths=jnp.array(lq), **kw) ** 2)

    @jax.jit
    def run(p, blk, x, ctx):
        lens = dict(q_lengths=jnp.array(lq), k_lengths=jnp.array(lk))
        mha_grads = [
            jax.value_and_grad(mha)(p, x, ctx, mask=mask),
            jax.value_and_grad(mha)(p, x, ctx, **lens),
            jax.value_and_grad(mha)(p, x, ctx, blockwise=True, **lens),
            jax.value_and_grad(mha)(p, x, ctx, blockwise=True, causal=True, **lens),
            jax.value_and_grad(mha)(p, x, ctx, mask=mask, causal=True),
        ]
        block_grads = [jax.value_and_grad(block)(blk, x, blockwise=b) for b in (False, True)]
        return mha_grads, block_grads

    mha_grads, block_grads = run(p, blk, x, ctx)
    for got in mha_grads[1:3]:
        _assert_tree_close(got, mha_grads[0])
    _assert_tree_close(mha_grads[3], mha_grads[4])
    _assert_tree_close(block_grads[1], block_grads[0])


def test_lengths_are_validated():
    q, k = jnp.zeros((3, 5, 4)), jnp.zeros((3, 6, 4))
    with pytest.raises(TypeError, match=r"^q_lengths: expected an integer dtype, got float32\[3\]"):
        js.blockwise_attention(q, k, k, q_lengths=jnp.ones(3))
    with pytest.raises(ValueError, match=r"^k_lengths: expected shape \[3\] \(the batch dims"):
        js.blockwise_attention(q, k, k, k_lengths=jnp.ones((2,), jnp.int32))
    with pytest.raises(
        ValueError, match=r"^k_lengths: expected values in \[0, 6\] \(Tk=6\), got 7"
    ):
        js.blockwise_attention(q, k, k, k_lengths=jnp.array([1, 7, 2]))
    with pytest.raises(
        ValueError, match=r"^q_lengths: expected values in \[0, 5\] \(Tq=5\), got -1"
    ):
        js.blockwise_attention(q, k, k, q_lengths=jnp.array([1, -1, 2]))
    p = js.attention.MultiHeadAttention(1, 4).init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"^q_lengths: expected shape \[\] \(one example"):
        js.attention.multi_head_attention(p, q[0], q_lengths=jnp.array([2]))
    with pytest.raises(
        ValueError, match=r"^k_lengths: expected values in \[0, 5\] \(Tk=5\), got 9"
    ):
        js.attention.multi_head_attention(p, q[0], k_lengths=jnp.array(9), blockwise=True)
    with pytest.raises(TypeError, match=r"^k_lengths: expected an integer dtype"):
        js.attention.multi_head_attention(p, q[0], k_lengths=2.0)
    blk = js.attention.TransformerBlock(1).init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"^lengths: expected values in \[0, 5\] \(T=5\), got 6"):
        js.attention.transformer_block(blk, q[0], lengths=jnp.array(6))


# -- 4. masks and lengths broadcast over the leading dims --------------------------------


def _np_batched(q, k, v, mask4):
    """Float64 reference for ``q: [B, Tq, K, D]``, ``k, v: [B, Tk, K, *]`` and
    ``mask4: bool[B, K, Tq, Tk]`` (a fully masked row gives zeros): ``[B, Tq, K, Dv]``."""
    b, tq, nh, _ = q.shape
    out = np.zeros((b, tq, nh, v.shape[-1]))
    for i in range(b):
        for h in range(nh):
            out[i, :, h] = _np_attention_vjp(
                q[i, :, h], k[i, :, h], v[i, :, h], mask4[i, h], np.zeros((tq, v.shape[-1]))
            )[0]
    return out


def _mask_cases(rng, b, nh, tq, tk):
    """Masks of every layout ``jax.nn.dot_product_attention`` broadcasts, each with the
    ``[B, K, Tq, Tk]`` mask it stands for; query row 1 sees no key in each."""

    def draw(*shape):
        m = rng.random(shape) < 0.6
        m[..., 1, :] = False  # a fully masked query row
        return m

    m2 = draw(tq, tk)
    mb1 = draw(b, 1, tq, tk)
    m1k = draw(1, nh, tq, tk)
    key_pad = rng.random((b, 1, 1, tk)) < 0.7
    key_pad[0] = False  # example 0 sees no key at all
    mbt = draw(b, tq, tk)  # [*B, Tq, Tk]: shared by the heads
    full = (b, nh, tq, tk)
    return [
        (m2, np.broadcast_to(m2, full)),
        (mb1, np.broadcast_to(mb1, full)),
        (m1k, np.broadcast_to(m1k, full)),
        (key_pad, np.broadcast_to(key_pad, full)),
        (mbt, np.broadcast_to(mbt[:, None], full)),
    ]


def test_batched_attention_masks_broadcast_over_leading_dims():
    """``[Tq, Tk]``, ``[B, 1, Tq, Tk]``, ``[1, K, Tq, Tk]``, ``[B, 1, 1, Tk]`` and
    ``[B, Tq, Tk]`` masks for ``q: [B, T, K, D]`` equal the float64 reference with the
    mask broadcast to ``[B, K, Tq, Tk]``; a fully masked row gives zeros, not NaN."""
    b, tq, tk, nh = 2, 4, 5, 3
    q, k, v = _randn(7, (b, tq, nh, 8), (b, tk, nh, 8), (b, tk, nh, 6))
    rng = np.random.default_rng(8)
    for mask, mask4 in _mask_cases(rng, b, nh, tq, tk):
        out, w = js.batched_dot_product_attention(q, k, v, jnp.asarray(mask), return_weights=True)
        want = _np_batched(_np(q), _np(k), _np(v), mask4)
        assert np.isfinite(np.asarray(out)).all(), mask.shape
        np.testing.assert_allclose(out, want, atol=2e-6, err_msg=str(mask.shape))
        no_key = np.swapaxes(~mask4.any(-1), 1, 2)  # [B, Tq, K]: rows that see no key
        assert no_key.any()
        np.testing.assert_array_equal(np.asarray(out)[no_key], 0.0)
        assert w.shape == (b, nh, tq, tk)
        np.testing.assert_array_equal(np.asarray(w)[~mask4], 0.0)
    # a bias broadcasts the same way: [1, K, Tq, Tk] equals it repeated over the batch
    bias = _randn(9, (1, nh, tq, tk))[0]
    got = js.batched_dot_product_attention(q, k, v, bias=bias)
    want = js.batched_dot_product_attention(q, k, v, bias=jnp.broadcast_to(bias, (b, nh, tq, tk)))
    np.testing.assert_allclose(got, want, atol=1e-6)
    # two batch dims and a [Tq, Tk] mask
    q2, k2, v2 = (a.reshape(1, *a.shape) for a in (q, k, v))
    m2 = jnp.asarray(_mask_cases(rng, b, nh, tq, tk)[0][0])
    got = js.batched_dot_product_attention(q2, k2, v2, m2)
    want = js.batched_dot_product_attention(q, k, v, jnp.broadcast_to(m2, (b, tq, tk)))
    np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_batched_attention_lengths_per_example():
    """``q_lengths``/``k_lengths: int[B]`` for ``q: [B, T, K, D]`` (shared by the heads)
    equal the float64 reference with the padding mask; length 0 gives zeros, not NaN;
    NaN in the padded rows reaches no output."""
    b, tq, tk, nh = 3, 4, 5, 2
    q, k, v = _randn(10, (b, tq, nh, 8), (b, tk, nh, 8), (b, tk, nh, 6))
    lq, lk = np.array([4, 2, 3]), np.array([5, 3, 0])
    pad = np.stack([_np_pad_mask(a, c, tq, tk) for a, c in zip(lq, lk, strict=True)])
    want = _np_batched(_np(q), _np(k), _np(v), np.broadcast_to(pad[:, None], (b, nh, tq, tk)))
    qp = _poison(q, (np.arange(tq)[None, :] < lq[:, None])[..., None].repeat(nh, -1), np.nan)
    kp = jnp.where(jnp.asarray(np.arange(tk)[None, :] < lk[:, None])[:, :, None, None], k, jnp.nan)
    got = js.batched_dot_product_attention(
        qp, kp, v, q_lengths=jnp.asarray(lq), k_lengths=jnp.asarray(lk)
    )
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(got)[2], 0.0)  # no valid key
    with pytest.raises(ValueError, match=r"^k_lengths: expected shape \[3\] \(the batch dims"):
        js.batched_dot_product_attention(q, k, v, k_lengths=jnp.ones((2,), jnp.int32))


@pytest.mark.parametrize("method", ["scan", "unrolled"])
def test_blockwise_lengths_per_example_broadcast_over_heads(method):
    """``blockwise_attention(k_lengths=int[B])`` for ``q: [B, K, T, D]`` equals the
    float64 reference with each example's length on every head (a length of 0 gives
    zeros, not NaN), and the same call with the lengths repeated per head."""
    b, nh, tq, tk = 3, 2, 5, 6
    q, k, v = _randn(11, (b, nh, tq, 4), (b, nh, tk, 4), (b, nh, tk, 3))
    lq, lk = np.array([5, 3, 2]), np.array([6, 0, 4])
    got = js.blockwise_attention(
        q,
        k,
        v,
        q_lengths=jnp.asarray(lq),
        k_lengths=jnp.asarray(lk),
        block_q=2,
        block_k=2,
        method=method,
    )
    for i in range(b):
        for h in range(nh):
            mask = _np_pad_mask(lq[i], lk[i], tq, tk)
            g = np.zeros((tq, 3))
            want = _np_attention_vjp(q[i, h], k[i, h], v[i, h], mask, g)[0]
            np.testing.assert_allclose(got[i, h], want, atol=2e-6)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_array_equal(np.asarray(got)[1], 0.0)
    per_head = js.blockwise_attention(
        q,
        k,
        v,
        q_lengths=jnp.asarray(np.repeat(lq[:, None], nh, 1)),
        k_lengths=jnp.asarray(np.repeat(lk[:, None], nh, 1)),
        block_q=2,
        block_k=2,
        method=method,
    )
    np.testing.assert_array_equal(got, per_head)


_QKV = _randn(12, (2, 3, 3, 4), (2, 4, 3, 4), (2, 4, 3, 5))  # [B, T, K, D], B=2 K=3 Tq=3 Tk=4


@settings(max_examples=20, deadline=None)
@given(
    layout=st.sampled_from(["[Tq, Tk]", "[B, Tq, Tk]", "[B, K, Tq, Tk]"]),
    ones=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_any_broadcastable_mask_equals_its_full_broadcast(layout, ones, seed):
    """Property: a mask of any accepted layout, each dim full or 1, gives what the same
    mask broadcast by hand to ``[B, K, Tq, Tk]`` gives (finite, zeros for rows that see
    no key)."""
    q, k, v = _QKV
    full = {"B": 2, "K": 3, "Tq": 3, "Tk": 4}
    dims = layout[1:-1].split(", ")
    shape = tuple(1 if one else full[d] for d, one in zip(dims, ones[-len(dims) :], strict=False))
    mask = np.random.default_rng(seed).random(shape) < 0.5
    four = {"[Tq, Tk]": mask[None, None], "[B, Tq, Tk]": mask[:, None]}.get(layout, mask)
    mask4 = np.broadcast_to(four, (2, 3, 3, 4))
    got = js.batched_dot_product_attention(q, k, v, jnp.asarray(mask))
    want = js.batched_dot_product_attention(q, k, v, jnp.asarray(mask4))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    no_key = np.swapaxes(~mask4.any(-1), 1, 2)  # [B, Tq, K]
    np.testing.assert_array_equal(np.asarray(got)[no_key], 0.0)
