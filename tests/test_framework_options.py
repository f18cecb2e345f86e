"""Every option of every framework module, with a cell and with a layer inside, against a loop.

The modules: ``jaxseq.flax.linen.RNN``/``Bidirectional``, ``jaxseq.flax.nnx.RNN``/
``Bidirectional`` and ``jaxseq.equinox.RNN``/``Bidirectional``/``Stack``. The options:
``reverse``, ``keep_order``, ``seq_lengths`` (with a length 0), ``initial_carry``,
``return_carry`` and both layouts (batch-major ``[B, T, D]``, time-major ``[T, B, D]``).

The reference is written here and shares nothing with the code under test: a Python
loop over time calling ``cell.step`` on one example at a time, numpy index arrays for
the reversed orders, and the documented semantics spelt out:

* a cell (Flax's semantics) runs all ``T`` steps, padding included; reversed, it runs
  over ``x[(L - 1 - t) mod T]`` (each valid part reversed, the padding after it) and
  returns the outputs in that processed order unless ``keep_order``; its carry is the
  one after the last valid step (after all ``T`` at length 0);
* a layer (``js.Stack``, ``js.Bidirectional``: jaxseq's semantics) runs over the valid
  part only (reversed: from its last step), padded outputs are zeros, its carry at
  length 0 is the initial one; reversed without ``keep_order`` the outputs come in
  processed order too.

Each kind of inner cell/layer compiles once: all option cases of all three frameworks
run inside one jitted function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("equinox")
from flax import nnx  # noqa: E402

import jaxseq as js  # noqa: E402
import jaxseq.equinox as jeqx  # noqa: E402
import jaxseq.flax as jf  # noqa: E402

B, T, D, H = 3, 5, 3, 4
LENGTHS = np.array([5, 2, 0])
TOL = dict(rtol=1e-5, atol=1e-5)

INNER = {
    "lstm": lambda: js.LSTM(H),
    "gru": lambda: js.GRU(H),
    "stack": lambda: js.Stack([js.LSTM(H), js.GRU(H)]),
    "bidirectional": lambda: js.Bidirectional(js.LSTM(H), js.GRU(2)),
}

# (reverse, keep_order, lengths, initial carry, time_major, return_carry): each option
# on and off, with and without lengths, in both layouts.
CASES = [
    (False, False, False, False, False, False),
    (False, False, True, True, True, True),
    (True, False, True, False, False, True),
    (True, False, False, True, True, True),
    (True, True, True, True, False, True),
    (True, True, False, False, True, True),
]


# ------------------------------------------------------------------------------ reference


def _is_cell(layer) -> bool:
    return not isinstance(layer, js.Stack | js.Bidirectional)


def _steps(cell, params, xs, carry):
    """``cell.step`` over the rows of ``xs [n, D]``: every carry and output, in order."""
    carries, ys = [], []
    for x in xs:
        carry, y = cell.step(params, carry, jnp.asarray(x))
        carries.append(carry)
        ys.append(np.asarray(y))
    return carries, ys


def _layer_valid(layer, params, xs, carry, reverse):
    """jaxseq's layer semantics over one valid part ``xs [L, D]``: ``(carry, ys [L, H])``."""
    if isinstance(layer, js.Stack):
        carries = []
        for sub, p, c in zip(layer.layers, params, carry):
            c, xs = _layer_valid(sub, p, xs, c, reverse)
            carries.append(c)
        return tuple(carries), xs
    if isinstance(layer, js.Bidirectional):
        cf, yf = _layer_valid(layer.forward, params.forward, xs, carry.forward, reverse)
        cb, yb = _layer_valid(layer.backward, params.backward, xs, carry.backward, not reverse)
        return js.recurrent.BidirectionalCarry(cf, cb), np.concatenate([yf, yb], axis=-1)
    order = np.arange(len(xs))[::-1] if reverse else np.arange(len(xs))
    carries, ys = _steps(layer, params, xs[order], carry)
    out = np.zeros((len(xs), layer.output_size), np.float32)
    out[order] = np.asarray(ys).reshape(out.shape)
    return (carries[-1] if carries else carry), out


def _one(layer, params, x, length, carry, reverse, keep_order):
    """One example ``x [T, D]`` through an RNN module: ``(jaxseq carry, ys [T, H])``."""
    processed = (length - 1 - np.arange(T)) % T  # the flip, its own inverse
    if _is_cell(layer):
        order = processed if reverse else np.arange(T)
        carries, ys = _steps(layer, params, x[order], carry)
        ys = np.asarray(ys)
        if reverse and keep_order:
            ys = ys[processed]
        return carries[length - 1] if length > 0 else carries[-1], ys
    carry, valid = _layer_valid(layer, params, x[:length], carry, reverse)
    ys = np.zeros((T, layer.output_size), np.float32)
    ys[:length] = valid
    return carry, (ys[processed] if reverse and not keep_order else ys)


