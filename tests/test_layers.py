import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

T, B, D, H = 6, 3, 4, 5


def _data(key):
    xs = jax.random.normal(key, (T, B, D))
    lengths = jnp.array([6, 2, 4], jnp.int32)
    return xs, lengths


def test_bidirectional_equals_forward_and_reverse_rollouts(key):
    layer = js.Bidirectional(js.LSTM(H), js.GRU(3))
    p = layer.init(key, D)
    xs, lengths = _data(key)
    carry, ys = js.bidirectional_rollout(layer, p, xs, lengths=lengths)
    assert ys.shape == (T, B, H + 3) and layer.output_size == H + 3
    cf, yf = js.rollout_unrolled(layer.forward, p.forward, xs, lengths=lengths)
    cb, yb = js.rollout_unrolled(layer.backward, p.backward, xs, lengths=lengths, reverse=True)
    np.testing.assert_allclose(ys, jnp.concatenate([yf, yb], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry.forward.c, cf.c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry.backward.h, cb.h, rtol=1e-5, atol=1e-6)


def test_bidirectional_padding_invariance(key):
    layer = js.Bidirectional(js.GRU(H))
    p = layer.init(key, D)
    xs, lengths = _data(key)
    _, ys = js.bidirectional_rollout(layer, p, xs, lengths=lengths)
    for b in range(B):
        n = int(lengths[b])
        _, y_alone = js.bidirectional_rollout(layer, p, xs[:n, b : b + 1])
        np.testing.assert_allclose(ys[:n, b], y_alone[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ys[n:, b], 0.0)


def test_stack_equals_manual_composition(key):
    stack = js.Stack([js.LSTM(H), js.Bidirectional(js.GRU(H)), js.RNN(2 * H)], residual=False)
    p = stack.init(key, D)
    xs, lengths = _data(key)
    carries, ys = js.stacked_rollout(stack, p, xs, lengths=lengths)
    assert ys.shape == (T, B, 2 * H) and len(carries) == 3
    c0, h = js.rollout(stack.layers[0], p[0], xs, lengths=lengths)
    c1, h = js.bidirectional_rollout(stack.layers[1], p[1], h, lengths=lengths)
    c2, h = js.rollout(stack.layers[2], p[2], h, lengths=lengths)
    np.testing.assert_allclose(ys, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carries[1].backward.h, c1.backward.h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carries[2].h, c2.h, rtol=1e-5, atol=1e-6)


def test_stack_carry_threads_through(key):
    stack = js.Stack([js.LSTM(H), js.LSTM(H)])
    p = stack.init(key, D)
    xs, _ = _data(key)
    c_full, y_full = js.stacked_rollout(stack, p, xs)
    c_a, y_a = js.stacked_rollout(stack, p, xs[:3])
    c_b, y_b = js.stacked_rollout(stack, p, xs[3:], c_a)
    np.testing.assert_allclose(y_full, jnp.concatenate([y_a, y_b]), rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5), c_full, c_b)


def test_residual_adds_layer_input(key):
    stack = js.Stack([js.GRU(H), js.GRU(H)], residual=True)
    p = stack.init(key, D)
    xs, lengths = _data(key)
    _, ys = js.stacked_rollout(stack, p, xs, lengths=lengths)
    _, h1 = js.rollout(stack.layers[0], p[0], xs, lengths=lengths)
    _, h2 = js.rollout(stack.layers[1], p[1], h1, lengths=lengths)
    np.testing.assert_allclose(ys, h1 + h2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="residual connections need equal sizes"):
        js.Stack([js.GRU(4), js.GRU(5)], residual=True)


def test_dropout_between_layers_only_with_key(key):
    stack = js.Stack([js.RNN(H), js.RNN(H)], dropout_rate=0.5)
    p = stack.init(key, D)
    xs, _ = _data(key)
    _, y0 = js.stacked_rollout(stack, p, xs)
    _, y0b = js.stacked_rollout(stack, p, xs)
    np.testing.assert_array_equal(y0, y0b)
    _, y1 = js.stacked_rollout(stack, p, xs, key=jax.random.key(1))
    _, y2 = js.stacked_rollout(stack, p, xs, key=jax.random.key(2))
    assert not np.allclose(y1, y0) and not np.allclose(y1, y2)
    # Dropout is only between layers: the last layer's own output is not dropped.
    _, h1 = js.rollout(stack.layers[0], p[0], xs)
    dropped = js.dropout(jax.random.split(jax.random.key(1), 1)[0], h1, 0.5)
    _, want = js.rollout(stack.layers[1], p[1], dropped)
    np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-6)


