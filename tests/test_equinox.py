"""jaxseq.equinox: the modules equal a lax.scan over Equinox's own cells, and train.

The reference is ``eqx.nn.LSTMCell``/``GRUCell`` run by ``jax.lax.scan`` over one
sequence (vmapped over the batch), with the weights the module was converted from;
gradients are compared in jaxseq's layout through the converter (a transpose, linear,
so it maps gradients as it maps weights). Every option of the modules is checked
against a loop in tests/test_framework_options.py.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")

import jaxseq as js  # noqa: E402
import jaxseq.equinox as jeqx  # noqa: E402

B, T, D, H = 3, 6, 2, 4
LENGTHS = jnp.array([6, 3, 1])
TOL = dict(rtol=1e-5, atol=1e-5)


def _close(a, b, what):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{what}: {ta} vs {tb}"
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.shape == y.shape, f"{what}[{i}]: {x.shape} vs {y.shape}"
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=f"{what}[{i}]", **TOL)


def _eqx_cell(kind, key):
    cls = eqx.nn.LSTMCell if kind == "lstm" else eqx.nn.GRUCell
    return cls(D, H, key=key)


def _scan(cell, x):
    """``lax.scan`` of an Equinox cell over ``x [T, D]``: every state (``h`` or ``(h, c)``)."""
    zeros = jnp.zeros(H)
    state = (zeros, zeros) if isinstance(cell, eqx.nn.LSTMCell) else zeros

    def step(state, x):
        state = cell(x, state)
        return state, state

    return jax.lax.scan(step, state, x)[1]


def _at_lengths(states, lengths):
    """``states[lengths - 1]`` per example of batched states ``[B, T, H]``."""
    idx = (lengths - 1)[:, None, None]
    return jax.tree.map(lambda s: jnp.take_along_axis(s, idx, axis=1)[:, 0], states)


def _valid(ys, lengths):
    return ys * (jnp.arange(ys.shape[1])[None, :] < lengths[:, None])[..., None]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_a_scan_of_the_equinox_cell_values_and_gradients(kind):
    cell = _eqx_cell(kind, jax.random.key(0))
    rnn = jeqx.from_equinox(cell, return_carry=True)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    w_y = jax.random.normal(jax.random.key(2), (B, T, H))
    w_c = jax.random.normal(jax.random.key(3), (B, H))

    def loss(outputs, carry):
        # at the valid steps only, and the carry at the last valid step
        h = carry[0] if kind == "lstm" else carry
        return jnp.sum(_valid(outputs, LENGTHS) * w_y) + jnp.sum(h * w_c)

    def loss_jaxseq(rnn):
        carry, ys = rnn(x, seq_lengths=LENGTHS)
        return loss(ys, carry), (carry, ys)

    def loss_equinox(cell):
        states = jax.vmap(lambda xb: _scan(cell, xb))(x)
        ys = states[0] if kind == "lstm" else states
        carry = _at_lengths(states, LENGTHS)
        return loss(ys, carry), (carry, ys)

    @eqx.filter_jit
    def both(rnn, cell):
        a = eqx.filter_value_and_grad(loss_jaxseq, has_aux=True)(rnn)
        b = eqx.filter_value_and_grad(loss_equinox, has_aux=True)(cell)
        return a, b

    ((l1, (c1, y1)), g1), ((l2, (c2, y2)), g2) = both(rnn, cell)
    _close(_valid(y1, LENGTHS), _valid(y2, LENGTHS), f"{kind} outputs at valid steps")
    _close(y1, y2, f"{kind} outputs (the cell continues over the padding, as the scan)")
    _close(tuple(c1) if kind == "lstm" else c1, c2, f"{kind} carry at the last valid step")
    np.testing.assert_allclose(float(l1), float(l2), **TOL)
    _close(g1.params, jeqx.cell_from_equinox(g2)[1], f"{kind} gradients")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_weights_round_trip_and_use_bias_false(kind):
    cell = _eqx_cell(kind, jax.random.key(4))
    back = jeqx.to_equinox(jeqx.from_equinox(cell))
    assert type(back) is type(cell)
    _close(eqx.filter(back, eqx.is_array), eqx.filter(cell, eqx.is_array), f"{kind} round trip")

    cls = eqx.nn.LSTMCell if kind == "lstm" else eqx.nn.GRUCell
    plain = cls(D, H, use_bias=False, key=jax.random.key(5))
    js_cell, params = jeqx.cell_from_equinox(plain)
    assert float(jnp.abs(params.b).sum()) == 0.0
    x = jax.random.normal(jax.random.key(6), (T, D))
    states = _scan(plain, x)
    ys = jeqx.RNN(js_cell, input_size=D, params=params)(x)  # one sequence: [T, D]
    _close(ys, states[0] if kind == "lstm" else states, f"{kind} use_bias=False")


def test_vmap_over_sequences_equals_the_batched_call():
    rnn = jeqx.RNN(js.LSTM(H), input_size=D, key=jax.random.key(7))
    x = jax.random.normal(jax.random.key(8), (B, T, D))
    vmapped, batched = jax.jit(lambda x: (jax.vmap(rnn)(x), rnn(x)))(x)
    _close(vmapped, batched, "vmap over [T, D]")


class _Tagger(eqx.Module):
    """Embedding, a jaxseq.equinox LSTM and Bidirectional GRU, and a per-step head."""

    embed: eqx.nn.Embedding
    rnn: jeqx.RNN
    bi: jeqx.Bidirectional
    head: eqx.nn.Linear

    def __init__(self, vocab, key):
        k = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(vocab, 8, key=k[0])
        opts = dict(unroll=1)  # compiles faster than an unrolled loop, computes the same
        self.rnn = jeqx.RNN(js.LSTM(16), input_size=8, key=k[1], **opts)
        self.bi = jeqx.Bidirectional(
            jeqx.RNN(js.GRU(8), input_size=16, key=k[2], **opts),
            jeqx.RNN(js.GRU(8), input_size=16, key=k[3], **opts),
        )
        self.head = eqx.nn.Linear(16, vocab, key=k[4])

    def __call__(self, tokens, lengths):  # [B, T] -> [B, T, vocab]
        h = jax.vmap(jax.vmap(self.embed))(tokens)
        h = self.bi(self.rnn(h, seq_lengths=lengths), seq_lengths=lengths)
        return jax.vmap(jax.vmap(self.head))(h)


def test_model_trains_under_filter_jit_with_optax():
    # the task: at each step, the token before the current one (needs the recurrence)
    vocab, b, t = 5, 8, 10
    tokens = jax.random.randint(jax.random.key(9), (b, t), 0, vocab)
    targets = jnp.concatenate([jnp.zeros((b, 1), tokens.dtype), tokens[:, :-1]], axis=1)
    lengths = jnp.array([10, 9, 8, 7, 10, 6, 10, 5])
    mask = jnp.arange(t)[None, :] < lengths[:, None]
    model = _Tagger(vocab, jax.random.key(10))
    optimizer = optax.adam(0.02)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model):
        logits = model(tokens, lengths)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(losses * mask) / jnp.sum(mask)

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for _ in range(30):
        model, state, loss = step(model, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- contract


def test_import_jaxseq_does_not_import_equinox_and_missing_equinox_says_how_to_install():
    code = (
        "import sys, jaxseq\n"
        "assert not any(m == 'equinox' or m.startswith('equinox.') for m in sys.modules)\n"
        "sys.modules['equinox'] = None\n"
        "try:\n"
        "    import jaxseq.equinox\n"
        "except ImportError as e:\n"
        "    assert 'pip install equinox' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_errors_name_the_argument():
    key = jax.random.key(0)
    rnn = jeqx.RNN(js.GRU(H), input_size=D, key=key)
    x = jnp.ones((B, T, D))
    with pytest.raises(ValueError, match=r"inputs: expected last dim D=2 .*float32\[3, 6, 5\]"):
        rnn(jnp.ones((B, T, 5)))
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \[3\]"):
        rnn(x, seq_lengths=jnp.array([1, 2]))
    with pytest.raises(TypeError, match="reverse: expected a Python bool"):
        rnn(x, reverse="yes")
    with pytest.raises(TypeError, match="cell: expected a jaxseq cell.*an Equinox cell"):
        jeqx.RNN(eqx.nn.GRUCell(D, H, key=key), input_size=D, key=key)
    with pytest.raises(TypeError, match="key: expected a jax.random key"):
        jeqx.RNN(js.GRU(H), input_size=D)
    with pytest.raises(ValueError, match="input_size: expected a positive int"):
        jeqx.RNN(js.GRU(H), input_size=0, key=key)
    with pytest.raises(TypeError, match="params: expected GRUParams"):
        jeqx.RNN(js.GRU(H), input_size=D, params=js.LSTM(H).init(key, D))
    with pytest.raises(TypeError, match="initial_carry: expected an LSTM state"):
        jeqx.RNN(js.LSTM(H), input_size=D, key=key)(x, jnp.zeros((B, H)))
    with pytest.raises(TypeError, match="forward_rnn: expected an Equinox RNN module.*wrap it"):
        jeqx.Bidirectional(js.GRU(H), rnn)
    with pytest.raises(TypeError, match=r"initial_carry: expected a tuple of 2 carries"):
        jeqx.Stack([rnn, jeqx.RNN(js.GRU(H), input_size=H, key=key)])(x, (None,))
    with pytest.raises(TypeError, match="key: expected a jax.random key"):
        jeqx.Stack([js.GRU(H)], input_size=D)
    with pytest.raises(TypeError, match="cell: expected js.LSTM or js.GRU"):
        jeqx.cell_to_equinox(js.RNN(H), js.RNN(H).init(key, D))
    with pytest.raises(TypeError, match="cell: expected eqx.nn.LSTMCell or eqx.nn.GRUCell"):
        jeqx.cell_from_equinox(eqx.nn.Linear(D, H, key=key))
    with pytest.raises(TypeError, match="input_size: set by the Equinox cell"):
        jeqx.from_equinox(eqx.nn.GRUCell(D, H, key=key), input_size=3)