def reference_rnn(layer, params, x, lengths, carry, reverse=False, keep_order=False):
    """An RNN module over ``x [B, T, D]`` (batch-major): ``(jaxseq carry [B, ...], ys [B, T, H])``."""
    carries, ys = [], []
    for b in range(B):
        c = layer.initial_carry(()) if carry is None else jax.tree.map(lambda a, b=b: a[b], carry)
        length = T if lengths is None else int(lengths[b])
        c, y = _one(layer, params, np.asarray(x[b]), length, c, reverse, keep_order)
        carries.append(c)
        ys.append(y)
    return jax.tree.map(lambda *a: np.stack(a), *carries), np.stack(ys)


def to_framework(layer, carry, framework, plain=False):
    """A jaxseq carry as the framework's modules return it (built-in cells only): Flax's
    LSTM ``(c, h)``, Equinox's ``LSTMCarry(h, c)`` (``plain``: the tuple ``(h, c)``, as
    an Equinox user passes it), ``h`` for a GRU; a layer's is jaxseq's."""
    if carry is None or not isinstance(layer, js.LSTM | js.GRU | js.RNN):
        return carry
    if isinstance(layer, js.LSTM):
        if framework == "equinox":
            return (carry.h, carry.c) if plain else carry
        return (carry.c, carry.h)
    return carry.h


# Random numbers from numpy: jax.random would compile a program for every new shape.


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _params(layer, d, seed):
    """Random params of ``layer.init``'s structure (biases too), without running its
    initialisers (an orthogonal init compiles many small programs)."""
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), d))
    leaves, tree = jax.tree.flatten(shapes)
    return tree.unflatten([_normal([seed, i], a.shape, 0.5) for i, a in enumerate(leaves)])


def _random_carry(layer, seed):
    leaves, tree = jax.tree.flatten(layer.initial_carry((B,)))
    return tree.unflatten([_normal([seed, i], a.shape) for i, a in enumerate(leaves)])


def _close(got, want, what):
    gl, gt = jax.tree.flatten(got)
    wl, wt = jax.tree.flatten(want)
    assert gt == wt, f"{what}: structure {gt} vs {wt}"
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert g.shape == w.shape, f"{what}[{i}]: {g.shape} vs {w.shape}"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=f"{what}[{i}]", **TOL)


# ------------------------------------------------------------------------------ modules


# unroll=1 (any unroll computes the same): small loops compile several times faster.


def _eqx_rnn(layer, d, params):
    return jeqx.RNN(layer, input_size=d, params=params, unroll=1)


def _nnx_rnn(layer, params):
    # built abstractly (nothing initialised), then given the params
    rnn = nnx.eval_shape(lambda: jf.nnx.RNN(layer, D, rngs=nnx.Rngs(0), unroll=1))
    rnn.params = nnx.data(jax.tree.map(nnx.Param, params))
    return rnn


def rnn_calls(layer, params):
    """``framework -> call(inputs, initial_carry, **options)`` for the RNN modules."""
    linen = jf.linen.RNN(layer, unroll=1)
    variables = {"params": {"cell": params}}
    return {
        "linen": lambda x, c=None, **kw: linen.apply(variables, x, c, **kw),
        "nnx": _nnx_rnn(layer, params),
        "equinox": _eqx_rnn(layer, D, params),
    }


def bidirectional_calls(fwd, bwd, pf, pb):
    linen = jf.linen.Bidirectional(jf.linen.RNN(fwd, unroll=1), jf.linen.RNN(bwd, unroll=1))
    variables = {"params": {"forward_rnn": {"cell": pf}, "backward_rnn": {"cell": pb}}}
    return {
        "linen": lambda x, c=None, **kw: linen.apply(variables, x, c, **kw),
        "nnx": jf.nnx.Bidirectional(_nnx_rnn(fwd, pf), _nnx_rnn(bwd, pb)),
        "equinox": jeqx.Bidirectional(_eqx_rnn(fwd, D, pf), _eqx_rnn(bwd, D, pb)),
    }


def _inputs(seed=1):
    return _normal(seed, (B, T, D))


def _run_case(call, x, options, lengths, carry, time_major, return_carry):
    """One module call; outputs back to batch-major."""
    xs = jnp.swapaxes(x, 0, 1) if time_major else x
    out = call(
        xs,
        carry,
        seq_lengths=None if lengths is None else jnp.asarray(lengths),
        time_major=time_major,
        return_carry=return_carry,
        **options,
    )
    carry, ys = out if return_carry else (None, out)
    return carry, (jnp.swapaxes(ys, 0, 1) if time_major else ys)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("inner", sorted(INNER))
def test_rnn_modules_follow_the_loop_for_every_option(inner):
    layer = INNER[inner]()
    params = _params(layer, D, 0)
    x = _inputs()
    carry0 = _random_carry(layer, 2)
    calls = rnn_calls(layer, params)

    def all_cases():
        out = {}
        for fw, call in calls.items():
            for i, (rev, keep, use_len, use_carry, tm, ret) in enumerate(CASES):
                c = to_framework(layer, carry0, fw, plain=True) if use_carry else None
                lengths = LENGTHS if use_len else None
                opts = dict(reverse=rev, keep_order=keep)
                out[fw, i] = _run_case(call, x, opts, lengths, c, tm, ret)
        return out

    got = jax.jit(all_cases)()  # one compilation for every case of every framework
    for i, (rev, keep, use_len, use_carry, _, ret) in enumerate(CASES):
        want_c, want_y = reference_rnn(
            layer,
            params,
            x,
            LENGTHS if use_len else None,
            carry0 if use_carry else None,
            reverse=rev,
            keep_order=keep,
        )
        for fw in calls:
            what = f"{fw} {inner} case {CASES[i]}"
            carry, ys = got[fw, i]
            _close(ys, want_y, f"{what} outputs")
            if ret:
                _close(carry, to_framework(layer, want_c, fw), f"{what} carry")
            else:
                assert carry is None