def test_dropout_statistics(key):
    x = jnp.ones((200, 200))
    y = js.dropout(key, x, 0.25)
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(js.dropout(key, x, 0.0), x)
    with pytest.raises(ValueError, match=r"rate: expected a value in \[0, 1\), got 1.0"):
        js.dropout(key, x, 1.0)


def test_variational_dropout_shares_the_mask_over_time(key):
    x = jnp.ones((7, 300, 40))
    y = np.asarray(js.dropout(key, x, 0.25, shared_axes=(0,)))
    kept = y != 0
    np.testing.assert_array_equal(kept, np.broadcast_to(kept[:1], kept.shape))  # same every step
    assert abs(kept[0].mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-5)
    # negative axes count from the end; an empty tuple is plain dropout
    np.testing.assert_array_equal(js.dropout(key, x, 0.25, shared_axes=-3), y)
    np.testing.assert_array_equal(
        js.dropout(key, x, 0.25, shared_axes=()), js.dropout(key, x, 0.25)
    )
    with pytest.raises(
        ValueError, match="shared_axes: axis 3 is out of range for an array of rank 3"
    ):
        js.dropout(key, x, 0.25, shared_axes=(3,))
    with pytest.raises(TypeError, match="shared_axes: expected ints, got 0.5"):
        js.dropout(key, x, 0.25, shared_axes=(0.5,))
    # a stack with variational dropout drops the same units of layer 1's output at every step
    stack = js.Stack([js.RNN(H), js.RNN(H)], dropout_rate=0.5, variational_dropout=True)
    p = stack.init(key, D)
    xs, _ = _data(key)
    _, y1 = js.stacked_rollout(stack, p, xs, key=jax.random.key(1))
    _, h1 = js.rollout(stack.layers[0], p[0], xs)
    k0 = jax.random.split(jax.random.key(1), 1)[0]
    _, want = js.rollout(stack.layers[1], p[1], js.dropout(k0, h1, 0.5, shared_axes=(0,)))
    np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-6)


def test_stack_under_jit_and_grad(key):
    stack = js.Stack([js.LSTM(H), js.Bidirectional(js.LSTM(H))], dropout_rate=0.1)
    p = stack.init(key, D)
    xs, lengths = _data(key)

    @jax.jit
    def loss(p, xs, k):
        _, ys = js.stacked_rollout(stack, p, xs, lengths=lengths, key=k)
        return jnp.sum(ys**2)

    g = jax.grad(loss)(p, xs, jax.random.key(3))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(g))


def test_dense_and_embedding(key):
    p = js.dense_init(key, 4, 3)
    x = jax.random.normal(key, (2, 5, 4))
    want = np.asarray(x) @ np.asarray(p.w) + np.asarray(p.b)
    np.testing.assert_allclose(js.dense(p, x), want, rtol=1e-5, atol=1e-6)
    table = js.embedding_init(key, 10, 6)
    ids = jnp.array([[1, 2], [9, 0]])
    np.testing.assert_array_equal(js.embed(table, ids), table[ids])
    with pytest.raises(ValueError, match=r"x: expected last dim D=4, got float32\[2, 3\]"):
        js.dense(p, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"ids: expected an integer dtype, got float32"):
        js.embed(table, jnp.zeros((2,)))


def test_layer_bad_input(key):
    stack = js.Stack([js.LSTM(H), js.LSTM(H)])
    p = stack.init(key, D)
    xs, _ = _data(key)
    with pytest.raises(ValueError, match="params: expected a tuple of 2 layer params"):
        js.stacked_rollout(stack, p[:1], xs)
    with pytest.raises(ValueError, match="carry: expected a tuple of 2 layer carries"):
        js.stacked_rollout(stack, p, xs, carry=(None,))
    with pytest.raises(ValueError, match="layers: expected a non-empty sequence"):
        js.Stack([])
    with pytest.raises(ValueError, match=r"xs: expected last dim D=4"):
        js.stacked_rollout(stack, p, jnp.zeros((T, B, 7)))
    bi = js.Bidirectional(js.GRU(H))
    with pytest.raises(TypeError, match="params: expected BidirectionalParams"):
        js.bidirectional_rollout(bi, p[0], xs)
