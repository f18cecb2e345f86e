import _reference as ref
import chex
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

    @jax.jit  # every rollout in one compile, not one per eager operation
    def run(p, xs):
        return (
            js.rollout(layer, p, xs, lengths=lengths),
            js.rollout_unrolled(layer.forward, p.forward, xs, lengths=lengths),
            js.rollout_unrolled(layer.backward, p.backward, xs, lengths=lengths, reverse=True),
        )

    (carry, ys), (cf, yf), (cb, yb) = run(p, xs)
    assert ys.shape == (T, B, H + 3) and layer.output_size == H + 3
    np.testing.assert_allclose(ys, jnp.concatenate([yf, yb], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry.forward.c, cf.c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry.backward.h, cb.h, rtol=1e-5, atol=1e-6)


def test_bidirectional_padding_invariance(key):
    layer = js.Bidirectional(js.GRU(H))
    p = layer.init(key, D)
    xs, lengths = _data(key)
    _, ys = js.rollout(layer, p, xs, lengths=lengths)
    for b in range(B):
        n = int(lengths[b])
        _, y_alone = js.rollout(layer, p, xs[:n, b : b + 1])
        np.testing.assert_allclose(ys[:n, b], y_alone[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ys[n:, b], 0.0)


def test_stack_equals_manual_composition(key):
    stack = js.Stack([js.LSTM(H), js.Bidirectional(js.GRU(H)), js.RNN(2 * H)], residual=False)
    p = stack.init(key, D)
    xs, lengths = _data(key)

    @jax.jit  # every rollout in one compile, not one per eager operation
    def run(p, xs):
        c0, h = js.rollout(stack.layers[0], p[0], xs, lengths=lengths)
        c1, h = js.rollout(stack.layers[1], p[1], h, lengths=lengths)
        c2, h = js.rollout(stack.layers[2], p[2], h, lengths=lengths)
        return js.rollout(stack, p, xs, lengths=lengths), (c1, c2, h)

    (carries, ys), (c1, c2, h) = run(p, xs)
    assert ys.shape == (T, B, 2 * H) and len(carries) == 3
    np.testing.assert_allclose(ys, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carries[1].backward.h, c1.backward.h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carries[2].h, c2.h, rtol=1e-5, atol=1e-6)


def test_stack_carry_threads_through(key):
    stack = js.Stack([js.LSTM(H), js.LSTM(H)])
    p = stack.init(key, D)
    xs, _ = _data(key)
    c_full, y_full = js.rollout(stack, p, xs)
    c_a, y_a = js.rollout(stack, p, xs[:3])
    c_b, y_b = js.rollout(stack, p, xs[3:], c_a)
    np.testing.assert_allclose(y_full, jnp.concatenate([y_a, y_b]), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(c_full, c_b, rtol=1e-5)


def test_residual_adds_layer_input(key):
    stack = js.Stack([js.GRU(H), js.GRU(H)], residual=True)
    p = stack.init(key, D)
    xs, lengths = _data(key)

    @jax.jit  # every rollout in one compile, not one per eager operation
    def run(p, xs):
        _, h1 = js.rollout(stack.layers[0], p[0], xs, lengths=lengths)
        _, h2 = js.rollout(stack.layers[1], p[1], h1, lengths=lengths)
        return js.rollout(stack, p, xs, lengths=lengths)[1], h1, h2

    ys, h1, h2 = run(p, xs)
    np.testing.assert_allclose(ys, h1 + h2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="residual connections need equal sizes"):
        js.Stack([js.GRU(4), js.GRU(5)], residual=True)


def test_dropout_between_layers_only_with_key(key):
    stack = js.Stack([js.RNN(H), js.RNN(H)], dropout_rate=0.5)
    p = stack.init(key, D)
    xs, _ = _data(key)

    @jax.jit  # every rollout in one compile, not one per eager operation
    def run(p, xs):
        y0 = js.rollout(stack, p, xs)[1]
        y1 = js.rollout(stack, p, xs, key=jax.random.key(1))[1]
        y2 = js.rollout(stack, p, xs, key=jax.random.key(2))[1]
        # Dropout is only between layers: the last layer's own output is not dropped.
        _, h1 = js.rollout(stack.layers[0], p[0], xs)
        dropped = js.nn.dropout(jax.random.split(jax.random.key(1), 1)[0], h1, 0.5)
        return y0, y1, y2, js.rollout(stack.layers[1], p[1], dropped)[1]

    y0, y1, y2, want = run(p, xs)
    np.testing.assert_array_equal(y0, run(p, xs)[0])
    assert not np.allclose(y1, y0) and not np.allclose(y1, y2)
    np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-6)


def test_dropout_statistics(key):
    x = jnp.ones((200, 200))
    y = js.nn.dropout(key, x, 0.25)
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(js.nn.dropout(key, x, 0.0), x)
    with pytest.raises(ValueError, match=r"rate: expected a value in \[0, 1\), got 1.0"):
        js.nn.dropout(key, x, 1.0)


def test_variational_dropout_shares_the_mask_over_time(key):
    x = jnp.ones((7, 300, 40))
    y = np.asarray(js.nn.dropout(key, x, 0.25, shared_axes=(0,)))
    kept = y != 0
    np.testing.assert_array_equal(kept, np.broadcast_to(kept[:1], kept.shape))  # same every step
    assert abs(kept[0].mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-5)
    # negative axes count from the end; an empty tuple is plain dropout
    np.testing.assert_array_equal(js.nn.dropout(key, x, 0.25, shared_axes=-3), y)
    np.testing.assert_array_equal(
        js.nn.dropout(key, x, 0.25, shared_axes=()), js.nn.dropout(key, x, 0.25)
    )
    with pytest.raises(
        ValueError, match="shared_axes: axis 3 is out of range for an array of rank 3"
    ):
        js.nn.dropout(key, x, 0.25, shared_axes=(3,))
    with pytest.raises(TypeError, match="shared_axes: expected ints, got 0.5"):
        js.nn.dropout(key, x, 0.25, shared_axes=(0.5,))
    # a stack with variational dropout drops the same units of layer 1's output at every step
    stack = js.Stack([js.RNN(H), js.RNN(H)], dropout_rate=0.5, variational_dropout=True)
    p = stack.init(key, D)
    xs, _ = _data(key)
    _, y1 = js.rollout(stack, p, xs, key=jax.random.key(1))
    _, h1 = js.rollout(stack.layers[0], p[0], xs)
    k0 = jax.random.split(jax.random.key(1), 1)[0]
    _, want = js.rollout(stack.layers[1], p[1], js.nn.dropout(k0, h1, 0.5, shared_axes=(0,)))
    np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-6)


def test_weight_dropout_drops_recurrent_weights_once_per_rollout(key):
    # DropConnect on every w_hh (AWD-LSTM's weight drop): the rollout with a key equals
    # a key-less rollout whose w_hh are masked and scaled by 1/(1-rate), one mask for
    # every step and stream. The mask is read back from the gradient: a dropped entry,
    # and only a dropped one, gets exactly zero gradient.
    rate, h = 0.3, 16
    stack = js.Stack([js.GRU(h), js.Bidirectional(js.LSTM(h))], weight_dropout=rate)
    p = stack.init(key, D)
    xs = jax.random.normal(jax.random.key(3), (T, 5, D))
    k = jax.random.key(7)

    def loss(p):
        return jnp.sum(jnp.sin(js.rollout(stack, p, xs, key=k)[1]))

    g = jax.grad(loss)(p)
    whh = [
        (p[0].w_hh, g[0].w_hh),
        (p[1].forward.w_hh, g[1].forward.w_hh),
        (p[1].backward.w_hh, g[1].backward.w_hh),
    ]
    masked = []
    for w, gw in whh:
        keep = np.asarray(gw) != 0
        assert abs(keep.mean() - (1 - rate)) < 0.05
        masked.append(jnp.where(keep, w / (1 - rate), 0.0))
    p_ref = (
        p[0]._replace(w_hh=masked[0]),
        p[1]._replace(
            forward=p[1].forward._replace(w_hh=masked[1]),
            backward=p[1].backward._replace(w_hh=masked[2]),
        ),
    )
    plain = js.Stack(stack.layers)
    _, want = js.rollout(plain, p_ref, xs)
    np.testing.assert_allclose(js.rollout(stack, p, xs, key=k)[1], want, rtol=1e-5, atol=1e-6)
    # without a key (evaluation) nothing is dropped; another key drops other weights
    np.testing.assert_array_equal(js.rollout(stack, p, xs)[1], js.rollout(plain, p, xs)[1])
    g2 = jax.grad(lambda p: jnp.sum(js.rollout(stack, p, xs, key=jax.random.key(8))[1]))(p)
    assert np.any((np.asarray(g2[0].w_hh) != 0) != (np.asarray(g[0].w_hh) != 0))
    # the input weights are never dropped
    assert np.all(np.asarray(g[0].w_ih) != 0)
    # a language model takes it, and records it in its config
    lm = js.models.char_lm(11, cell="gru", num_layers=1, hidden_size=8, weight_dropout=0.2)
    assert lm.stack.weight_dropout == 0.2 and lm.config()["stack_weight_dropout"] == 0.2
    assert "stack_weight_dropout" not in js.models.char_lm(11, cell="gru").config()
    with pytest.raises(ValueError, match=r"weight_dropout: expected a value in \[0, 1\), got 1.0"):
        js.Stack([js.GRU(h)], weight_dropout=1.0)
    no_w_hh = js.Stack([js.recurrent.MinGRU(h)], weight_dropout=0.2)
    with pytest.raises(ValueError, match="weight_dropout: expected a layer with recurrent weights"):
        js.rollout(no_w_hh, no_w_hh.init(key, D), xs, key=k)


def test_dense_and_embedding(key):
    p = js.nn.Dense(3).init(key, 4)
    x = jax.random.normal(key, (2, 5, 4))
    want = np.asarray(x) @ np.asarray(p.w) + np.asarray(p.b)
    np.testing.assert_allclose(js.nn.dense(p, x), want, rtol=1e-5, atol=1e-6)
    table = js.nn.Embedding(6).init(key, 10)
    ids = jnp.array([[1, 2], [9, 0]])
    np.testing.assert_array_equal(js.nn.embed(table, ids), table[ids])
    with pytest.raises(ValueError, match=r"x: expected last dim D=4, got float32\[2, 3\]"):
        js.nn.dense(p, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"ids: expected an integer dtype, got float32"):
        js.nn.embed(table, jnp.zeros((2,)))


def test_layer_bad_input(key):
    stack = js.Stack([js.LSTM(H), js.LSTM(H)])
    p = stack.init(key, D)
    xs, _ = _data(key)
    with pytest.raises(ValueError, match="params: expected a tuple of 2 layer params"):
        js.rollout(stack, p[:1], xs)
    with pytest.raises(ValueError, match="carry: expected a tuple of 2 layer carries"):
        js.rollout(stack, p, xs, carry=(None,))
    with pytest.raises(ValueError, match="layers: expected a non-empty sequence"):
        js.Stack([])
    with pytest.raises(ValueError, match=r"xs: expected last dim D=4"):
        js.rollout(stack, p, jnp.zeros((T, B, 7)))
    bi = js.Bidirectional(js.GRU(H))
    with pytest.raises(TypeError, match="params: expected BidirectionalParams"):
        js.rollout(bi, p[0], xs)


# -- plain NumPy references ---------------------------------------------------------------
#
# The cells are those of _reference.py. ``xp`` is numpy for float64 references, or
# jax.numpy for a differentiable reference of the same loop.


def _kind(cell):
    """The _reference kind of a jaxseq cell."""
    if isinstance(cell, js.LSTM):
        return "lstm"
    return "gru" if isinstance(cell, js.GRU) else cell.activation


def _ref_rollout(xp, cell, p, xs, lengths, reverse=False, reset=None):
    """Per sequence, from a zero carry: run over its valid part (backwards when
    ``reverse``); zeros after it. -> ``(carry, ys)``, ``carry`` a tuple ``(h,)``/``(h, c)``."""
    kind = _kind(cell)
    carry = ref.zero_carry(kind, cell.hidden_size, xs.shape[1:-1], xp, xs.dtype)
    p = ref.as_arrays(p, xp, None)  # keeps the dtype (float32 leaves under jax.grad)
    return ref.rollout(kind, p, xs, carry, lengths, reset, reverse=reverse, xnp=xp)


def _ref_layer(xp, layer, p, xs, lengths, reverse=False, reset=None):
    """A Bidirectional: forward then reversed half (swapped when ``reverse``), concatenated."""
    if isinstance(layer, js.Bidirectional):
        cf, yf = _ref_rollout(xp, layer.forward, p.forward, xs, lengths, reverse, reset)
        cb, yb = _ref_rollout(xp, layer.backward, p.backward, xs, lengths, not reverse, reset)
        return (cf, cb), xp.concatenate([yf, yb], axis=-1)
    return _ref_rollout(xp, layer, p, xs, lengths, reverse, reset)


def _ref_stack(xp, stack, params, xs, lengths, masks=None, reverse=False, reset=None):
    """Layer after layer; residual from the second layer; ``masks[i]`` after layer i."""
    h, carries = xs, []
    for i, (layer, p) in enumerate(zip(stack.layers, params)):
        c, y = _ref_layer(xp, layer, p, h, lengths, reverse, reset)
        if stack.residual and i > 0:
            y = y + h
        if masks is not None and i < len(stack.layers) - 1:
            y = y * masks[i]
        carries.append(c)
        h = y
    return carries, h


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _carry_leaves(c):
    """A jaxseq carry as a tuple like the reference's: (h,) or (h, c)."""
    return (c.h, c.c) if isinstance(c, js.recurrent.LSTMCarry) else (c.h,)


TOL = dict(rtol=1e-5, atol=1e-6)
LENGTHS = np.array([6, 2, 0, 4], np.int32)  # full, short, empty, partial


def _xs(key, t=T, d=D):
    return jax.random.normal(key, (t, len(LENGTHS), d))


@pytest.mark.parametrize(
    "fwd, bwd", [(js.LSTM(H), js.GRU(3)), (js.GRU(H), None), (js.RNN(H, "relu"), js.LSTM(2))]
)
def test_bidirectional_matches_numpy_forward_and_reversed_valid_part(key, fwd, bwd):
    layer = js.Bidirectional(fwd, bwd)
    p = layer.init(key, D)
    xs = _xs(jax.random.fold_in(key, 1))
    for lengths in (LENGTHS, None):
        ln = np.full(len(LENGTHS), T) if lengths is None else lengths
        (cf, cb), want = _ref_layer(np, layer, _np(p), np.asarray(xs, np.float64), ln)
        run = jax.jit(lambda p, x, lg: js.rollout(layer, p, x, lengths=lg))
        for got_c, ys in (
            js.rollout(layer, p, xs, lengths=lengths),
            run(p, xs, lengths),
        ):
            assert ys.shape == (T, len(LENGTHS), layer.output_size)
            np.testing.assert_allclose(ys, want, **TOL)
            for g, w in zip(_carry_leaves(got_c.forward), cf):
                np.testing.assert_allclose(g, w, **TOL)
            for g, w in zip(_carry_leaves(got_c.backward), cb):  # the carry after step 0
                np.testing.assert_allclose(g, w, **TOL)


def test_bidirectional_backward_half_is_not_a_forward_run(key):
    # a check of the check: the reversed run differs from a forward run of the same cell
    layer = js.Bidirectional(js.GRU(H))
    p = layer.init(key, D)
    xs = np.asarray(_xs(jax.random.fold_in(key, 1)), np.float64)
    _, yb = _ref_rollout(np, layer.backward, _np(p.backward), xs, LENGTHS, reverse=True)
    _, yf = _ref_rollout(np, layer.backward, _np(p.backward), xs, LENGTHS)
    assert np.abs(yb - yf).max() > 1e-2
    _, ys = js.rollout(layer, p, jnp.asarray(xs, jnp.float32), lengths=LENGTHS)
    np.testing.assert_allclose(ys[..., H:], yb, **TOL)


@pytest.mark.parametrize(
    "layers, residual",
    [
        ((js.LSTM(H), js.Bidirectional(js.GRU(H)), js.RNN(2 * H)), False),
        ((js.GRU(D), js.LSTM(D), js.RNN(D)), False),  # equal sizes: any input would fit
        ((js.GRU(H), js.Bidirectional(js.RNN(H), js.LSTM(H)), js.RNN(2 * H)), False),
        ((js.GRU(D), js.LSTM(D), js.GRU(D)), True),
    ],
)
def test_stack_matches_numpy_layer_after_layer(key, layers, residual):
    stack = js.Stack(layers, residual=residual)
    p = stack.init(key, D)
    xs = _xs(jax.random.fold_in(key, 2))
    carries_w, want = _ref_stack(np, stack, _np(p), np.asarray(xs, np.float64), LENGTHS)
    run = jax.jit(lambda p, x: js.rollout(stack, p, x, lengths=LENGTHS))
    for carries, ys in (js.rollout(stack, p, xs, lengths=LENGTHS), run(p, xs)):
        assert ys.shape == want.shape
        np.testing.assert_allclose(ys, want, **TOL)
        for layer, got_c, want_c in zip(stack.layers, carries, carries_w):
            if isinstance(layer, js.Bidirectional):
                pairs = zip(
                    _carry_leaves(got_c.forward) + _carry_leaves(got_c.backward),
                    want_c[0] + want_c[1],
                )
            else:
                pairs = zip(_carry_leaves(got_c), want_c)
            for g, w in pairs:
                np.testing.assert_allclose(g, w, **TOL)


def _stack_masks(stack, key, ys_shapes):
    """The dropout masks a Stack rollout draws (js.nn.dropout of ones with its per-layer keys)."""
    keys = jax.random.split(key, max(len(stack.layers) - 1, 1))
    shared = (0,) if stack.variational_dropout else ()
    return [
        js.nn.dropout(keys[i], jnp.ones(s), stack.dropout_rate, shared_axes=shared)
        for i, s in enumerate(ys_shapes)
    ]


@pytest.mark.parametrize("variational", [False, True])
def test_stack_with_dropout_under_jit_and_grad_matches_a_reference_loop(key, variational):
    rate, t, lengths = 0.3, 4, np.array([4, 1, 0], np.int32)
    stack = js.Stack(
        [js.LSTM(3), js.Bidirectional(js.GRU(3))],
        dropout_rate=rate,
        variational_dropout=variational,
    )
    p = stack.init(key, D)
    xs = jax.random.normal(jax.random.fold_in(key, 3), (t, 3, D))
    k = jax.random.key(3)
    (mask,) = _stack_masks(stack, k, [(t, 3, 3)])
    m = np.asarray(mask)
    inv = float(np.float32(1 / (1 - rate)))
    assert set(np.unique(m).tolist()) == {0.0, inv}  # inverted dropout values
    if variational:
        np.testing.assert_array_equal(m, np.broadcast_to(m[:1], m.shape))
    g_out = jax.random.normal(jax.random.fold_in(key, 4), (t, 3, 6))

    @jax.jit
    def loss(p, xs, k):
        _, ys = js.rollout(stack, p, xs, lengths=lengths, key=k)
        return jnp.sum(ys * g_out)

    def ref_loss(p, xs):
        _, ys = _ref_stack(jnp, stack, p, xs, lengths, masks=[mask])
        return jnp.sum(ys * g_out)

    _, want = _ref_stack(np, stack, _np(p), np.asarray(xs, np.float64), lengths, [m])
    _, ys = jax.jit(lambda p, x: js.rollout(stack, p, x, lengths=lengths, key=k))(p, xs)
    np.testing.assert_allclose(ys, want, **TOL)
    if variational:
        return  # the gradient path is the same; checked once below
    got = jax.grad(loss, argnums=(0, 1))(p, xs, k)
    ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(p, xs)
    leaves_g, leaves_r = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)
    assert len(leaves_g) == len(leaves_r)
    for a, b in zip(leaves_g, leaves_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # gradients of padded input steps are exactly zero
    gx = np.asarray(got[1])
    for j, n in enumerate(lengths):
        np.testing.assert_array_equal(gx[n:, j], 0.0)
        if n:
            assert np.abs(gx[:n, j]).max() > 0


def test_stack_gradients_match_finite_differences_in_float64(key):
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        stack = js.Stack([js.GRU(3), js.Bidirectional(js.LSTM(2))])
        p = stack.init(key, 2, jnp.float64)
        xs = jax.random.normal(jax.random.fold_in(key, 5), (4, 2, 2), jnp.float64)
        lengths = jnp.array([4, 2], jnp.int32)

        def f(p, xs):
            _, ys = js.rollout(stack, p, xs, lengths=lengths)
            return jnp.sum(jnp.sin(ys))

        check_grads(jax.jit(f), (p, xs), order=1, modes=["rev"], eps=1e-5)


def test_dense_and_embed_match_numpy_with_gradients(key):
    k1, k2, k3 = jax.random.split(key, 3)
    p = js.nn.Dense(3).init(k1, 4)
    p = p._replace(b=jnp.array([0.5, -1.0, 2.0]))
    x = jax.random.normal(k2, (2, 5, 4))
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, p.w, p.b))
    want = np.einsum("tbd,do->tbo", x64, w64) + b64
    np.testing.assert_allclose(jax.jit(js.nn.dense)(p, x), want, **TOL)
    g = np.asarray(jax.random.normal(k3, (2, 5, 3)), np.float64)
    gp, gx = jax.grad(lambda p, x: jnp.sum(js.nn.dense(p, x) * g), argnums=(0, 1))(p, x)
    np.testing.assert_allclose(gp.w, np.einsum("tbd,tbo->do", x64, g), **TOL)
    np.testing.assert_allclose(gp.b, g.sum((0, 1)), **TOL)
    np.testing.assert_allclose(gx, np.einsum("tbo,do->tbd", g, w64), **TOL)
    # embedding: rows of the table; its gradient adds up the rows' cotangents
    table = js.nn.Embedding(3).init(k1, 6)
    ids = np.array([[1, 5, 1], [0, 1, 3]])
    np.testing.assert_array_equal(js.nn.embed(table, ids), np.asarray(table)[ids])
    gy = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    gt = jax.grad(lambda t: jnp.sum(js.nn.embed(t, ids) * gy))(table)
    want_gt = np.zeros((6, 3), np.float32)
    np.add.at(want_gt, ids, gy)
    np.testing.assert_array_equal(gt, want_gt)
    assert (
        not want_gt[2].any()
        and want_gt[1].sum() == gy[0, 0].sum() + gy[0, 2].sum() + gy[1, 1].sum()
    )


