"""Batch-major inputs (``time_major=False``) equal time-major ones through a transpose.

For every rollout function and sequence layer: the outputs ``[*B, T, H]`` are the
time-major outputs with the time axis moved, the final carry is the same, and so
are the gradients with respect to the params, the inputs (transposed) and the
initial carry, with lengths and reset flags given batch-major. The time-major run
is the reference: its own correctness is what tests/test_rollout.py and
tests/test_layers.py check against independent references. Errors name the
shapes as the caller passed them.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

T, D, H = 5, 2, 3
BATCH = (3,)
LENGTHS = np.array([5, 3, 0], np.int32)
RESET_BT = np.zeros((3, T), bool)  # batch-major [B, T]
RESET_BT[0, 2] = RESET_BT[1, 1] = RESET_BT[2, 3] = True


def _bm_to_tm(x):
    """``[*B, T, ...]`` -> ``[T, *B, ...]`` for arrays whose batch dims are ``BATCH``."""
    return np.moveaxis(np.asarray(x), len(BATCH), 0)


class Halver:
    """A user sequence layer whose ``rollout`` has no ``time_major`` keyword: a GRU
    whose outputs are halved."""

    def __init__(self, hidden):
        self.cell = js.GRU(hidden)
        self.output_size = hidden

    def init(self, key, input_size, dtype=jnp.float32):
        return self.cell.init(key, input_size, dtype)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return self.cell.initial_carry(batch_shape, dtype)

    def rollout(self, params, seq, carry, options, key=None):
        assert seq.xs.shape[0] == T, "a layer called by js.rollout gets time-major inputs"
        c, ys = js.recurrent.run(self.cell, params, seq, carry, options)
        return c, ys / 2


# name -> (layer, how it is called, extra keyword arguments). Small cells keep the
# compilations cheap: what differs between the entries is the outermost call, where
# the transposes are.
CASES = {
    "rollout-lstm-fused": (js.LSTM(H), js.rollout, {}),
    "rollout-gru-scan-reverse": (js.GRU(H), js.rollout, {"kernel": "scan", "reverse": True}),
    "rollout_unrolled-rnn": (js.RNN(H), js.rollout_unrolled, {}),
    "rollout-bidirectional": (js.Bidirectional(js.RNN(H)), js.rollout, {}),
    "rollout-bidirectional-reverse": (js.Bidirectional(js.RNN(H)), js.rollout, {"reverse": True}),
    "rollout-stack-dropout": (
        js.Stack([js.RNN(H), Halver(H)], dropout_rate=0.5, variational_dropout=True),
        js.rollout,
        {"key": jax.random.key(3)},
    ),
    "rollout-stack-residual": (js.Stack([js.RNN(H), js.RNN(H)], residual=True), js.rollout, {}),
    "rollout-user-layer": (Halver(H), js.rollout, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batch_major_equals_time_major(name):
    layer, fn, kw = CASES[name]
    key = jax.random.key(0)
    params = layer.init(key, D)
    xs_bm = jax.random.normal(jax.random.key(1), (*BATCH, T, D))
    carry0 = jax.tree_util.tree_map(
        lambda z: jax.random.normal(jax.random.key(2), z.shape, z.dtype),
        layer.initial_carry(BATCH),
    )
    w = jax.random.normal(jax.random.key(5), (*BATCH, T, layer.output_size))

    def loss(params, xs, carry, time_major):
        reset = RESET_BT if not time_major else _bm_to_tm(RESET_BT)
        c, ys = fn(
            layer, params, xs, carry, lengths=LENGTHS, reset=reset, time_major=time_major, **kw
        )
        y_bm = ys if not time_major else jnp.moveaxis(ys, 0, len(BATCH))
        leaves = jax.tree_util.tree_leaves(c)
        return jnp.sum(y_bm * w) + sum(jnp.sum(jnp.sin(x)) for x in leaves), (c, ys)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    @jax.jit  # one compilation for both layouts
    def both(params, xs_bm, xs_tm, carry0):
        return grad(params, xs_bm, carry0, False), grad(params, xs_tm, carry0, True)

    bm, tm = both(params, xs_bm, jnp.asarray(_bm_to_tm(xs_bm)), carry0)
    (l_bm, (c_bm, ys_bm)), g_bm = bm
    (l_tm, (c_tm, ys_tm)), g_tm = tm

    assert ys_bm.shape == (*BATCH, T, layer.output_size)
    assert ys_tm.shape == (T, *BATCH, layer.output_size)
    np.testing.assert_allclose(ys_bm, np.moveaxis(np.asarray(ys_tm), 0, len(BATCH)), atol=1e-6)
    np.testing.assert_array_equal(ys_bm[2], 0.0)  # length 0: all-zero outputs
    np.testing.assert_allclose(l_bm, l_tm, rtol=1e-6)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree_util.tree_map(close, c_bm, c_tm)
    jax.tree_util.tree_map(close, g_bm[0], g_tm[0])  # params
    close(g_bm[1], np.moveaxis(np.asarray(g_tm[1]), 0, len(BATCH)))  # inputs
    jax.tree_util.tree_map(close, g_bm[2], g_tm[2])  # initial carry
    assert np.any(np.asarray(g_bm[1]) != 0)


def test_several_batch_dims_and_no_batch_dim():
    cell = js.GRU(H)
    params = cell.init(jax.random.key(0), D)
    xs = jax.random.normal(jax.random.key(1), (2, 3, T, D))  # [B1, B2, T, D]
    lengths = jnp.array([[5, 1, 0], [2, 5, 4]])
    reset = jnp.zeros((2, 3, T), bool).at[1, 1, 2].set(True)

    @jax.jit
    def both(xs, xs_tm, reset, reset_tm):
        kw = dict(lengths=lengths, kernel="scan")
        return (
            js.rollout(cell, params, xs, reset=reset, time_major=False, **kw),
            js.rollout(cell, params, xs_tm, reset=reset_tm, **kw),
            # one sequence without batch dims: [T, D] is both layouts
            js.rollout(cell, params, xs[0, 0], time_major=False, kernel="scan")[1],
            js.rollout(cell, params, xs[0, 0], kernel="scan")[1],
        )

    (c, ys), (c_tm, ys_tm), y1, y1_tm = both(
        xs, jnp.moveaxis(xs, 2, 0), reset, jnp.moveaxis(reset, 2, 0)
    )
    assert ys.shape == (2, 3, T, H)
    np.testing.assert_allclose(ys, jnp.moveaxis(ys_tm, 0, 2), atol=1e-6)
    np.testing.assert_allclose(c.h, c_tm.h, atol=1e-6)
    np.testing.assert_allclose(y1, y1_tm, atol=1e-6)


def test_errors_name_the_batch_major_shapes():
    cell = js.LSTM(H)
    params = cell.init(jax.random.key(0), D)
    xs = jnp.ones((3, T, D))  # [B, T, D]
    with pytest.raises(ValueError, match=r"reset: expected shape \[3, 5\] .*float32\[3, 5, 2\]"):
        js.rollout(cell, params, xs, reset=jnp.zeros((T, 3), bool), time_major=False)
    with pytest.raises(ValueError, match=r"lengths: expected shape \[3\] .*float32\[3, 5, 2\]"):
        js.rollout(cell, params, xs, lengths=jnp.array([1, 2, 3, 4, 5]), time_major=False)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 5\]"):
        js.rollout(cell, params, xs, lengths=jnp.array([1, 6, 3]), time_major=False)
    with pytest.raises(
        ValueError, match=r"xs: expected rank >= 2 \[\*B, T, D\] \(time_major=False\), got rank 1"
    ):
        js.rollout_unrolled(cell, params, jnp.ones(T), time_major=False)
    with pytest.raises(TypeError, match=r"xs: expected a floating dtype, got int32\[3, 5, 2\]"):
        js.rollout(cell, params, jnp.ones((3, T, D), jnp.int32), time_major=False)
    with pytest.raises(TypeError, match="time_major: expected a Python bool"):
        js.rollout(cell, params, xs, time_major="batch")
    # a layer's input size is checked on the shape given, before the transpose
    stack = js.Stack([js.Bidirectional(js.GRU(H)), js.GRU(H)])
    sparams = stack.init(jax.random.key(0), D)
    wide = jnp.ones((3, T, 7))
    with pytest.raises(ValueError, match=r"xs: expected last dim D=2 .*got float32\[3, 5, 7\]"):
        js.rollout(stack, sparams, wide, time_major=False)
    bi = stack.layers[0]
    with pytest.raises(ValueError, match=r"reset: expected shape \[3, 5\] .*float32\[3, 5, 2\]"):
        js.rollout(bi, sparams[0], xs, reset=jnp.zeros((T, 3), bool), time_major=False)
    with pytest.raises(TypeError, match="params: expected BidirectionalParams"):
        js.rollout(bi, sparams[1], xs, time_major=False)
    with pytest.raises(ValueError, match="params: expected a tuple of 2 layer params"):
        js.rollout(stack, sparams[:1], xs, time_major=False)


def _primitives(fn, *args):
    """How many times each primitive appears in the jaxpr of ``fn(*args)``, nested ones too."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def test_batch_major_adds_only_the_transposes():
    """The batch-major program is the time-major one plus one transpose of the
    inputs, of the reset flags and of the outputs (and, in the gradient, of their
    cotangents): nothing is transposed twice on the way through the layers."""
    stack = js.Stack([js.LSTM(H), js.Bidirectional(js.GRU(H)), Halver(H)])
    params = stack.init(jax.random.key(0), D)

    def ys(xs, reset, time_major):
        return js.rollout(stack, params, xs, lengths=LENGTHS, reset=reset, time_major=time_major)[1]

    xs_tm, xs_bm = jnp.ones((T, *BATCH, D)), jnp.ones((*BATCH, T, D))
    reset_tm, reset_bm = jnp.zeros((T, *BATCH), bool), jnp.zeros((*BATCH, T), bool)
    tm = _primitives(lambda x, r: ys(x, r, True), xs_tm, reset_tm)
    bm = _primitives(lambda x, r: ys(x, r, False), xs_bm, reset_bm)
    assert bm - tm == collections.Counter(transpose=3) and not tm - bm

    def grad(time_major):
        return jax.grad(lambda x: jnp.sum(ys(x, None, time_major) ** 2))

    tm = _primitives(grad(True), xs_tm)
    bm = _primitives(grad(False), xs_bm)
    assert bm - tm == collections.Counter(transpose=4) and not tm - bm
