"""jaxseq.flax: the linen and NNX modules equal Flax's own RNN/Bidirectional, and train.

The reference is Flax itself (flax.linen.RNN / flax.nnx.RNN over its cells) with
the same weights; gradients are compared in jaxseq's layout after a per-gate
concatenation written here. Shapes are tiny and every option combination of a
cell kind runs inside one jitted function, so each kind compiles once per side.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import jaxseq as js  # noqa: E402
import jaxseq.flax as jf  # noqa: E402

B, T, D, H = 3, 5, 2, 3
LENGTHS = jnp.array([5, 2, 0])
TOL = dict(rtol=1e-5, atol=1e-5)


def _cat(g, names, leaf):
    return jnp.concatenate([g[n][leaf] for n in names], axis=-1)


def _flax_grads_as_jaxseq(kind, g):
    """Flax per-gate gradients -> jaxseq's fused layout (a plain rearrangement)."""
    if kind == "lstm":
        return js.recurrent.LSTMParams(
            _cat(g, ["ii", "if", "ig", "io"], "kernel"),
            _cat(g, ["hi", "hf", "hg", "ho"], "kernel"),
            _cat(g, ["hi", "hf", "hg", "ho"], "bias"),
        )
    if kind == "gru":
        return js.recurrent.GRUParams(
            _cat(g, ["ir", "iz", "in"], "kernel"),
            _cat(g, ["hr", "hz", "hn"], "kernel"),
            _cat(g, ["ir", "iz", "in"], "bias"),
            g["hn"]["bias"],
        )
    return js.recurrent.RNNParams(g["i"]["kernel"], g["h"]["kernel"], g["i"]["bias"])


def _close(a, b, what):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert len(la) == len(lb), f"{what}: {ta} vs {tb}"
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.shape == y.shape, f"{what}[{i}]: {x.shape} vs {y.shape}"
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=f"{what}[{i}]", **TOL)


def _weighted_sum(tree, key):
    leaves = jax.tree_util.tree_leaves(tree)
    keys = jax.random.split(key, len(leaves))
    return sum(jnp.sum(leaf * jax.random.normal(k, leaf.shape)) for leaf, k in zip(leaves, keys))


def _combos(rnn_call, bidir_call, x, carry0, full=True):
    """The option combinations of the parity tests, as one pytree of outputs.

    Lengths with a 0 (its carry), reverse without keep_order, time-major with an
    initial carry, reverse + keep_order without lengths, and a Bidirectional
    (its backward half: reverse + keep_order under lengths). ``full=False``
    (the NNX wrappers, which share the linen code path): the first and a
    time-major Bidirectional from initial carries.
    """
    xt = jnp.swapaxes(x, 0, 1)
    first = rnn_call(x, seq_lengths=LENGTHS, reverse=True, return_carry=True)
    if not full:
        bidir = bidir_call(xt, initial_carry=(carry0, carry0), seq_lengths=LENGTHS, time_major=True)
        return [first, bidir]
    return [
        first,
        rnn_call(xt, initial_carry=carry0, seq_lengths=LENGTHS, time_major=True, return_carry=True),
        rnn_call(x, reverse=True, keep_order=True),
        bidir_call(x, seq_lengths=LENGTHS),
    ]


LINEN_CELLS = {
    "lstm": (lambda: nn.OptimizedLSTMCell(H), lambda: js.LSTM(H)),
    "lstm_plain": (lambda: nn.LSTMCell(H), lambda: js.LSTM(H)),
    "gru": (lambda: nn.GRUCell(H), lambda: js.GRU(H)),
    "rnn_relu": (lambda: nn.SimpleCell(H, activation_fn=nn.relu), lambda: js.RNN(H, "relu")),
}


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_linen_matches_flax_values_and_gradients(name):
    flax_cell, js_cell = LINEN_CELLS[name]
    kind = name.split("_")[0]
    kx, kc, kl, kp, kq = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(kx, (B, T, D))
    carry0 = jax.random.normal(kc, (B, H))
    carry0 = (carry0, -carry0) if kind == "lstm" else carry0

    f_rnn, f_bi = nn.RNN(flax_cell()), nn.Bidirectional(nn.RNN(flax_cell()), nn.RNN(flax_cell()))
    f_vars = {"rnn": f_rnn.init(kp, x)["params"], "bi": f_bi.init(kq, x)["params"]}
    j_rnn = jf.linen.RNN(js_cell(), unroll=1)  # unroll=1: the quickest compile
    j_bi = jf.linen.Bidirectional(
        jf.linen.RNN(js_cell(), unroll=1), jf.linen.RNN(js_cell(), unroll=1)
    )
    j_vars = {
        "rnn": jf.linen.variables_from_flax(js_cell(), f_vars["rnn"])["params"],
        "bi": jf.linen.variables_from_flax(js.Bidirectional(js_cell()), f_vars["bi"])["params"],
    }

    def loss(rnn, bi, v, x):
        out = _combos(
            lambda *a, **k: rnn.apply({"params": v["rnn"]}, *a, **k),
            lambda *a, **k: bi.apply({"params": v["bi"]}, *a, **k),
            x,
            carry0,
        )
        return _weighted_sum(out, kl), out

    grad = lambda rnn, bi: jax.jit(
        jax.value_and_grad(lambda v, x: loss(rnn, bi, v, x), argnums=(0, 1), has_aux=True)
    )
    (_, f_out), (f_gv, f_gx) = grad(f_rnn, f_bi)(f_vars, x)
    (_, j_out), (j_gv, j_gx) = grad(j_rnn, j_bi)(j_vars, x)

    _close(j_out, f_out, f"{name} outputs and carries")
    _close(j_gx, f_gx, f"{name} d/dx")
    _close(j_gv["rnn"]["cell"], _flax_grads_as_jaxseq(kind, f_gv["rnn"]["cell"]), "d/dparams")
    for half in ("forward_rnn", "backward_rnn"):
        want = _flax_grads_as_jaxseq(kind, f_gv["bi"][half]["cell"])
        _close(j_gv["bi"][half]["cell"], want, f"{name} {half} d/dparams")