def test_dropout_is_a_fixed_mask_under_jit_and_grad(key):
    rate = 0.4
    x = jax.random.normal(key, (50, 40))
    y = jax.jit(lambda k, x: js.nn.dropout(k, x, rate))(key, x)
    keep = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(x)[keep] / (1 - rate), rtol=1e-6)
    assert abs(keep.mean() - (1 - rate)) < 0.03
    # d sum(dropout(x) * g) / dx = keep * g / (1 - rate): the same mask as the forward
    g = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    gx = jax.grad(lambda x: jnp.sum(js.nn.dropout(key, x, rate) * g))(x)
    np.testing.assert_allclose(gx, np.where(keep, np.asarray(g) / (1 - rate), 0.0), rtol=1e-6)
    # the expectation is kept: mean of many draws over ones is ~1
    ones = jnp.ones((400, 250))
    np.testing.assert_allclose(float(jnp.mean(js.nn.dropout(key, ones, rate))), 1.0, atol=0.02)
    xb = x.astype(jnp.bfloat16)
    assert js.nn.dropout(key, xb, rate).dtype == jnp.bfloat16


def test_bidirectional_initial_carry():
    """Zeros for both directions, each in its own cell's carry type, shape and dtype."""
    layer = js.Bidirectional(js.LSTM(H), js.GRU(3))
    carry = layer.initial_carry((B,), jnp.bfloat16)
    assert isinstance(carry, js.recurrent.BidirectionalCarry)
    assert isinstance(carry.forward, js.recurrent.LSTMCarry) and isinstance(
        carry.backward, js.recurrent.RNNCarry
    )
    leaves = [carry.forward.h, carry.forward.c, carry.backward.h]
    for leaf, size in zip(leaves, (H, H, 3)):
        assert leaf.shape == (B, size) and leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(leaf, 0)
    assert len(jax.tree_util.tree_leaves(carry)) == 3


