"""The wavefront kernel of a Stack (jaxseq.recurrent.wavefront) against the layer-by-layer
paths: the fused kernel per layer, and js.rollout_unrolled composed layer by layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxseq as js
from jaxseq.nn.dropout import dropout
from jaxseq.recurrent import dispatch
from jaxseq.recurrent.wavefront import wavefront_rollout

KINDS = {
    "lstm": lambda h: js.LSTM(h),
    "gru": lambda h: js.GRU(h),
    "tanh": lambda h: js.RNN(h),
}
SIZES = (4, 5, 3)  # hidden sizes of layers 0, 1, 2
B, D = 2, 3


def _problem(kind, n_layers, t, seed=0, dtype=jnp.float32):
    stack = js.Stack([KINDS[kind](SIZES[i]) for i in range(n_layers)], dropout_rate=0.3)
    ks = jax.random.split(jax.random.key(seed), 4)
    params = stack.init(ks[0], D, dtype)
    xs = jax.random.normal(ks[1], (t, B, D), dtype)
    carries = jax.tree_util.tree_map(
        lambda a, k=ks[2]: 0.5 * jax.random.normal(k, a.shape, dtype), stack.initial_carry((B,))
    )
    return stack, params, xs, carries


def _unrolled(stack, params, xs, carries, key, lengths=None, reset=None):
    """The reference: rollout_unrolled layer by layer, dropout() in between as Stack draws it."""
    keys = jax.random.split(key, len(stack.layers) - 1) if key is not None else None
    axes = (0,) if stack.variational_dropout else ()
    finals, h = [], xs
    for i, (cell, p, c) in enumerate(zip(stack.layers, params, carries)):
        c, y = js.rollout_unrolled(cell, p, h, c, lengths=lengths, reset=reset)
        if keys is not None and i < len(stack.layers) - 1:
            y = dropout(keys[i], y, stack.dropout_rate, shared_axes=axes)
        finals.append(c)
        h = y
    return tuple(finals), h


def _loss(fn):
    def f(params, xs, carries):
        finals, ys = fn(params, xs, carries)
        w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(finals))

    return f


def _value_grad(fn, params, xs, carries):
    """``((finals, ys), grads)``: the outputs of the forward that feeds the gradient, and the
    gradients of a loss of all outputs w.r.t. params, xs and the initial carries."""

    def f(params, xs, carries):
        out = fn(params, xs, carries)
        return _loss(lambda *a: out)(params, xs, carries), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        params, xs, carries
    )
    return out, grads


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol)


def _paths(stack, key, **kw):
    def wave(p, x, c):
        return stack.rollout(p, x, c, key=key, wavefront=True, **kw)

    def layers(p, x, c):
        return stack.rollout(p, x, c, key=key, wavefront=False, kernel="fused", **kw)

    return wave, layers


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("n_layers,t", [(2, 7), (3, 1)])
def test_matches_layer_by_layer(kind, n_layers, t):
    stack, params, xs, carries = _problem(kind, n_layers, t)
    wave, layers = _paths(stack, jax.random.key(5))
    out, grads = _value_grad(wave, params, xs, carries)  # the wavefront's forward and backward
    want, want_grads = _value_grad(layers, params, xs, carries)
    _close(out, want, 1e-6)
    _close(grads, want_grads, 2e-5)
    _close(jax.jit(wave)(params, xs, carries), want, 1e-6)  # inference


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matches_unrolled_with_lengths_and_reset(kind):
    """Three layers, T = 7, against rollout_unrolled composed layer by layer (an independent
    reference), with right padding, resets and dropout shared over time."""
    stack, params, xs, carries = _problem(kind, 3, 7, seed=1)
    stack = js.Stack(stack.layers, dropout_rate=0.4, variational_dropout=True)
    lengths = jnp.array([7, 4])
    reset = jnp.zeros((7, B), bool).at[2, 0].set(True).at[5, 1].set(True)
    key = jax.random.key(3)
    kw = dict(lengths=lengths, reset=reset)
    wave, _ = _paths(stack, key, **kw)
    out, grads = _value_grad(wave, params, xs, carries)
    ref, ref_grads = _value_grad(
        lambda p, x, c: _unrolled(stack, p, x, c, key, **kw), params, xs, carries
    )
    _close(out, ref, 1e-5)
    _close(grads, ref_grads, 5e-5)
    assert bool(jnp.all(out[1][4:, 1] == 0))  # padded steps output zeros


def test_no_dropout_without_key_and_unroll():
    stack, params, xs, carries = _problem("lstm", 2, 9, seed=2)
    got = _value_grad(
        lambda p, x, c: stack.rollout(p, x, c, wavefront=True, unroll=3), params, xs, carries
    )
    want = _value_grad(lambda p, x, c: stack.rollout(p, x, c, wavefront=False), params, xs, carries)
    _close(got, want, 2e-5)


def test_check_grads_float64():
    with jax.enable_x64(True):
        cells = [js.LSTM(3), js.LSTM(2)]
        ks = jax.random.split(jax.random.key(0), 4)
        params = (cells[0].init(ks[0], 2, jnp.float64), cells[1].init(ks[1], 3, jnp.float64))
        xs = jax.random.normal(ks[2], (3, 2, 2), jnp.float64)
        carries = tuple(c.initial_carry((2,), jnp.float64) for c in cells)
        keep = (jax.random.bernoulli(ks[3], 0.7, (3, 2, 3)),)

        @jax.jit
        def f(params, xs, carries):
            finals, ys = wavefront_rollout(cells, params, xs, carries, keep=keep, rate=0.3)
            return ys, finals

        check_grads(f, (params, xs, carries), order=1, modes=["rev"])


def test_batch_major_and_batch_dims():
    stack, params, xs, carries = _problem("gru", 2, 5, seed=4)
    xs4 = jnp.stack([xs, 2 * xs], axis=2)  # [T, B, 2, D]
    c4 = stack.initial_carry((B, 2))
    got = stack.rollout(params, jnp.moveaxis(xs4, 0, 2), c4, time_major=False, wavefront=True)
    want = stack.rollout(params, xs4, c4, wavefront=False)
    _close((got[0], jnp.moveaxis(got[1], 2, 0)), want, 1e-6)


def test_rule_keeps_the_char_lm_layer_by_layer():
    """Measured (dispatch.wavefront_wins): the wavefront trains no faster on CPU, not even
    for the char-LM shape, so the automatic choice is layer by layer there."""
    assert not dispatch.wavefront_wins(js.LSTM(256), 2, (32,), 64, "cpu")
    stack, params, xs, carries = _problem("lstm", 2, 4)
    jaxpr = jax.make_jaxpr(lambda p, x: stack.rollout(p, x, key=jax.random.key(0)))(params, xs)
    assert "_wave" not in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda p, x: stack.rollout(p, x, key=jax.random.key(0), wavefront=True))(
        params, xs
    )
    assert "_wave" in str(jaxpr)


def test_not_eligible():
    stack, params, xs, carries = _problem("lstm", 2, 4)
    cases = [
        (js.Stack(stack.layers, residual=False), dict(reverse=True), "reverse"),
        (js.Stack(stack.layers), dict(checkpoint_every=2), "checkpoint_every"),
        (js.Stack(stack.layers), dict(kernel="scan"), "scan"),
        (js.Stack([js.LSTM(4), js.GRU(5)]), {}, "one kind"),
        (js.Stack([js.LSTM(4)]), {}, "at least 2"),
    ]
    for s, kw, msg in cases:
        p = s.init(jax.random.key(0), D)
        with pytest.raises(ValueError, match=msg):
            s.rollout(p, xs, wavefront=True, **kw)
        s.rollout(p, xs, **kw)  # automatic: layer by layer
    res = js.Stack([js.GRU(4), js.GRU(4)], residual=True)
    with pytest.raises(ValueError, match="residual"):
        res.rollout(res.init(jax.random.key(0), D), xs, wavefront=True)
    with pytest.raises(TypeError, match="wavefront"):
        stack.rollout(params, xs, wavefront="yes")


def test_forward_mode_falls_back():
    stack, params, xs, carries = _problem("gru", 2, 4)
    f = lambda x: stack.rollout(params, x, carries)[1]  # noqa: E731
    _, tangent = jax.jvp(f, (xs,), (jnp.ones_like(xs),))
    _, want = jax.jvp(
        lambda x: stack.rollout(params, x, carries, kernel="scan")[1], (xs,), (jnp.ones_like(xs),)
    )
    _close(tangent, want, 1e-5)