def test_nnx_residual_relu_simple_cell_values():
    old = nnx.RNN(NNX_CELLS["rnn_res"](nnx.Rngs(11)))
    new = jf.nnx.from_flax(old)
    assert new.cell == js.RNN(H, activation="relu")
    x = jax.random.normal(jax.random.key(12), (B, T, D))
    want = old(x, seq_lengths=LENGTHS, return_carry=True)
    _close(new(x, seq_lengths=LENGTHS, return_carry=True), want, "SimpleCell(residual, relu)")


def test_linen_variables_round_trip_and_plain_lstm_cell():
    flax_cell, js_cell = LINEN_CELLS["lstm_plain"]
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    old = nn.RNN(flax_cell())
    old_vars = old.init(jax.random.key(4), x)
    new_vars = jf.linen.variables_from_flax(js_cell(), old_vars)
    ys = jf.linen.RNN(js_cell()).apply(new_vars, x, seq_lengths=LENGTHS)
    _close(ys, old.apply(old_vars, x, seq_lengths=LENGTHS), "LSTMCell outputs")
    back = jf.linen.variables_to_flax(js_cell(), new_vars)
    _close(back["params"]["cell"], dict(old_vars["params"]["cell"]), "round trip")


def test_linen_layers_follow_flax_at_valid_steps_and_zero_padding():
    # A js.Stack of two LSTMs in one module equals two stacked nn.RNNs at valid
    # steps; its padded outputs are zeros (jaxseq's semantics for layers).
    x = jax.random.normal(jax.random.key(5), (B, T, D))
    f1, f2 = nn.RNN(nn.OptimizedLSTMCell(H)), nn.RNN(nn.OptimizedLSTMCell(H))
    v1 = f1.init(jax.random.key(6), x)
    v2 = f2.init(jax.random.key(7), jnp.zeros((B, T, H)))
    want = f2.apply(v2, f1.apply(v1, x, seq_lengths=LENGTHS), seq_lengths=LENGTHS)
    p = (
        jf.linen.variables_from_flax(js.LSTM(H), v1)["params"]["cell"],
        jf.linen.variables_from_flax(js.LSTM(H), v2)["params"]["cell"],
    )
    got = jf.linen.RNN(js.Stack([js.LSTM(H), js.LSTM(H)])).apply(
        {"params": {"cell": p}}, x, seq_lengths=LENGTHS
    )
    valid = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    np.testing.assert_allclose(got[valid], want[valid], **TOL)
    assert np.all(np.asarray(got)[~valid] == 0)


NNX_CELLS = {
    "lstm": lambda r: nnx.LSTMCell(D, H, rngs=r),
    "lstm_opt": lambda r: nnx.OptimizedLSTMCell(D, H, rngs=r),
    "gru": lambda r: nnx.GRUCell(D, H, rngs=r),
    "rnn_res": lambda r: nnx.SimpleCell(D, H, residual=True, activation_fn=nnx.relu, rngs=r),
}


def _nnx_grads_as_jaxseq(name, g):
    """nnx cell gradients (a State) -> jaxseq's (w_ih, w_hh, b) layout."""
    v = lambda *path: _get(g, path)
    if name == "lstm":
        cat = lambda names, leaf: jnp.concatenate([v(n, leaf) for n in names], axis=-1)
        return (
            cat(["ii", "if_", "ig", "io"], "kernel"),
            cat(["hi", "hf", "hg", "ho"], "kernel"),
            cat(["hi", "hf", "hg", "ho"], "bias"),
        )
    bias = "dense_h" if name == "lstm_opt" else "dense_i"
    return v("dense_i", "kernel"), v("dense_h", "kernel"), v(bias, "bias")


def _get(state, path):
    for k in path:
        state = state[k]
    return state[...] if isinstance(state, nnx.Variable) else getattr(state, "value", state)