def test_layer_argument_errors_name_the_argument(key):
    """Each bad argument is named in the error, with the layout expected."""
    p = js.nn.Dense(3).init(key, 4)
    with pytest.raises(ValueError, match=r"x: expected rank >= 1 \[\.\.\., D\], got rank 0"):
        js.nn.dense(p, jnp.float32(1.0))
    table = js.nn.Embedding(6).init(key, 10)
    with pytest.raises(ValueError, match=r"table: expected rank 2 \[V, E\], got rank 1"):
        js.nn.embed(table[0], jnp.array([1]))
    with pytest.raises(TypeError, match="ids: expected an array"):
        js.nn.embed(table, object())
    with pytest.raises(ValueError, match="embedding_size: expected a positive int"):
        js.nn.Embedding(0).init(key, 10)


def test_bidirectional_init_honours_dtype(key):
    layer = js.Bidirectional(js.LSTM(H), js.GRU(3))
    p = layer.init(key, D, jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 7 and all(leaf.dtype == jnp.bfloat16 for leaf in leaves)


def test_three_layer_dropout_uses_one_key_per_gap(key):
    """With n layers the key is split into n - 1 dropout keys, key i after layer i."""
    stack = js.Stack([js.RNN(H), js.RNN(H), js.RNN(H)], dropout_rate=0.5)
    p = stack.init(key, D)
    xs, _ = _data(key)
    drop_key = jax.random.key(3)
    _, ys = js.rollout(stack, p, xs, key=drop_key)
    k = jax.random.split(drop_key, 2)
    _, h = js.rollout(stack.layers[0], p[0], xs)
    _, h = js.rollout(stack.layers[1], p[1], js.nn.dropout(k[0], h, 0.5))
    _, want = js.rollout(stack.layers[2], p[2], js.nn.dropout(k[1], h, 0.5))
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-6)


