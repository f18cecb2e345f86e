import _np_models as npm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js


def test_layer_norm_known_values():
    p = js.nn.LayerNorm().init(None, 4)
    x = jnp.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    y = js.nn.layer_norm(p, x)
    ref = (x[0] - 2.5) / np.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(y[0], ref, rtol=1e-5)
    np.testing.assert_allclose(y[1], 0.0, atol=1e-6)  # constant row: no NaN
    p2 = js.nn.LayerNormParams(jnp.full((4,), 2.0), jnp.full((4,), 0.5))
    np.testing.assert_allclose(js.nn.layer_norm(p2, x)[0], 2 * ref + 0.5, rtol=1e-5)
    # random scale and offset, against the reference, over a batch of rows
    p3 = npm.perturb(js.nn.LayerNorm().init(None, 16), seed=3)
    x3 = jax.random.normal(jax.random.key(4), (3, 5, 16)) * 3.0 + 1.0
    np.testing.assert_allclose(
        js.nn.layer_norm(p3, x3), npm.layer_norm(p3, x3), rtol=1e-5, atol=1e-5
    )
    yb = js.nn.layer_norm(p, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"x: expected last dim D=4, got float32\[2, 3\]"):
        js.nn.layer_norm(p, x[:, :3])


# the block under jit: one compile per call form, not one per eager operation
_block_jit = jax.jit(
    js.attention.transformer_block,
    static_argnames=("causal", "dropout_rate", "blockwise", "return_weights"),
)


@pytest.fixture
def block(key):
    return js.attention.TransformerBlock(4, mlp_size=24).init(key, 16)


def test_block_shapes_and_pre_ln_residual(block):
    x = jax.random.normal(jax.random.key(1), (9, 16))
    y, w = jax.jit(lambda x: js.attention.transformer_block(block, x, return_weights=True))(x)
    assert y.shape == (9, 16) and w.shape == (4, 9, 9)
    np.testing.assert_array_equal(np.triu(np.asarray(w[0]), 1), 0.0)  # causal by default
    # with the residual branches' output weights zeroed the block is the identity
    z = block._replace(
        attn=block.attn._replace(w_o=jnp.zeros_like(block.attn.w_o)),
        mlp_out=block.mlp_out._replace(w=jnp.zeros_like(block.mlp_out.w)),
    )
    np.testing.assert_allclose(_block_jit(z, x), x, atol=1e-6)


@pytest.fixture
def random_block(key):
    """Every weight and bias random and non-zero; the two layer norms random and different."""
    return npm.perturb(js.attention.TransformerBlock(4, mlp_size=24).init(key, 16), seed=5)


@pytest.mark.parametrize("case", ["causal", "length", "mask"])
def test_block_matches_reference(random_block, case):
    """The block against a NumPy float64 pre-LN block (tanh GELU, both residuals)."""
    p = random_block
    assert not np.allclose(p.ln1.scale, p.ln2.scale) and not np.allclose(p.ln1.bias, p.ln2.bias)
    x = jax.random.normal(jax.random.key(6), (9, 16))
    kw, rkw = {}, {}
    if case == "length":
        rkw = dict(length=6, causal=False)
        kw = dict(lengths=jnp.array(6), causal=False)
    elif case == "mask":
        mask = np.random.default_rng(7).random((9, 9)) < 0.5
        mask[:, 0] = True
        mask[3] = False  # a query row with every key masked: its attention is just b_o
        kw, rkw = dict(mask=jnp.asarray(mask), causal=False), dict(mask=mask, causal=False)
    y, w = js.attention.transformer_block(p, x, return_weights=True, **kw)
    want, want_w = npm.transformer_block(p, x, **rkw)
    if case == "length":  # padded positions (>= 6) are zeros, with zero attention rows
        np.testing.assert_array_equal(y[6:], 0.0)
        np.testing.assert_array_equal(w[:, 6:], 0.0)
        y, w, want, want_w = y[:6], w[:, :6], want[:6], want_w[:, :6]
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    if case == "causal":  # the blockwise attention path too
        y_b = js.attention.transformer_block(p, x, blockwise=True)
        np.testing.assert_allclose(y_b, want, rtol=1e-5, atol=1e-5)


def test_block_causality_by_gradients(block):
    t = 7
    x = jax.random.normal(jax.random.key(2), (t, 16))
    jac = jax.jit(jax.jacrev(lambda x: js.attention.transformer_block(block, x)))(x)
    infl = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [T_out, T_in]
    future = np.triu(np.ones((t, t), bool), k=1)
    assert (infl[future] == 0.0).all()
    assert (infl[~future] > 0).all()


def test_block_vmap_time_major_length_dropout_blockwise(block):
    xs = jax.random.normal(jax.random.key(3), (8, 2, 16))  # [T, B, D]
    f = jax.jit(jax.vmap(lambda x: js.attention.transformer_block(block, x), in_axes=1, out_axes=1))
    ys = f(xs)
    for b in range(2):
        np.testing.assert_allclose(ys[:, b], _block_jit(block, xs[:, b]), atol=1e-5)
    # length: keys past the length do not matter (causal: earlier outputs unchanged anyway;
    # non-causal: every valid output ignores the padding)
    x = xs[:, 0]
    x_pad = x.at[5:].set(50.0)
    a = _block_jit(block, x, lengths=jnp.array(5), causal=False)
    b_ = _block_jit(block, x_pad, lengths=jnp.array(5), causal=False)
    np.testing.assert_allclose(a[:5], b_[:5], atol=1e-5)
    # blockwise attention path equals the dense one
    np.testing.assert_allclose(_block_jit(block, x, blockwise=True), ys[:, 0], atol=1e-5)
    # dropout only with a key
    d1 = _block_jit(block, x, key=jax.random.key(0), dropout_rate=0.3)
    assert not np.allclose(d1, ys[:, 0])
    np.testing.assert_allclose(_block_jit(block, x, dropout_rate=0.3), ys[:, 0], atol=1e-5)