class _Pair(nnx.Module):
    def __init__(self, rnn, bi):
        self.rnn, self.bi = rnn, bi


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_nnx_matches_flax_values_and_gradients(name):
    make = NNX_CELLS[name]
    kind = name.split("_")[0]
    rngs = nnx.Rngs(1)
    kx, kc, kl = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (B, T, D))
    carry0 = jax.random.normal(kc, (B, H))
    carry0 = (carry0, -carry0) if kind == "lstm" else carry0
    f_model = _Pair(
        nnx.RNN(make(rngs)), nnx.Bidirectional(nnx.RNN(make(rngs)), nnx.RNN(make(rngs)))
    )
    j_model = _Pair(jf.nnx.from_flax(f_model.rnn, unroll=1), jf.nnx.from_flax(f_model.bi, unroll=1))
    assert isinstance(j_model.bi, jf.nnx.Bidirectional) and j_model.rnn.cell.hidden_size == H

    @nnx.jit
    def run(model, x):
        def loss(model, x):
            out = _combos(model.rnn, model.bi, x, carry0, full=False)
            return _weighted_sum(out, kl), out

        return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)

    (_, f_out), (f_g, f_gx) = run(f_model, x)
    (_, j_out), (j_g, j_gx) = run(j_model, x)
    _close(j_out, f_out, f"{name} outputs and carries")
    _close(j_gx, f_gx, f"{name} d/dx")
    pairs = [(f_g["rnn"]["cell"], j_g["rnn"]["params"])]
    for half in ("forward_rnn", "backward_rnn"):
        pairs.append((f_g["bi"][half]["cell"], j_g["bi"][half]["params"]))
    for gf, gj in pairs:
        want = _nnx_grads_as_jaxseq(name, gf)
        got = tuple(_get(gj, (k,)) for k in ("w_ih", "w_hh", "b"))
        _close(got, want, f"{name} d/dparams")


# ----------------------------------------------------------------------------- training

V, E = 7, 8  # vocabulary, embedding and hidden size of the small models


def _batch():
    tokens = jax.random.randint(jax.random.key(8), (4, 6), 0, V)
    return tokens[:, :-1], tokens[:, 1:]


class _LinenModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(V, E)(tokens)
        h = jf.linen.RNN(js.LSTM(E), unroll=1)(h)
        h = jf.linen.RNN(js.LSTM(E), unroll=1)(h)
        return nn.Dense(V)(h)


def _xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_linen_model_trains_under_jit():
    inputs, targets = _batch()
    model, tx = _LinenModel(), optax.adam(0.1)
    params = model.init(jax.random.key(9), inputs)["params"]
    assert isinstance(params["RNN_0"]["cell"], js.recurrent.LSTMParams)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: _xent(model.apply({"params": p}, inputs), targets)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(6):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert (
        np.all(np.isfinite(losses)) and np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0]
    ), losses


class _NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, E, rngs=rngs)
        self.rnn1 = jf.nnx.RNN(js.LSTM(E), E, rngs=rngs, unroll=1)
        self.rnn2 = jf.nnx.RNN(js.LSTM(E), E, rngs=rngs, unroll=1)
        self.head = nnx.Linear(E, V, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.rnn2(self.rnn1(self.embed(tokens))))


def test_nnx_model_trains_under_nnx_jit_with_optimizer():
    inputs, targets = _batch()
    model = _NnxModel(nnx.Rngs(10))
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _xent(m(inputs), targets))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(6)]
    assert (
        np.all(np.isfinite(losses)) and np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0]
    ), losses


# ----------------------------------------------------------------------------- contract


def test_import_jaxseq_does_not_import_flax_and_missing_flax_says_how_to_install():
    code = (
        "import sys, jaxseq\n"
        "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules)\n"
        "sys.modules['flax'] = None\n"
        "try:\n"
        "    import jaxseq.flax\n"
        "except ImportError as e:\n"
        "    assert 'pip install flax' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_errors_name_the_argument():
    rnn = jf.linen.RNN(js.GRU(H))
    x = jnp.ones((B, T, D))
    variables = rnn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \[3\]"):
        rnn.apply(variables, x, seq_lengths=jnp.array([1, 2]))
    with pytest.raises(TypeError, match="seq_lengths: expected an integer"):
        rnn.apply(variables, x, seq_lengths=jnp.ones(B))
    with pytest.raises(ValueError, match=r"seq_lengths: expected values in \[0, 5\]"):
        rnn.apply(variables, x, seq_lengths=jnp.array([1, 6, 2]))
    with pytest.raises(TypeError, match="cell: expected a jaxseq cell.*a Flax cell"):
        jf.linen.RNN(nn.GRUCell(H)).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="inputs: expected a floating"):
        rnn.apply(variables, jnp.ones((B, T, D), jnp.int32))
    with pytest.raises(TypeError, match="reverse: expected a Python bool"):
        rnn.apply(variables, x, reverse="yes")
    with pytest.raises(ValueError, match="in_features: expected a positive int"):
        jf.nnx.RNN(js.GRU(H), 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="cell: expected nnx.LSTMCell"):
        jf.nnx.cell_from_flax(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="missing"):
        jf.linen.variables_from_flax(js.LSTM(H), {"params": {"cell": {"i": {}}}})