def test_a_bidirectional_rollout_starts_from_the_given_carry(key):
    """Both halves start from the carry passed in, as each cell's own rollout does."""
    layer = js.Bidirectional(js.GRU(3), js.GRU(3))
    p = layer.init(key, 2)
    xs = jax.random.normal(key, (4, B, 2))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    carry = js.recurrent.BidirectionalCarry(
        js.recurrent.RNNCarry(jax.random.normal(k1, (B, 3))),
        js.recurrent.RNNCarry(jax.random.normal(k2, (B, 3))),
    )
    got_carry, ys = js.rollout(layer, p, xs, carry)
    fwd_carry, fwd = js.rollout(layer.forward, p.forward, xs, carry.forward)
    bwd_carry, bwd = js.rollout(layer.backward, p.backward, xs, carry.backward, reverse=True)
    np.testing.assert_allclose(ys, jnp.concatenate([fwd, bwd], axis=-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_carry.forward.h, fwd_carry.h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_carry.backward.h, bwd_carry.h, rtol=1e-6, atol=1e-6)


# -- js.rollout runs Bidirectional and Stack layers ---------------------------------

RESET = np.zeros((T, len(LENGTHS)), bool)
RESET[[0, 3], 0] = True  # a flag at step 0 and inside the full sequence
RESET[1, 1] = True  # inside the short one
RESET[2, 2] = True  # at a padded step (ignored)
RESET[4, 3] = True  # at t == lengths[b] (ignored, also by a reverse run)

_LAYERS = {
    "bidirectional": js.Bidirectional(js.LSTM(H), js.GRU(3)),
    "stack": js.Stack([js.LSTM(H), js.Bidirectional(js.GRU(H), js.RNN(2)), js.RNN(3)]),
}


def _ref_any(xp, layer, p, xs, **kw):
    if isinstance(layer, js.Stack):
        return _ref_stack(xp, layer, p, xs, LENGTHS, **kw)
    return _ref_layer(xp, layer, p, xs, LENGTHS, **kw)


def _flat_carry(layer, carry):
    """A jaxseq carry of ``layer`` as the flat tuple of leaves the reference returns."""
    if isinstance(layer, js.Stack):
        return sum((_flat_carry(lay, c) for lay, c in zip(layer.layers, carry)), ())
    if isinstance(layer, js.Bidirectional):
        return _flat_carry(layer.forward, carry.forward) + _flat_carry(
            layer.backward, carry.backward
        )
    return _carry_leaves(carry)


def _flat_ref_carry(layer, carry):
    if isinstance(layer, js.Stack):
        return sum((_flat_ref_carry(lay, c) for lay, c in zip(layer.layers, carry)), ())
    if isinstance(layer, js.Bidirectional):
        return tuple(carry[0]) + tuple(carry[1])
    return tuple(carry)


@pytest.mark.parametrize("name", sorted(_LAYERS))
@pytest.mark.parametrize("reverse", [False, True])
def test_rollout_of_a_layer_matches_numpy_with_lengths_reset_and_reverse(key, name, reverse):
    """``js.rollout(layer, ...)`` eager and under jit, values and final carries, against the
    float64 reference; ``reverse`` swaps a Bidirectional's halves, reverses every layer of
    a Stack."""
    layer = _LAYERS[name]
    p = layer.init(key, D)
    xs = _xs(jax.random.fold_in(key, 7))
    opts = dict(lengths=LENGTHS, reset=RESET, reverse=reverse)
    want_c, want = _ref_any(
        np, layer, _np(p), np.asarray(xs, np.float64), reverse=reverse, reset=RESET
    )
    run = jax.jit(lambda p, x: js.rollout(layer, p, x, **opts))
    for carry, ys in (js.rollout(layer, p, xs, **opts), run(p, xs)):
        np.testing.assert_allclose(ys, want, rtol=1e-5, atol=2e-6)
        got_leaves, want_leaves = _flat_carry(layer, carry), _flat_ref_carry(layer, want_c)
        assert len(got_leaves) == len(want_leaves)
        for g, w in zip(got_leaves, want_leaves):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_rollout_of_a_layer_gradients_match_the_reference(key, name):
    """Gradients of ``js.rollout(layer, ...)`` (fused kernels inside) with respect to the
    params and inputs equal autodiff of the reference loops, with lengths, resets and
    reverse."""
    layer = _LAYERS[name]
    p = layer.init(key, D)
    xs = _xs(jax.random.fold_in(key, 8))
    g_out = jax.random.normal(jax.random.fold_in(key, 9), (T, len(LENGTHS), layer.output_size))
    opts = dict(reset=RESET, reverse=True)

    @jax.jit
    def loss(p, xs):
        return jnp.sum(js.rollout(layer, p, xs, lengths=LENGTHS, **opts)[1] * g_out)

    def ref_loss(p, xs):
        return jnp.sum(_ref_any(jnp, layer, p, xs, **opts)[1] * g_out)

    got = jax.grad(loss, argnums=(0, 1))(p, xs)
    want = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(p, xs)
    leaves_g, leaves_w = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(leaves_g) == len(leaves_w)
    for a, b in zip(leaves_g, leaves_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(got[1])).max() > 0


def test_bidirectional_reverse_on_flipped_time_is_the_flipped_output(key):
    """Full-length sequences, no resets: reverse=True swaps the directions, so running it
    on the time-flipped input gives the time-flipped output, halves in the same order."""
    layer = _LAYERS["bidirectional"]
    p = layer.init(key, D)
    xs = _xs(jax.random.fold_in(key, 10))
    c, ys = js.rollout(layer, p, xs)
    c_r, ys_r = js.rollout(layer, p, xs[::-1], reverse=True)
    np.testing.assert_allclose(ys_r[::-1], ys, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_r.forward.h, c.forward.h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_r.backward.h, c.backward.h, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(ys_r) - np.asarray(ys)).max() > 1e-2  # reverse does something


def test_layer_options_reach_every_cell(key):
    """kernel and checkpoint_every are passed to every cell of a Stack/Bidirectional."""
    stack = js.Stack([js.GRU(3), js.Bidirectional(js.LSTM(2))])
    p = stack.init(key, D)
    xs = _xs(key)

    def prims(**kw):
        names = []

        def walk(jx):
            for eqn in jx.eqns:
                names.append(eqn.primitive.name)
                for value in eqn.params.values():
                    for sub in value if isinstance(value, tuple | list) else (value,):
                        sub = getattr(sub, "jaxpr", sub)
                        if hasattr(sub, "eqns"):
                            walk(sub)

        walk(jax.make_jaxpr(lambda p: js.rollout(stack, p, xs, **kw)[1])(p).jaxpr)
        return names

    assert prims().count("custom_vjp_call") == 3  # the fused kernel for all three cells
    scan = prims(kernel="scan")
    assert "custom_vjp_call" not in scan

    def remats(names):  # jax.checkpoint's primitive ("remat", "checkpoint", by version)
        return sum("remat" in n or "checkpoint" in n for n in names)

    assert remats(scan) == 0
    assert remats(prims(kernel="scan", checkpoint_every=2)) == 3
    got = js.rollout(stack, p, xs, kernel="scan", checkpoint_every=2, lengths=LENGTHS)[1]
    want = js.rollout(stack, p, xs, lengths=LENGTHS)[1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    sub = js.Stack([js.GRU(3), _SubGRU(3)])
    with pytest.raises(ValueError, match="kernel: 'fused' needs"):
        js.rollout(sub, sub.init(key, D), xs, kernel="fused")


class _SubGRU(js.GRU):
    """A subclass: no fused rule of its own."""