def test_block_errors(key):
    p = js.attention.TransformerBlock(2).init(key, 8)
    assert p.mlp_in.w.shape == (8, 32)
    with pytest.raises(ValueError, match=r"x: expected shape \[T, D=8\], got float32\[3, 6\]"):
        js.attention.transformer_block(p, jnp.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"x: expected rank 2"):
        js.attention.transformer_block(p, jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match=r"num_heads: expected a divisor of input_size=8, got 3"):
        js.attention.TransformerBlock(3).init(key, 8)


def test_layer_norm_one_vector_and_dtype():
    """``x: [..., D]`` includes a single vector ``[D]``; ``dtype`` is honoured by the init."""
    p = npm.perturb(js.nn.LayerNorm().init(None, 4), seed=8)
    x = jnp.array([1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(js.nn.layer_norm(p, x), npm.layer_norm(p, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^x: expected rank >= 1"):
        js.nn.layer_norm(p, jnp.float32(1.0))
    pb = js.nn.LayerNorm().init(None, 4, dtype=jnp.bfloat16)
    assert pb.scale.dtype == jnp.bfloat16 and pb.bias.dtype == jnp.bfloat16


def test_block_init_dtype_key_and_residual_scaling(key):
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key"):
        js.attention.TransformerBlock(2).init(None, 8)
    p = js.attention.TransformerBlock(4, mlp_size=96).init(key, 64, dtype=jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves_with_path(p)
    assert all(a.dtype == jnp.bfloat16 for _, a in leaves), [
        (jax.tree_util.keystr(k), a.dtype) for k, a in leaves if a.dtype != jnp.bfloat16
    ]
    # the residual branches' output projections start 1/sqrt(2) smaller than LeCun normal
    # (std 1/sqrt(fan_in)); the input projections are plain LeCun normal
    std = lambda a, fan_in: np.std(np.asarray(a, np.float64)) * np.sqrt(fan_in)
    rel = {
        "w_q": std(p.attn.w_q, 64) / 1.0,
        "w_o": std(p.attn.w_o, 64) / 0.5**0.5,
        "mlp_in": std(p.mlp_in.w, 64) / 1.0,
        "mlp_out": std(p.mlp_out.w, 96) / 0.5**0.5,
    }
    assert all(abs(r - 1) < 0.1 for r in rel.values()), rel


def test_block_object_and_attention_hook(key):
    """``TransformerBlock.apply`` is ``transformer_block`` with the config's settings, and
    ``apply_with_attention`` around a plain causal attention (head-major, over a batch
    dim) equals it."""
    blk = js.attention.TransformerBlock(num_heads=2, mlp_size=12, dropout_rate=0.2)
    p = npm.perturb(blk.init(key, 8), seed=6)
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    k = jax.random.key(2)
    # under jit (one compile per side, not one per eager operation); bit for bit
    np.testing.assert_array_equal(
        jax.jit(lambda p, x1: blk.apply(p, x1, key=k))(p, x[0]),
        jax.jit(
            lambda p, x1: js.attention.transformer_block(
                p, x1, key=k, dropout_rate=0.2, causal=True
            )
        )(p, x[0]),
    )
    causal = jnp.tril(jnp.ones((5, 5), bool))

    def attend(q, k, v):  # [B, K, T, Dh]
        s = jnp.einsum("bktd,bksd->bkts", q, k) / np.sqrt(q.shape[-1])
        w = jax.nn.softmax(jnp.where(causal, s, -1e30), axis=-1)
        return jnp.einsum("bkts,bksd->bktd", w, v)

    got = jax.jit(lambda p, x: blk.apply_with_attention(p, x, attend))(p, x)
    want = jax.jit(lambda p, x: jax.vmap(lambda x1: blk.apply(p, x1))(x))(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^num_heads: expected a divisor of input_size=8, got 3"):
        js.attention.TransformerBlock(3).init(key, 8)
    with pytest.raises(ValueError, match=r"^dropout_rate: expected"):
        js.attention.TransformerBlock(2, dropout_rate=1.5)


def test_transformer_lm_runs_the_attention_block(key):
    """From an empty cache, a learned-position ``TransformerLM`` is embedding + positions,
    then ``model.block.apply`` (the attention package's block, one example at a time) per
    layer, then the final layer norm and the head."""
    lm = js.models.transformer_lm(
        13, num_layers=2, d_model=8, num_heads=2, max_len=8, positions="learned"
    )
    params = npm.perturb(lm.init(key), seed=7)
    tokens = jax.random.randint(jax.random.key(3), (6, 3), 0, 13)  # [T, B]
    _, logits = jax.jit(lambda p, t: lm.apply(p, None, t))(params, tokens)

    @jax.jit  # one compile, not one per eager operation
    def by_hand(params, tokens):
        x = params.embedding[tokens.T] + params.positions[None, :6]  # [B, T, D]
        for bp in params.blocks:
            x = jax.vmap(lambda x1, bp=bp: lm.block.apply(bp, x1))(x)
        return js.nn.dense(params.head, js.nn.layer_norm(params.ln_f, x))

    want = by_hand(params, tokens)
    np.testing.assert_allclose(logits, jnp.swapaxes(want, 0, 1), rtol=1e-4, atol=1e-5)
    assert lm.block == js.attention.TransformerBlock(2, None, causal=True)