# forward and backward inner parts of the Bidirectional modules' halves
HALVES = {
    "cells": lambda: (js.LSTM(H), js.GRU(2)),
    "layers": lambda: (js.Stack([js.GRU(H), js.LSTM(2)]), js.Bidirectional(js.LSTM(2))),
}
# (lengths, initial carry, time_major, return_carry)
BI_CASES = [(True, True, False, True), (False, False, True, True), (True, False, True, False)]


@pytest.mark.parametrize("halves", sorted(HALVES))
def test_bidirectional_modules_follow_the_loop(halves):
    fwd, bwd = HALVES[halves]()
    kf, kb, kc, kd = 30, 31, 32, 33
    pf, pb = _params(fwd, D, kf), _params(bwd, D, kb)
    x = _inputs(4)
    cf0, cb0 = _random_carry(fwd, kc), _random_carry(bwd, kd)
    calls = bidirectional_calls(fwd, bwd, pf, pb)

    def all_cases():
        out = {}
        for fw, call in calls.items():
            for i, (use_len, use_carry, tm, ret) in enumerate(BI_CASES):
                c = None
                if use_carry:
                    c = (to_framework(fwd, cf0, fw, True), to_framework(bwd, cb0, fw, True))
                lengths = LENGTHS if use_len else None
                out[fw, i] = _run_case(call, x, {}, lengths, c, tm, ret)
        return out

    got = jax.jit(all_cases)()
    for i, (use_len, use_carry, _, ret) in enumerate(BI_CASES):
        lengths = LENGTHS if use_len else None
        want_cf, yf = reference_rnn(fwd, pf, x, lengths, cf0 if use_carry else None)
        want_cb, yb = reference_rnn(
            bwd, pb, x, lengths, cb0 if use_carry else None, reverse=True, keep_order=True
        )
        for fw in calls:
            what = f"{fw} Bidirectional({halves}) case {BI_CASES[i]}"
            carry, ys = got[fw, i]
            _close(ys, np.concatenate([yf, yb], axis=-1), f"{what} outputs")
            if ret:
                want = (to_framework(fwd, want_cf, fw), to_framework(bwd, want_cb, fw))
                _close(carry, want, f"{what} carry")


def test_equinox_stack_follows_the_loop():
    """``jaxseq.equinox.Stack`` of a cell's RNN, a layer's RNN and a Bidirectional module."""
    cell, layer, fwd, bwd = js.LSTM(H), js.Bidirectional(js.GRU(2)), js.GRU(2), js.LSTM(3)
    keys = range(50, 58)
    p0, p1 = _params(cell, D, keys[0]), _params(layer, H, keys[1])
    pf, pb = _params(fwd, 4, keys[2]), _params(bwd, 4, keys[3])
    bi = jeqx.Bidirectional(_eqx_rnn(fwd, 4, pf), _eqx_rnn(bwd, 4, pb))
    stack = jeqx.Stack([_eqx_rnn(cell, D, p0), _eqx_rnn(layer, H, p1), bi])
    x = _inputs(6)
    c0, c1 = _random_carry(cell, keys[4]), _random_carry(layer, keys[5])
    cf, cb = _random_carry(fwd, keys[6]), _random_carry(bwd, keys[7])
    initial = ((c0.h, c0.c), c1, (cf.h, (cb.h, cb.c)))  # as an Equinox user writes them

    def both():
        a = _run_case(stack, x, {}, LENGTHS, initial, False, True)
        b = _run_case(stack, x, {}, None, None, True, True)
        return a, b

    got = jax.jit(both)()
    for (carry, ys), lengths, carries in zip(got, (LENGTHS, None), ((c0, c1, cf, cb), None)):
        c0_, c1_, cf_, cb_ = carries or (None,) * 4
        w0, h = reference_rnn(cell, p0, x, lengths, c0_)
        w1, h = reference_rnn(layer, p1, h, lengths, c1_)
        wf, yf = reference_rnn(fwd, pf, h, lengths, cf_)
        wb, yb = reference_rnn(bwd, pb, h, lengths, cb_, reverse=True, keep_order=True)
        _close(ys, np.concatenate([yf, yb], axis=-1), f"Stack outputs, lengths {lengths}")
        want = (
            to_framework(cell, w0, "equinox"),
            w1,
            (to_framework(fwd, wf, "equinox"), to_framework(bwd, wb, "equinox")),
        )
        _close(carry, want, f"Stack carries, lengths {lengths}")
