import re

import _np_models as npm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxseq as js
from jaxseq import attention as att


def _rand(key, *shapes, dtype=jnp.float32):
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]


def _bf16_qkv(seed, tq, tk, dk=16, dv=8):
    """bfloat16 q, k, v whose scores share a large offset (64) per row and differ by O(1)
    across keys: float32 scores are right to ~4e-6 (so the weights to a few 1e-6 relative),
    bfloat16 scores (spacing 0.5 at 64) move each weight by ~10%. ``dk=16`` makes the
    default scale 1/4 exact."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((tq, dk)), rng.standard_normal((tk, dk))
    q[:, 0] = k[:, 0] = 16.0
    v = rng.standard_normal((tk, dv))
    return [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]


def _assert_bf16_close(out, want, v):
    """``out`` (bfloat16) within what its own rounding allows: half a bfloat16 step of the
    result plus the rounding of the weights to bfloat16 before ``@ v`` (2^-9 of the
    column's largest ``|v|``), doubled. Both sides are divided by that ``|v|`` per column,
    so the absolute tolerance is per column."""
    assert out.dtype == jnp.bfloat16
    vmax = np.max(np.abs(np.asarray(v, np.float64)), axis=0)[None]
    got = np.asarray(out, np.float64) / vmax
    np.testing.assert_allclose(got, want / vmax, rtol=2**-8, atol=2**-8)


# -- dense attention ------------------------------------------------------------------


def test_dot_product_attention_matches_numpy(key):
    q, k, v, b = _rand(key, (5, 8), (7, 8), (7, 3), (5, 7))
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (5, 7)).at[:, 0].set(True)
    out = js.dot_product_attention(q, k, v, mask, bias=b, scale=0.3)
    want, want_w = npm.attention(q, k, v, np.asarray(mask), b, scale=0.3)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    w = att.attention_weights(q, k, mask, bias=b, scale=0.3)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    # causal flag == explicit causal mask; default scale is 1/sqrt(Dk)
    out_c = js.dot_product_attention(q[:5], k[:5], v[:5], causal=True)
    want_c, _ = npm.attention(q[:5], k[:5], v[:5], np.tril(np.ones((5, 5), bool)))
    np.testing.assert_allclose(out_c, want_c, rtol=1e-5, atol=1e-5)


def test_jit_equals_no_jit(key):
    q, k, v = _rand(key, (6, 4), (6, 4), (6, 4))
    f = lambda q, k, v: js.dot_product_attention(q, k, v, causal=True)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), f(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_batched_equals_jax_nn(key, causal):
    b, t, h, d = 3, 10, 2, 8
    q, k, v = _rand(key, (b, t, h, d), (b, t, h, d), (b, t, h, d))
    kv_len = jnp.array([10, 4, 1])
    mask = js.masks.padding_mask(None, kv_len, t, t)  # [B, Tq, Tk]
    ours = jax.jit(lambda q, k, v, m: js.batched_dot_product_attention(q, k, v, m, causal=causal))
    out = ours(q, k, v, mask)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_len)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # query padding: rows past the query length are zeros here; valid rows agree with jax.nn
    q_len = jnp.array([10, 6, 3])
    mask_q = js.masks.padding_mask(q_len, kv_len, t, t)
    out_q = ours(q, k, v, mask_q)
    ref_q = jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, query_seq_lengths=q_len, key_value_seq_lengths=kv_len
    )
    valid = np.asarray(js.masks.length_mask(q_len, t))[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, out_q, 0), np.where(valid, ref_q, 0), atol=1e-5)
    np.testing.assert_array_equal(np.where(valid, 0, out_q), 0)


def test_vmap_over_batch_and_heads_equals_loops(key):
    b, t, h, d = 2, 5, 3, 4
    q, k, v = _rand(key, (b, t, h, d), (b, 7, h, d), (b, 7, h, 2))
    mask = jax.random.bernoulli(jax.random.key(3), 0.6, (b, h, t, 7))
    out, w = jax.jit(
        lambda q, k, v, m: js.batched_dot_product_attention(q, k, v, m, return_weights=True)
    )(q, k, v, mask)
    assert out.shape == (b, t, h, 2) and w.shape == (b, h, t, 7)
    out = np.asarray(out)
    one = jax.jit(js.dot_product_attention)
    qn, kn, vn, mn = (np.asarray(a) for a in (q, k, v, mask))  # slice in NumPy: one compile
    for i in range(b):
        for j in range(h):
            o1 = one(qn[i, :, j], kn[i, :, j], vn[i, :, j], mn[i, j])
            np.testing.assert_allclose(out[i, :, j], o1, rtol=1e-6, atol=1e-6)
    # the documented vmap idiom
    per_head = jax.vmap(js.dot_product_attention, in_axes=(1, 1, 1), out_axes=1)
    out_nomask = jax.jit(js.batched_dot_product_attention)
    idiom = jax.jit(jax.vmap(per_head))(q, k, v)
    np.testing.assert_allclose(idiom, np.asarray(out_plain := out_nomask(q, k, v)), atol=1e-6)
    assert out_plain.shape == (b, t, h, 2)


def test_fully_masked_rows_are_zero_in_values_and_grads(key):
    q, k, v = _rand(key, (4, 3), (5, 3), (5, 2))
    mask = jnp.ones((4, 5), bool).at[1].set(False).at[3].set(False)

    def loss(q, k, v):
        return jnp.sum(js.dot_product_attention(q, k, v, mask) ** 2)

    out = js.dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[3], 0.0)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(grads[0][1], 0.0)
    np.testing.assert_array_equal(grads[0][3], 0.0)
    # every key masked: all zero, gradients zero
    none = jnp.zeros((4, 5), bool)
    np.testing.assert_array_equal(js.dot_product_attention(q, k, v, none), 0.0)
    g0 = jax.grad(lambda q, k, v: js.dot_product_attention(q, k, v, none).sum(), (0, 1, 2))(q, k, v)
    for g in g0:
        np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_inputs_scores_and_softmax_in_float32():
    """bfloat16 q, k, v: the weights are those of float32 arithmetic on the same values."""
    q, k, v = _bf16_qkv(0, 24, 64)
    mask = np.ones((24, 64), bool)
    mask[3, :] = False  # a fully masked row
    mask[:, 50:] = False
    want, want_w = npm.attention(q, k, v, mask, causal=True)
    w = att.attention_weights(q, k, jnp.asarray(mask), causal=True)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(w, want_w, rtol=5e-5, atol=1e-7)
    _assert_bf16_close(js.dot_product_attention(q, k, v, jnp.asarray(mask), causal=True), want, v)
    want_n, want_nw = npm.attention(q, k, v)
    np.testing.assert_allclose(att.attention_weights(q, k), want_nw, rtol=5e-5, atol=1e-7)
    _assert_bf16_close(js.dot_product_attention(q, k, v), want_n, v)


def _causality_check(fn, t, d):
    x = jax.random.normal(jax.random.key(7), (t, d))
    jac = jax.jit(jax.jacrev(fn))(x)  # [T, D_out, T, D]
    jac = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [T_out, T_in]
    future = np.triu(np.ones((t, t), bool), k=1)
    assert (jac[future] == 0.0).all()
    assert (jac[~future] > 0).sum() > t  # the past does influence the output


def test_causality_by_gradients(key):
    kq, kk, kv = _rand(key, (4, 4), (4, 4), (4, 4))
    _causality_check(lambda x: js.dot_product_attention(x @ kq, x @ kk, x @ kv, causal=True), 9, 4)
    _causality_check(
        lambda x: js.blockwise_attention(x @ kq, x @ kk, x @ kv, causal=True, block_q=4, block_k=2),
        9,
        4,
    )


def test_check_grads_dense(key):
    with jax.enable_x64(True):
        q, k, v = (np.asarray(a, np.float64) for a in _rand(key, (4, 3), (5, 3), (5, 2)))
        mask = np.ones((4, 5), bool)
        mask[2, 1:] = False
        f = lambda q, k, v: js.dot_product_attention(q, k, v, jnp.asarray(mask))
        check_grads(jax.jit(f), (q, k, v), order=2, modes=["rev"], eps=1e-4)


def test_dense_gradients_equal_the_weights_formula_with_mask_bias_and_empty_rows(key):
    """dot_product_attention's gradients against autodiff of the weights' formula
    (attention_weights @ v), float64, with a mask, a bias, causal masking and a query row
    that sees no key; both autodiff modes by check_grads."""
    with jax.enable_x64(True):
        q, k, v = (np.asarray(a, np.float64) for a in _rand(key, (4, 3), (5, 3), (5, 2)))
        bias = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (4, 5)), np.float64)
        mask = np.ones((4, 5), bool)
        mask[2] = False  # sees no key: zeros, and no gradient through it
        mask[1, 3] = False
        m = jnp.asarray(mask)

        def fast(q, k, v, b):
            return js.dot_product_attention(q, k, v, m, bias=b, causal=True,
                                            causal_alignment="bottom_right")  # fmt: skip

        def slow(q, k, v, b):
            w = att.attention_weights(q, k, m, bias=b, causal=True, causal_alignment="bottom_right")
            return w @ v

        def loss(f):
            return lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.arange(1.0, 3.0)[None])

        np.testing.assert_allclose(fast(q, k, v, bias), slow(q, k, v, bias), atol=1e-12)
        assert np.all(np.asarray(fast(q, k, v, bias))[2] == 0)
        got = jax.grad(loss(fast), (0, 1, 2, 3))(q, k, v, bias)
        want = jax.grad(loss(slow), (0, 1, 2, 3))(q, k, v, bias)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-12)
        check_grads(jax.jit(fast), (q, k, v, bias), order=2, modes=["rev"], eps=1e-4)
        check_grads(jax.jit(fast), (q, k, v, bias), order=1, modes=["fwd"], eps=1e-4)
        # batched (vmapped) path too
        qb, kb, vb = (np.stack([a, a[::-1] * 0.5]) for a in (q, k, v))
        f_b = lambda q, k, v: js.batched_dot_product_attention(  # noqa: E731
            q[:, :, None], k[:, :, None], v[:, :, None], m, causal=True
        )[:, :, 0]
        s_b = jax.vmap(lambda q, k, v: att.attention_weights(q, k, m, causal=True) @ v)
        gb = jax.grad(lambda *a: jnp.sum(jnp.sin(f_b(*a))), (0, 1, 2))(qb, kb, vb)
        wb = jax.grad(lambda *a: jnp.sum(jnp.sin(s_b(*a))), (0, 1, 2))(qb, kb, vb)
        for g, w in zip(gb, wb):
            np.testing.assert_allclose(g, w, atol=1e-12)


# -- blockwise ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scan", "unrolled"])
@pytest.mark.parametrize(
    "tq,tk,bq,bk", [(13, 13, 4, 8), (9, 14, 4, 3), (14, 9, 5, 4), (6, 6, 32, 32)]
)
def test_blockwise_equals_dense_values_and_grads(key, tq, tk, bq, bk, method):
    """Values and all three gradients, causal and not, T not a multiple of the blocks."""
    q, k, v, g = _rand(key, (2, tq, 8), (2, tk, 8), (2, tk, 5), (2, tq, 5))

    @jax.jit
    def both(q, k, v, g):
        res = []
        for causal in (False, True):
            dense = jax.vmap(lambda q, k, v, c=causal: js.dot_product_attention(q, k, v, causal=c))
            blk = lambda q, k, v, c=causal: js.blockwise_attention(
                q, k, v, causal=c, block_q=bq, block_k=bk, method=method
            )
            for f in (dense, blk):
                o, vjp = jax.vjp(f, q, k, v)
                res.append((o, *vjp(g)))
        return res

    d0, b0, d1, b1 = both(q, k, v, g)
    for dense, blk in ((d0, b0), (d1, b1)):
        for xb, xd in zip(blk, dense):
            np.testing.assert_allclose(xb, xd, atol=5e-6, rtol=1e-5)


def test_blockwise_batch_dims_vmap_and_scale(key):
    q, k, v = _rand(key, (2, 3, 10, 4), (2, 3, 10, 4), (2, 3, 10, 6))
    out = jax.jit(
        lambda q, k, v: js.blockwise_attention(
            q, k, v, causal=True, block_q=4, block_k=4, scale=0.7
        )
    )(q, k, v)
    assert out.shape == (2, 3, 10, 6)
    ref = jax.jit(
        jax.vmap(
            jax.vmap(lambda a, b, c: js.dot_product_attention(a, b, c, causal=True, scale=0.7))
        )
    )(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    one = lambda a, b, c: js.blockwise_attention(
        a, b, c, causal=True, block_q=4, block_k=4, scale=0.7
    )
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.vmap(one)))(q, k, v), ref, atol=2e-6)
    # the flattened batch (6 rows) in chunks of 2 through a lax.map
    chunked = jax.jit(
        lambda q, k, v: js.blockwise_attention(
            q, k, v, causal=True, block_q=4, block_k=4, scale=0.7, batch_chunk=2
        )
    )
    np.testing.assert_allclose(chunked(q, k, v), ref, atol=2e-6)
    with pytest.raises(ValueError, match=r"batch_chunk: expected a divisor of .* size 6, got 4"):
        js.blockwise_attention(q, k, v, batch_chunk=4)
    # per-example (no batch dims)
    np.testing.assert_allclose(jax.jit(one)(q[0, 0], k[0, 0], v[0, 0]), ref[0, 0], atol=2e-6)


@pytest.mark.parametrize("method", ["scan", "unrolled"])
def test_blockwise_bfloat16_inputs_softmax_in_float32(method):
    """bfloat16 q, k, v: running max, normaliser and scores in float32 (scan and unrolled)."""
    q, k, v = _bf16_qkv(1, 24, 64)
    for causal in (False, True):
        want, _ = npm.attention(q, k, v, causal=causal)
        out = js.blockwise_attention(q, k, v, causal=causal, block_q=8, block_k=16, method=method)
        _assert_bf16_close(out, want, v)


def test_blockwise_bfloat16_grads(key):
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in _rand(key, (12, 8), (12, 8), (12, 8)))
    g = jax.grad(
        lambda q: (
            js.blockwise_attention(q, kb, vb, causal=True, block_q=4).sum().astype(jnp.float32)
        )
    )(qb)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


@pytest.mark.parametrize("method", ["scan", "unrolled"])
def test_check_grads_blockwise(key, method):
    with jax.enable_x64(True):
        q, k, v = (np.asarray(a, np.float64) for a in _rand(key, (7, 3), (7, 3), (7, 2)))
        f = lambda q, k, v: js.blockwise_attention(
            q, k, v, causal=True, block_q=3, block_k=2, method=method
        )
        check_grads(jax.jit(f), (q, k, v), order=1, modes=["rev"], eps=1e-4)


@pytest.mark.parametrize("method", ["scan", "unrolled"])
def test_blockwise_memory_is_blocked(method):
    """The compiled program never holds a [T, T] score matrix (forward and backward)."""
    t, d = 256, 8

    def loss(q, k, v):
        return js.blockwise_attention(
            q, k, v, causal=True, block_q=32, block_k=32, method=method
        ).sum()

    x = jax.ShapeDtypeStruct((t, d), jnp.float32)
    hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).as_text()
    assert f"{t}x{t}x" not in hlo
    dense = lambda q, k, v: js.dot_product_attention(q, k, v, causal=True).sum()
    assert f"{t}x{t}x" in jax.jit(jax.grad(dense, (0, 1, 2))).lower(x, x, x).as_text()


def test_blockwise_skips_masked_causal_blocks():
    """Causal blockwise runs about half the block pairs of non-causal (counted via the loops)."""

    def count(causal, nq, nk, bq, bk, tk):
        total = 0
        for i in range(nq):
            n_full, n_end = att.blockwise._k_range(i, causal=causal, bq=bq, bk=bk, tk=tk, nk=nk)
            total += int(n_end)
        return total

    assert count(False, 8, 8, 16, 16, 128) == 64
    assert count(True, 8, 8, 16, 16, 128) == 36  # 8 * 9 / 2
    # the backward loops visit exactly the same pairs
    nq = 8
    pairs = sum(
        nq - int(att.blockwise._q_range(j, causal=True, bq=16, bk=16, tk=128, nq=nq)[0])
        for j in range(8)
    )
    assert pairs == 36


def test_blockwise_unrolled_skips_masked_keys():
    """The unrolled schedule scores each query block only against the keys it can see."""
    t, b = 96, 32
    x = jax.ShapeDtypeStruct((t, 8), jnp.float32)

    def loss(q, k, v):
        return js.blockwise_attention(q, k, v, causal=True, block_q=b, method="unrolled").sum()

    hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).as_text()
    for end in (32, 64, 96):
        assert f"tensor<1x{b}x{end}xf32>" in hlo
    # without causal every block sees all keys
    full = lambda q, k, v: js.blockwise_attention(q, k, v, block_q=b, method="unrolled").sum()
    hlo = jax.jit(jax.grad(full, (0, 1, 2))).lower(x, x, x).as_text()
    assert f"tensor<1x{b}x32xf32>" not in hlo and f"tensor<1x{b}x96xf32>" in hlo


# -- errors ---------------------------------------------------------------------------


def test_shape_errors_name_expected_and_actual(key):
    q, k, v = _rand(key, (4, 8), (5, 8), (5, 3))
    with pytest.raises(ValueError, match=r"q: expected shape \[Tq, Dk=8\].*float32\[4, 7\]"):
        js.dot_product_attention(q[:, :7], k, v)
    with pytest.raises(ValueError, match=r"v: expected shape \[Tk=5, Dv\].*float32\[4, 3\]"):
        js.dot_product_attention(q, k, v[:4])
    with pytest.raises(ValueError, match=r"mask: expected shape \[Tq=4, Tk=5\], got bool\[5, 4\]"):
        js.dot_product_attention(q, k, v, jnp.ones((5, 4), bool))
    with pytest.raises(TypeError, match=r"mask: expected dtype bool"):
        js.dot_product_attention(q, k, v, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"q: expected rank 2"):
        js.dot_product_attention(q[None], k, v)
    with pytest.raises(ValueError, match=r"k: expected shape \[2, 'Tk', 8\].*float32\[3, 5, 8\]"):
        js.blockwise_attention(jnp.zeros((2, 4, 8)), jnp.zeros((3, 5, 8)), jnp.zeros((3, 5, 2)))
    with pytest.raises(ValueError, match=r"block_q: expected a positive int, got 0"):
        js.blockwise_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match=r"method: expected 'auto', 'scan' or 'unrolled'"):
        js.blockwise_attention(q, k, v, method="flash")
    with pytest.raises(ValueError, match=r"k: expected shape \[2, 'Tk', 3, 4\]"):
        js.batched_dot_product_attention(
            jnp.zeros((2, 5, 3, 4)), jnp.zeros((2, 5, 2, 4)), jnp.zeros((2, 5, 2, 4))
        )


# -- multi-head -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["causal", "head_mask", "cross"])
def test_multi_head_attention_matches_reference(key, case):
    """Random non-zero weights and biases (b_q, b_k, b_v, b_o), against the NumPy reference.

    (``b_k`` adds ``q_i . b_k`` to a whole row of scores, which the softmax ignores: no
    output or weight depends on it.)"""
    dc = 5 if case == "cross" else None
    p = js.attention.MultiHeadAttention(2, 4, value_size=3, output_size=5).init(
        key, 6, context_size=dc
    )
    p = npm.perturb(p, seed=1)
    x, ctx = _rand(jax.random.key(1), (7, 6), (9, 5))
    ctx = None if case != "cross" else ctx
    tk = 7 if ctx is None else 9
    mask = None
    if case == "head_mask":
        mask = np.random.default_rng(2).random((2, 7, tk)) < 0.6
        mask[:, :, 0] = True
        mask[0, 4] = False  # one head's row with every key masked
    elif case == "cross":
        mask = np.broadcast_to(np.arange(tk) < 6, (7, tk))
    causal = case == "causal"
    out, w = js.attention.multi_head_attention(
        p, x, ctx, None if mask is None else jnp.asarray(mask), causal=causal, return_weights=True
    )
    assert out.shape == (7, 5) and w.shape == (2, 7, tk)
    want, want_w = npm.multi_head_attention(p, x, ctx, mask, causal=causal)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    if case == "causal":  # the blockwise path too
        out_b = js.attention.multi_head_attention(p, x, causal=True, blockwise=True)
        np.testing.assert_allclose(out_b, want, rtol=1e-5, atol=1e-5)


def test_multi_head_attention_bfloat16_softmax_in_float32():
    """bfloat16 inputs and weights: the returned weights are float32 arithmetic on the
    bfloat16 projections (identity projections here, so q, k, v are exactly the inputs)."""
    x, _, _ = _bf16_qkv(2, 16, 16, dk=32)
    ctx, _, _ = _bf16_qkv(3, 48, 48, dk=32)
    x = x.at[:, 16].set(16.0)  # head 1 gets the same large offset as head 0
    ctx = ctx.at[:, 16].set(16.0)
    eye = jnp.eye(32, dtype=jnp.bfloat16)
    p = js.attention.MultiHeadAttentionParams(
        eye.reshape(32, 2, 16), eye.reshape(32, 2, 16), eye.reshape(32, 2, 16),
        eye.reshape(2, 16, 32), None, None, None, None,
    )  # fmt: skip
    mask = np.broadcast_to(np.arange(48) < 40, (16, 48))
    out, w = js.attention.multi_head_attention(p, x, ctx, jnp.asarray(mask), return_weights=True)
    assert w.dtype == jnp.float32
    xn, cn = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
    for h in range(2):
        sl = slice(16 * h, 16 * (h + 1))
        want, want_w = npm.attention(xn[:, sl], cn[:, sl], cn[:, sl], mask)
        np.testing.assert_allclose(w[h], want_w, rtol=5e-5, atol=1e-7)
        _assert_bf16_close(out[:, sl], want, ctx[:, sl])


def test_multi_head_cross_attention_mask_dropout_and_vmap(key):
    p = js.attention.MultiHeadAttention(2, 3, use_bias=False).init(key, 4, context_size=5)
    assert p.b_q is None
    x, ctx = _rand(jax.random.key(2), (3, 4), (6, 5))
    mask = jnp.broadcast_to(jnp.arange(6) < 4, (3, 6))
    out, w = js.attention.multi_head_attention(p, x, ctx, mask, return_weights=True)
    assert out.shape == (3, 4)
    np.testing.assert_array_equal(w[..., 4:], 0.0)
    # padding beyond the mask does not change the result
    ctx2 = ctx.at[4:].set(100.0)
    np.testing.assert_allclose(js.attention.multi_head_attention(p, x, ctx2, mask), out, atol=1e-6)
    # dropout only with a key; deterministic given the key
    d1 = js.attention.multi_head_attention(p, x, ctx, mask, dropout_rate=0.5, key=jax.random.key(0))
    d2 = js.attention.multi_head_attention(p, x, ctx, mask, dropout_rate=0.5, key=jax.random.key(0))
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, out)
    np.testing.assert_array_equal(
        js.attention.multi_head_attention(p, x, ctx, mask, dropout_rate=0.5), out
    )
    # vmap over a batch == loop
    xb, cb = _rand(jax.random.key(4), (2, 3, 4), (2, 6, 5))
    ob = jax.vmap(lambda a, c: js.attention.multi_head_attention(p, a, c))(xb, cb)
    for i in range(2):
        np.testing.assert_allclose(
            ob[i], js.attention.multi_head_attention(p, xb[i], cb[i]), atol=1e-6
        )
    with pytest.raises(
        ValueError, match=r"context: expected shape \[Tk, Dc=5\], got float32\[6, 4\]"
    ):
        js.attention.multi_head_attention(p, x, ctx[:, :4])
    with pytest.raises(ValueError, match=r"x: expected rank 2"):
        js.attention.multi_head_attention(p, xb, ctx)


# -- additive / Luong -----------------------------------------------------------------


def test_additive_attention_matches_numpy_and_masks(key):
    p = js.attention.AdditiveAttention(5).init(key, 3, 4)
    p = npm.perturb(p, seed=2)
    qv, keys, vals = _rand(jax.random.key(1), (3,), (6, 4), (6, 2))
    ctx, w = js.attention.additive_attention(p, qv, keys, vals, lengths=jnp.array(4))
    want_ctx, want_w = npm.additive_attention(p, qv, keys, vals, length=4)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(w[4:], 0.0)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-6)
    # precomputed keys and several queries at once
    pk = att.additive_attention_keys(p, keys)
    ctx2, w2 = js.attention.additive_attention(
        p, jnp.stack([qv, qv]), keys, vals, lengths=jnp.array(4), projected_keys=pk
    )
    np.testing.assert_allclose(w2[1], w, rtol=1e-6)
    np.testing.assert_allclose(ctx2[0], ctx, rtol=1e-6)
    # empty source: zeros, finite grads
    c0, w0 = js.attention.additive_attention(p, qv, keys, vals, lengths=jnp.array(0))
    np.testing.assert_array_equal(w0, 0.0)
    np.testing.assert_array_equal(c0, 0.0)
    g = jax.grad(
        lambda q: js.attention.additive_attention(p, q, keys, lengths=jnp.array(0))[0].sum()
    )(qv)
    np.testing.assert_array_equal(g, 0.0)
    with pytest.raises(ValueError, match=r"query: expected shape \[3\], got float32\[4\]"):
        js.attention.additive_attention(p, jnp.zeros(4), keys)
    with pytest.raises(
        ValueError, match=r"keys: expected shape \[Tk=6, Dk=4\], got float32\[6, 3\]"
    ):
        js.attention.additive_attention(p, qv, keys[:, :3])


@pytest.mark.parametrize("score", ["dot", "general"])
def test_luong_attention(key, score):
    p = js.attention.LuongAttention(score=score).init(key, 4, 4)
    qv, keys = _rand(jax.random.key(1), (4,), (5, 4))
    ctx, w = js.attention.luong_attention(p, qv, keys, lengths=jnp.array(3))
    want_ctx, want_w = npm.luong_attention(p, qv, keys, length=3)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(w[3:], 0.0)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-6)
    # batched decoder step via vmap over (query, keys, length)
    qb, kb = _rand(jax.random.key(2), (2, 4), (2, 5, 4))
    lens = jnp.array([5, 2])
    cb, wb = jax.vmap(lambda q, k, n: js.attention.luong_attention(p, q, k, lengths=n))(
        qb, kb, lens
    )
    for i in range(2):
        c1, w1 = npm.luong_attention(p, qb[i], kb[i], length=lens[i])
        np.testing.assert_allclose(wb[i], w1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cb[i], c1, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"key_size: score='dot' needs key_size == query_size"):
        js.attention.LuongAttention(score="dot").init(key, 4, 3)
    with pytest.raises(ValueError, match=r"mask: expected shape \[Tk=5\], got bool\[4\]"):
        js.attention.luong_attention(p, qv, keys, mask=jnp.ones(4, bool))


def test_batched_bias_shared_and_per_head():
    """``bias`` ``[*B, Tq, Tk]`` (shared by the heads) or ``[*B, K, Tq, Tk]`` shifts the scores
    of each example and head, as in the NumPy reference."""
    b, tq, tk, h = 2, 3, 4, 2
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s) for s in ((b, tq, h, 4), (b, tk, h, 4), (b, tk, h, 2)))
    bh = 3.0 * rng.standard_normal((b, h, tq, tk))
    f = jax.jit(
        lambda q, k, v, bias: js.batched_dot_product_attention(
            q, k, v, bias=bias, return_weights=True
        )
    )
    for bias in (bh, bh[:, 0]):
        out, w = (np.asarray(a) for a in f(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, bias))))
        for i in range(b):
            for j in range(h):
                bij = bias[i, j] if bias.ndim == 4 else bias[i]
                want, want_w = npm.attention(q[i, :, j], k[i, :, j], v[i, :, j], bias=bij)
                np.testing.assert_allclose(w[i, j], want_w, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(out[i, :, j], want, rtol=1e-5, atol=1e-5)


def test_blockwise_grads_keep_the_input_dtype():
    """Gradients come back in the dtype of q, k, v for both schedules: bfloat16 for bfloat16
    inputs, and float32 (computed in float32: no float64 array in the program) for float32
    inputs even with x64 enabled."""
    for method in ("scan", "unrolled"):

        def loss(q, k, v, method=method):
            o = js.blockwise_attention(q, k, v, causal=True, block_q=4, block_k=4, method=method)
            return o.astype(jnp.float32).sum()

        x = jax.ShapeDtypeStruct((12, 8), jnp.bfloat16)
        grads = jax.eval_shape(jax.grad(loss, (0, 1, 2)), x, x, x)
        assert [g.dtype for g in grads] == [jnp.bfloat16] * 3, method
        with jax.enable_x64(True):
            x = jax.ShapeDtypeStruct((12, 8), jnp.float32)
            jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, x, x)
            assert [a.aval.dtype for a in jaxpr.jaxpr.outvars] == [jnp.float32] * 3, method
            assert not re.search(r"f64\[\d", str(jaxpr)), method


def test_encoder_attention_errors_name_the_argument(key):
    p = js.attention.AdditiveAttention(5).init(key, 3, 4)
    qv, keys, vals = _rand(jax.random.key(1), (3,), (6, 4), (6, 2))
    with pytest.raises(TypeError, match=r"^query: expected a floating dtype, got int32\[3\]"):
        js.attention.additive_attention(p, jnp.zeros(3, jnp.int32), keys)
    with pytest.raises(TypeError, match=r"^keys: expected a floating dtype, got int32\[6, 4\]"):
        js.attention.additive_attention(p, qv, jnp.zeros((6, 4), jnp.int32))
    with pytest.raises(
        ValueError, match=r"^values: expected shape \[Tk=6, Dv\], got float32\[5, 2\]"
    ):
        js.attention.additive_attention(p, qv, keys, vals[:5])
    with pytest.raises(
        ValueError, match=r"^projected_keys: expected shape \[Tk=6, A=5\], got float32\[6, 4\]"
    ):
        js.attention.additive_attention(p, qv, keys, projected_keys=jnp.zeros((6, 4)))
    with pytest.raises(
        ValueError, match=r"^keys: expected shape \[Tk, Dk=4\], got float32\[6, 3\]"
    ):
        att.additive_attention_keys(p, keys[:, :3])
    # Luong: the default score is "general" (a [Dq, Dk] matrix, so Dq != Dk is allowed)
    pl = js.attention.LuongAttention().init(key, 3, 4)
    assert pl.w.shape == (3, 4)
    with pytest.raises(
        ValueError, match=r"^score: expected one of \['dot', 'general'\], got 'cos'"
    ):
        js.attention.LuongAttention(score="cos").init(key, 3, 4)
    with pytest.raises(TypeError, match=r"^keys: expected a floating dtype"):
        js.attention.luong_attention(pl, qv, jnp.zeros((6, 4), jnp.int32))
    with pytest.raises(
        ValueError, match=r"^params\.w: expected shape \[Dq, Dk=4\], got float32\[3, 3\]"
    ):
        js.attention.luong_attention(js.attention.LuongAttentionParams(jnp.zeros((3, 3))), qv, keys)


def test_encoder_attention_init_honours_dtype(key):
    for p in (
        js.attention.AdditiveAttention(5).init(key, 3, 4, dtype=jnp.bfloat16),
        js.attention.LuongAttention().init(key, 3, 4, dtype=jnp.bfloat16),
        js.attention.MultiHeadAttention(2, 3).init(key, 4, dtype=jnp.bfloat16),
    ):
        leaves = jax.tree_util.tree_leaves(p)
        assert leaves and all(a.dtype == jnp.bfloat16 for a in leaves), p


def test_luong_general_bfloat16_rounds_the_projected_query():
    """bfloat16 inputs: ``q W`` is rounded to bfloat16 (the input dtype, as the projections of
    :func:`multi_head_attention`), then the scores and softmax run in float32. q and W are
    multiples of 1/8, so ``q W`` is exact in float32 but not in bfloat16."""
    rng = np.random.default_rng(11)
    q = rng.integers(-16, 17, (3, 16)) / 8
    w = rng.integers(-8, 9, (16, 16)) / 8
    keys = npm.bf16_round(rng.standard_normal((6, 16)))
    qw = q @ w
    assert not np.array_equal(npm.bf16_round(qw), qw)
    p = js.attention.LuongAttentionParams(jnp.asarray(w, jnp.bfloat16))
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    ctx, weights = js.attention.luong_attention(p, bf(q), bf(keys))
    assert weights.dtype == jnp.float32 and ctx.dtype == jnp.bfloat16
    want_w = npm.masked_softmax(npm.bf16_round(qw) @ keys.T)
    np.testing.assert_allclose(weights, want_w, rtol=1e-4, atol=1e-7)


def test_multi_head_attention_errors_name_the_argument(key):
    p = js.attention.MultiHeadAttention(1, 3).init(key, 4, context_size=5)
    x, ctx = _rand(jax.random.key(2), (3, 4), (6, 5))
    with pytest.raises(
        ValueError, match=r"^x: expected rank 2 \[Tq, Dq\] \(one example; vmap over a batch\)"
    ):
        js.attention.multi_head_attention(p, x[None], ctx)
    with pytest.raises(ValueError, match=r"^context: expected rank 2 \[Tk, Dc\]"):
        js.attention.multi_head_attention(p, x, ctx[None])
    # self-attention with parameters for a context of another size: x is what is wrong
    with pytest.raises(ValueError, match=r"^x: expected shape \[Tk, Dc=5\], got float32\[3, 4\]"):
        js.attention.multi_head_attention(p, x)
    with pytest.raises(ValueError, match=r"^mask: expected shape \[Tq=3, Tk=6\]"):
        js.attention.multi_head_attention(p, x, ctx, jnp.ones((3, 5), bool))
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key"):
        js.attention.multi_head_attention(p, x, ctx, dropout_rate=0.5, key=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"^params\.w_v: expected rank 3 \[Dc, K, Dv\]"):
        js.attention.multi_head_attention(p._replace(w_v=p.w_v[:, 0]), x, ctx)


def test_multi_head_attention_dropout_is_inverted():
    """Dropout on the weights keeps each with probability ``1 - rate`` and scales it by
    ``1 / (1 - rate)``: with one key (weight 1) and one head, no biases, the output is 0
    (dropped) or twice the output without dropout (rate 0.5)."""
    p = js.attention.MultiHeadAttention(1, 3, use_bias=False).init(jax.random.key(3), 4)
    x = jax.random.normal(jax.random.key(4), (1, 4))
    out = np.asarray(js.attention.multi_head_attention(p, x))
    f = jax.vmap(lambda k: js.attention.multi_head_attention(p, x, dropout_rate=0.5, key=k))
    drop = np.asarray(f(jax.random.split(jax.random.key(5), 16)))
    kept = np.abs(drop).sum(axis=(1, 2)) > 0
    assert 0 < kept.sum() < 16
    np.testing.assert_allclose(drop[kept], np.broadcast_to(2 * out, drop[kept].shape), rtol=1e-6)
    np.testing.assert_array_equal(drop[~kept], 0.0)


def test_multi_head_attention_bfloat16_rounds_the_projections():
    """bfloat16 inputs: k and v (and the heads' output before ``W_o``) are rounded to
    bfloat16 like the input, the scores run in float32. Inputs and weights are small dyadic
    numbers, so every float32 product below is exact; ``u = 2**-9``, half the bfloat16
    spacing in [1, 2)."""
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    u = 2.0**-9
    ctx = bf([[1.0, 3.0], [1.0, 6.0]])
    w_q = bf([[1.0], [0.0]]).reshape(2, 1, 1)
    w_dyadic = bf([[1.0], [u]]).reshape(2, 1, 1)  # rows -> 1 + 3u, 1 + 6u
    # keys 1 + 3u, 1 + 6u round to 1 + 4u, 1 + 8u: with q = 64 the scores are 64.5 and 65
    p = js.attention.MultiHeadAttentionParams(
        w_q, w_dyadic, w_dyadic, bf([[[1.0]]]), None, None, None, None
    )
    _, w = js.attention.multi_head_attention(p, bf([[64.0, 0.0]]), ctx, return_weights=True)
    np.testing.assert_allclose(w[0, 0], npm.masked_softmax(np.array([64.5, 65.0])), rtol=1e-6)
    # equal keys (weights exactly 1/2), values 1 + 3u, 1 + 6u rounded to 1 + 4u, 1 + 8u:
    # head output 1 + 6u, rounded to 1 + 8u (tie to even), times W_o = 3: 3 + 24u exactly
    # (unrounded values would give 1 + 4.5u; an unrounded head output 3 + 18u -> 3 + 16u)
    p = p._replace(w_k=w_q, w_o=bf([[[3.0]]]))
    out = js.attention.multi_head_attention(p, bf([[1.0, 0.0]]), ctx)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float64), [[3.0 + 24 * u]])


def test_blockwise_backward_masks_only_the_diagonal_blocks():
    """Causal backward: for key block ``j`` the query blocks ``[start, full)`` are those that
    hold a masked entry and a visible one, ``[full, nq)`` those with no masked entry."""
    for bq, bk in ((16, 16), (4, 8), (8, 4), (3, 5)):
        tk = 4 * bk
        nq = -(-tk // bq)
        for j in range(4):
            start, full = (
                int(a) for a in att.blockwise._q_range(j, causal=True, bq=bq, bk=bk, tk=tk, nq=nq)
            )
            rows = np.arange(nq * bq).reshape(nq, bq)[:, :, None]
            vis = rows >= np.arange(j * bk, (j + 1) * bk)[None, None, :]  # [nq, bq, bk]
            partial = [i for i in range(nq) if vis[i].any() and not vis[i].all()]
            assert list(range(start, full)) == partial, (bq, bk, j)
            assert all(vis[i].all() for i in range(full, nq)), (bq, bk, j)


def test_blockwise_unrolled_forward_skips_masked_keys():
    """The forward pass alone (no gradient) also scores each causal query block only against
    the keys up to its last row."""
    x = jax.ShapeDtypeStruct((96, 8), jnp.float32)
    f = lambda q, k, v: js.blockwise_attention(q, k, v, causal=True, block_q=32, method="unrolled")
    hlo = jax.jit(f).lower(x, x, x).as_text()
    for end in (32, 64, 96):
        assert f"tensor<1x32x{end}xf32>" in hlo


def test_qkv_errors_name_the_argument_and_layout():
    """Bad q, k or v: the error names the argument and the layout expected."""
    q = jnp.zeros((3, 4))
    with pytest.raises(TypeError, match=r"^q: expected an array"):
        js.dot_product_attention([[0.0] * 4] * 3, q, q)
    with pytest.raises(TypeError, match=r"^q: expected a floating"):
        js.dot_product_attention(jnp.zeros((3, 4), jnp.int32), q, q)
    for i, (name, layout) in enumerate((("q", "[Tq, Dk]"), ("k", "[Tk, Dk]"), ("v", "[Tk, Dv]"))):
        args = [q, q, q]
        args[i] = jnp.zeros((1, 3, 4))
        with pytest.raises(ValueError, match=rf"^{name}: expected rank 2 {re.escape(layout)}"):
            js.dot_product_attention(*args)


def test_mask_and_bias_shapes_are_checked_by_one_rule(key):
    """Batched and multi-head attention take a mask/bias shared by the heads or per head,
    and both name the argument with the two accepted shapes when given anything else."""
    q, k, v = _rand(key, (2, 3, 4, 8), (2, 5, 4, 8), (2, 5, 4, 6))
    bad = jnp.ones((2, 3, 3, 5), bool)
    with pytest.raises(
        ValueError,
        match=r"^mask: expected shape \[2, Tq=3, Tk=5\] or \[2, K=4, Tq=3, Tk=5\] "
        r"\(or one that broadcasts to it: .*\), got bool\[2, 3, 3, 5\]",
    ):
        js.batched_dot_product_attention(q, k, v, mask=bad)
    with pytest.raises(ValueError, match=r"^bias: expected shape \[2, Tq=3, Tk=5\] or"):
        js.batched_dot_product_attention(q, k, v, bias=jnp.zeros((2, 5, 3)))
    p = js.attention.MultiHeadAttention(4, 2).init(key, 8)
    x = jnp.ones((3, 8))
    with pytest.raises(
        ValueError, match=r"^bias: expected shape \[Tq=3, Tk=3\] or \[K=4, Tq=3, Tk=3\]"
    ):
        js.attention.multi_head_attention(p, x, bias=jnp.zeros((2, 3, 3)))
    # a per-head mask that masks head h's key h equals masking that key by hand
    per_head = jnp.ones((4, 3, 3), bool).at[jnp.arange(3), :, jnp.arange(3)].set(False)
    _, w = js.attention.multi_head_attention(p, x, mask=per_head, return_weights=True)
    for h in range(3):
        np.testing.assert_array_equal(w[h, :, h], 0.0)
        np.testing.assert_allclose(w[h].sum(-1), 1.0, rtol=1e-6)


def test_more_errors_name_the_argument():
    """bias, v and blockwise inputs: the error names the argument it is about."""
    q = jnp.zeros((3, 4))
    with pytest.raises(TypeError, match=r"^v: expected an array"):
        js.dot_product_attention(q, q, [[0.0] * 4] * 3)
    with pytest.raises(TypeError, match=r"^bias: expected a floating"):
        js.attention.attention_weights(q, q, bias=jnp.zeros((3, 3), jnp.int32))
    for i, name in enumerate("qkv"):
        args = [jnp.zeros((2, 3, 4))] * 3
        args[i] = jnp.zeros((4,))
        with pytest.raises(ValueError, match=rf"^{name}: expected rank >= 2 \[\*B, T, D\]"):
            js.blockwise_attention(*args)


def test_attention_objects_apply_their_functions_and_check_params(key):
    """``MultiHeadAttention``, ``AdditiveAttention``, ``LuongAttention``: one example per
    ``apply`` (equal to the function beneath), ``vmap`` over a batch equals a loop, and
    params of another config are refused naming the setting."""
    mha = js.attention.MultiHeadAttention(num_heads=2, key_size=3, value_size=4, output_size=5)
    p = npm.perturb(mha.init(key, 6, context_size=7), seed=2)
    assert (p.w_q.shape, p.w_k.shape, p.w_v.shape, p.w_o.shape) == (
        (6, 2, 3),
        (7, 2, 3),
        (7, 2, 4),
        (2, 4, 5),
    )
    x, ctx = _rand(jax.random.key(1), (4, 3, 6), (4, 5, 7))
    y = mha.apply(p, x[0], ctx[0], causal=True)
    np.testing.assert_array_equal(
        y, js.attention.multi_head_attention(p, x[0], ctx[0], causal=True)
    )
    ys = jax.vmap(lambda a, c: mha.apply(p, a, c))(x, ctx)
    for b in range(4):
        np.testing.assert_allclose(ys[b], mha.apply(p, x[b], ctx[b]), rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"^params: expected num_heads=3 .*got params with num_heads=2"
    ):
        js.attention.MultiHeadAttention(num_heads=3, key_size=3).apply(p, x[0], ctx[0])
    add = js.attention.AdditiveAttention(5)
    pa = add.init(key, 6, 7)
    got = add.apply(pa, x[0], ctx[0], lengths=3)
    want = js.attention.additive_attention(pa, x[0], ctx[0], lengths=3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(
        add.project_keys(pa, ctx[0]), js.attention.additive_attention_keys(pa, ctx[0])
    )
    with pytest.raises(ValueError, match=r"^params\.v: expected shape \[A=4\]"):
        js.attention.AdditiveAttention(4).apply(pa, x[0], ctx[0])
    lu = js.attention.LuongAttention()
    pl = lu.init(key, 6, 7)
    np.testing.assert_array_equal(
        lu.apply(pl, x[0], ctx[0])[0], js.attention.luong_attention(pl, x[0], ctx[0])[0]
    )
    with pytest.raises(ValueError, match=r"^params\.w: expected None for score='dot'"):
        js.attention.LuongAttention(score="dot").apply(pl, x[0], ctx[0])
    with pytest.raises(ValueError, match=r"^num_heads: expected a positive int, got 0"):
        js.attention.MultiHeadAttention(num_heads=0, key_size=3)
