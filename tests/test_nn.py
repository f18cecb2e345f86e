"""Small layers of jaxseq.nn against NumPy float64 references and known answers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js


def test_dense_matches_numpy_and_accumulates_bfloat16_in_float32(key):
    k1, k2, k3 = jax.random.split(key, 3)
    p = js.nn.Dense(3).init(k1, 4)
    p = p._replace(b=jax.random.normal(k2, (3,)))
    x = jax.random.normal(k3, (2, 5, 4))
    want = np.asarray(x, np.float64) @ np.asarray(p.w, np.float64) + np.asarray(p.b, np.float64)
    np.testing.assert_allclose(js.nn.dense(p, x), want, rtol=1e-5, atol=1e-6)
    # bfloat16: the same rounded operands, accumulated in float32, rounded once at the end
    pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
    xb = (x * 30.0).astype(jnp.bfloat16)
    got = js.nn.dense(pb, xb)
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(xb, np.float64) @ np.asarray(pb.w, np.float64) + np.asarray(pb.b, np.float64)
    np.testing.assert_array_equal(got, jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16))


def test_dense_over_several_leading_axes_equals_numpy_in_values_and_gradients(key):
    # the product runs with x's leading axes as one: values and both gradients as the
    # float64 formula, for 1, 2 and 3 leading axes, and for an empty one
    k1, k2 = jax.random.split(key)
    p = js.nn.Dense(3).init(k1, 4)
    for shape in ((5, 4), (2, 5, 4), (2, 3, 5, 4), (0, 5, 4)):
        x = jax.random.normal(k2, shape)
        g = np.asarray(jax.random.normal(jax.random.key(9), shape[:-1] + (3,)), np.float64)
        loss = lambda p, x, g=g: jnp.sum(js.nn.dense(p, x) * g)  # noqa: E731
        dp, dx = jax.grad(loss, argnums=(0, 1))(p, x)
        xn, wn = np.asarray(x, np.float64), np.asarray(p.w, np.float64)
        np.testing.assert_allclose(js.nn.dense(p, x), xn @ wn + np.asarray(p.b), atol=1e-5)
        np.testing.assert_allclose(dx, g @ wn.T, rtol=1e-5, atol=1e-5)
        rows_x, rows_g = xn.reshape(-1, 4), g.reshape(-1, 3)
        np.testing.assert_allclose(dp.w, rows_x.T @ rows_g, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dp.b, rows_g.sum(0), rtol=1e-5, atol=1e-5)


def test_dense_init_and_errors(key):
    p = js.nn.Dense(3, kernel_init=js.initializers.constant(0.5)).init(key, 4)
    np.testing.assert_array_equal(p.w, np.full((4, 3), 0.5))
    np.testing.assert_array_equal(p.b, np.zeros(3))
    with pytest.raises(ValueError, match=r"^x: expected last dim D=4, got float32\[2, 3\]"):
        js.nn.dense(p, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=r"^params: expected DenseParams, got tuple"):
        js.nn.dense((p.w, p.b), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"^output_size: expected a positive int, got 0"):
        js.nn.Dense(0).init(key, 4)


def test_embedding(key):
    table = js.nn.Embedding(400).init(key, 50)
    assert table.shape == (50, 400) and table.dtype == jnp.float32
    assert abs(float(jnp.std(table)) - 1.0) < 0.02  # N(0, 1)
    ids = jnp.array([[3, 0], [49, 3]])
    np.testing.assert_array_equal(js.nn.embed(table, ids), np.asarray(table)[np.asarray(ids)])
    assert js.nn.Embedding(2).init(key, 5, jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"^embedding_size: expected a positive int, got 0"):
        js.nn.Embedding(0).init(key, 10)
    with pytest.raises(TypeError, match=r"^ids: expected an integer dtype"):
        js.nn.embed(table, jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"^table: expected rank 2 \[V, E\]"):
        js.nn.embed(jnp.ones((3,)), ids)


def test_dropout_is_inverted_and_shares_masks(key):
    x = jnp.ones((64, 8, 16))
    assert js.nn.dropout(key, x, 0.0) is x
    y = js.nn.dropout(key, x, 0.25)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, float(np.float32(1.0 / 0.75))}
    assert abs(float(jnp.mean(y == 0)) - 0.25) < 0.02
    shared = js.nn.dropout(key, x, 0.5, shared_axes=(0,))  # one mask for every step
    np.testing.assert_array_equal(shared, jnp.broadcast_to(shared[:1], x.shape))
    assert 0 < float(jnp.mean(shared[0] == 0)) < 1
    # NaN in a dropped unit stays out of the output (selected, not multiplied)
    nan_x = jnp.full((1000,), jnp.nan)
    assert bool(jnp.any(js.nn.dropout(key, nan_x, 0.5) == 0))
    with pytest.raises(ValueError, match=r"^rate: expected a value in \[0, 1\), got 1.0"):
        js.nn.dropout(key, x, 1.0)
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key"):
        js.nn.dropout(None, x, 0.5)
    with pytest.raises(ValueError, match=r"^shared_axes: axis 3 is out of range"):
        js.nn.dropout(key, x, 0.5, shared_axes=(3,))


@pytest.mark.parametrize("shape", [(200, 64), (199, 7), (5,), (1, 1)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_masks_are_unbiased_and_independent(shape, rate):
    # 16-bit draws, two per random word (even last axis: the two halves of the
    # row; odd: of the flat array): the drop rate is the requested one, and
    # the two units sharing a word are independent.
    keys = jax.random.split(jax.random.key(7), 64)
    ys = jax.vmap(lambda k: js.nn.dropout(k, jnp.ones(shape), rate))(keys)
    dropped = np.asarray(ys == 0).reshape(64, -1)
    n = dropped.size
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n) + 2.0**-16
    if dropped.shape[1] >= 2:
        half = dropped.shape[1] // 2
        a, b = dropped[:, :half].ravel(), dropped[:, half : 2 * half].ravel()
        assert abs(np.mean(a & b) - rate * rate) < 6 * np.sqrt(rate * rate / a.size) + 1e-3
    kept = np.asarray(ys)[np.asarray(ys) != 0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - rate), rtol=1e-6)


def test_layer_norm_matches_numpy(key):
    k1, k2, k3 = jax.random.split(key, 3)
    p = js.nn.LayerNormParams(jax.random.normal(k1, (6,)), jax.random.normal(k2, (6,)))
    x = 3.0 + 2.0 * jax.random.normal(k3, (4, 6))
    xn = np.asarray(x, np.float64)
    norm = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    want = norm * np.asarray(p.scale, np.float64) + np.asarray(p.bias, np.float64)
    np.testing.assert_allclose(js.nn.layer_norm(p, x), want, rtol=1e-5, atol=1e-5)
    init = js.nn.LayerNorm().init(None, 6, jnp.bfloat16)
    assert init.scale.dtype == jnp.bfloat16 and init.scale.tolist() == [1.0] * 6
    with pytest.raises(ValueError, match=r"^input_size: expected a positive int, got 0"):
        js.nn.LayerNorm().init(None, 0)
    with pytest.raises(ValueError, match=r"^x: expected last dim D=6, got float32\[4, 5\]"):
        js.nn.layer_norm(p, jnp.ones((4, 5)))


def test_layer_objects_are_configs_whose_apply_is_the_function(key):
    """``Dense``/``Embedding``/``LayerNorm``: frozen configs (hashable, so static under
    jit), ``init(key, input_size, dtype)``, and ``apply`` equal to the plain function;
    params of another size are refused naming the argument."""
    x = jax.random.normal(key, (2, 5, 4))
    dense = js.nn.Dense(3)
    p = dense.init(key, 4)
    np.testing.assert_array_equal(dense.apply(p, x), js.nn.dense(p, x))
    assert hash(dense) == hash(js.nn.Dense(3)) and dense.init(key, 4, jnp.bfloat16).w.dtype == (
        jnp.bfloat16
    )
    with pytest.raises(ValueError, match=r"^params\.b: expected shape \[O=2\], got float32\[3\]"):
        js.nn.Dense(2).apply(p, x)
    emb = js.nn.Embedding(6, stddev=0.5)
    table = emb.init(key, 40)
    assert table.shape == (40, 6) and 0.4 < float(jnp.std(table)) < 0.6
    ids = jnp.array([[1, 39]])
    np.testing.assert_array_equal(emb.apply(table, ids), js.nn.embed(table, ids))
    with pytest.raises(
        ValueError, match=r"^table: expected shape \[V, E=5\], got float32\[40, 6\]"
    ):
        js.nn.Embedding(5).apply(table, ids)
    ln = js.nn.LayerNorm(eps=1e-3)
    pl = ln.init(None, 4)
    np.testing.assert_array_equal(ln.apply(pl, x), js.nn.layer_norm(pl, x, 1e-3))
    with pytest.raises(ValueError, match=r"^eps: expected a positive number, got 0"):
        js.nn.LayerNorm(eps=0)
    f = jax.jit(lambda layer, p, x: layer.apply(p, x), static_argnums=0)
    np.testing.assert_allclose(f(dense, p, x), dense.apply(p, x), rtol=1e-6)


def test_layer_norm_hand_written_backward_equals_autodiff_of_the_formula():
    """The custom backward (x̂ and 1/σ kept) against autodiff of the plain formula in
    float64, second-order reverse and forward mode by check_grads, and bf16 cotangents."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        p = js.nn.LayerNormParams(
            jnp.asarray(rng.random(6) + 0.5), jnp.asarray(rng.standard_normal(6))
        )
        x = jnp.asarray(rng.standard_normal((3, 4, 6)) * 3.0 + 1.0)

        def formula(p, x):
            mu = jnp.mean(x, -1, keepdims=True)
            var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
            return (x - mu) / jnp.sqrt(var + 1e-5) * p.scale[None, None] + p.bias[None, None]

        def loss(f):
            return lambda p, x: jnp.sum(jnp.sin(f(p, x)) * jnp.arange(6.0)[None, None])

        got = jax.grad(loss(js.nn.layer_norm), (0, 1))(p, x)
        want = jax.grad(loss(formula), (0, 1))(p, x)
        chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-10)
        check_grads(js.nn.layer_norm, (p, x), order=2, modes=["rev"])
        check_grads(js.nn.layer_norm, (p, x), order=1, modes=["fwd"])
    xb = x.astype(jnp.bfloat16)
    pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
    gp, gx = jax.grad(lambda p, x: jnp.sum(js.nn.layer_norm(p, x).astype(jnp.float32)), (0, 1))(
        pb, xb
    )
    assert gx.dtype == jnp.bfloat16 and gp.scale.dtype == jnp.bfloat16
