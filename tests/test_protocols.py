"""The contracts of ``jaxseq.protocols`` and ``js.rollout`` as the one way to run them.

Every built-in satisfies its protocol; a user cell and a user sequence layer run
through ``js.rollout`` (alone and inside a ``Stack``/``Bidirectional``) and equal
NumPy loops written here; every rollout entry point has the same defaults.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import protocols

T, B, D, H = 6, 3, 2, 4
LENGTHS = np.array([6, 2, 0], np.int32)


# -- protocols ----------------------------------------------------------------------


@pytest.mark.parametrize("cell", [js.RNN(3), js.RNN(3, activation="relu"), js.LSTM(3), js.GRU(3)])
def test_every_builtin_cell_is_a_hoistable_cell_and_not_a_layer(cell):
    assert isinstance(cell, protocols.Cell)
    assert isinstance(cell, protocols.HoistableCell)
    assert not isinstance(cell, protocols.SequenceLayer)


@pytest.mark.parametrize(
    "layer",
    [js.Bidirectional(js.GRU(3)), js.Stack([js.LSTM(3)]), js.Stack([js.Bidirectional(js.RNN(2))])],
)
def test_bidirectional_and_stack_are_sequence_layers_not_cells(layer):
    assert isinstance(layer, protocols.SequenceLayer)
    assert not isinstance(layer, protocols.Cell)


def test_protocols_reject_objects_without_the_members():
    assert not isinstance(object(), protocols.Cell)
    assert not isinstance(object(), protocols.SequenceLayer)
    assert not isinstance(_LeakyCell(), protocols.HoistableCell)  # no project/recur
    assert isinstance(_LeakyCell(), protocols.Cell)
    assert isinstance(lambda params, carry, batch, key: (0.0, (carry, {})), protocols.LossFn)
    assert not isinstance(3, protocols.LossFn)


def test_protocols_are_exported():
    assert set(protocols.__all__) == {
        "Cell",
        "HoistableCell",
        "LanguageModel",
        "LossFn",
        "SequenceLayer",
    }


@dataclasses.dataclass(frozen=True)
class _CountLM:
    """A user language model with only the protocol's members: the logits are a learned
    table indexed by the current token plus a bias from how many tokens came before."""

    vocab_size: int = 5

    def init(self, key, dtype=jnp.float32):
        return {"table": jax.random.normal(key, (self.vocab_size, self.vocab_size), dtype)}

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(batch_shape, jnp.int32)  # tokens seen since the last reset

    def apply(self, params, carry, tokens, *, reset=None, lengths=None, key=None):
        tokens = jnp.asarray(tokens)
        t = tokens.shape[0]
        if carry is None:
            carry = self.initial_carry(tokens.shape[1:])
        valid = jnp.ones(tokens.shape, bool)
        if lengths is not None:
            valid = jnp.arange(t).reshape((t,) + (1,) * (tokens.ndim - 1)) < lengths[None]
        reset = jnp.zeros(tokens.shape, bool) if reset is None else reset

        def step(c, inp):
            r, v = inp
            c = jnp.where(r, 0, c)
            return jnp.where(v, c + 1, c), c

        carry, seen = jax.lax.scan(step, carry, (reset, valid))
        ids = jnp.where(valid, tokens, 0)
        logits = params["table"][ids] + 0.1 * seen[..., None].astype(jnp.float32)
        return carry, logits.astype(jnp.float32)

    def check_params(self, params, name="params"):
        if not isinstance(params, dict) or "table" not in params:
            raise TypeError(f"{name}: expected {{'table': [V, V]}}, got {type(params).__name__}")


def test_a_user_language_model_trains_evaluates_and_samples_through_the_library(key):
    lm = _CountLM()
    assert isinstance(lm, protocols.LanguageModel)
    params = lm.init(key)
    batcher = js.data.StreamBatcher(np.arange(40) % 5, 2, 4)
    loss, (carry, _) = js.lm_loss_fn(lm)(params, lm.initial_carry((2,)), batcher.chunk(0), None)
    assert loss.shape == () and carry.tolist() == [4, 4]
    assert 0.0 < js.evaluate_lm(lm, params, batcher) < 10.0
    ids = js.decoding.sample(key, lm, params, jnp.array([[1, 2]]), 6, greedy=True)
    # greedy: each next id is the argmax of the current id's row (the count bias is shared)
    table, tok = np.asarray(params["table"]), [1, 2]
    for _ in range(6):
        tok = [int(np.argmax(table[i])) for i in tok]
    assert ids.shape == (6, 2) and ids[-1].tolist() == tok
    with pytest.raises(TypeError, match="params: expected"):
        js.decoding.sample(key, lm, {"w": 1}, jnp.array([[1]]), 2)


# -- user cells and user layers -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LeakyCell:
    """h' = 0.5 h + tanh(x W): init/initial_carry/step only."""

    hidden_size: int = H

    @property
    def output_size(self):
        return self.hidden_size

    def init(self, key, input_size, dtype=jnp.float32):
        return jax.random.normal(key, (input_size, self.hidden_size), dtype)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def step(self, params, carry, x):
        h = 0.5 * carry + jnp.tanh(x @ params)
        return h, h


def _leaky_np(w, xs, lengths=None, reverse=False):
    """NumPy loops, one sequence at a time: ``xs [T, B, D]`` -> ``(h [B, H], ys [T, B, H])``."""
    w, xs = np.float64(w), np.float64(xs)
    t, b = xs.shape[:2]
    ys = np.zeros((t, b, w.shape[1]))
    hs = np.zeros((b, w.shape[1]))
    for i in range(b):
        n = t if lengths is None else int(lengths[i])
        h = np.zeros(w.shape[1])
        for s in range(n - 1, -1, -1) if reverse else range(n):
            h = 0.5 * h + np.tanh(xs[s, i] @ w)
            ys[s, i] = h
        hs[i] = h
    return hs, ys


@dataclasses.dataclass(frozen=True)
class _DecayLayer:
    """A user sequence layer: ``h_t = a * h_{t-1} + x_t W`` by an associative scan.

    Implements only what it needs of the contract (lengths and reverse; no resets)
    and records the keyword arguments it was called with.
    """

    size: int = H
    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    @property
    def output_size(self):
        return self.size

    def init(self, key, input_size, dtype=jnp.float32):
        return {"w": jax.random.normal(key, (input_size, self.size), dtype), "a": jnp.asarray(0.7)}

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.size), dtype)

    def rollout(self, params, seq, carry, options, key=None):
        self.calls.append(dict(options=options, key=key, valid=seq.valid, lengths=seq.lengths))
        if seq.reset is not None:
            raise ValueError("reset: not supported by this layer")
        u = seq.xs @ params["w"]  # zero at padded steps: js.rollout zeroed the inputs
        valid = jnp.ones(u.shape[:-1], bool) if seq.valid is None else seq.valid
        a = jnp.where(valid[..., None], params["a"], 1.0) * jnp.ones_like(u)
        if carry is not None:
            first = -1 if options.reverse else 0
            u = u.at[first].add(a[first] * carry)

        def combine(left, right):
            return left[0] * right[0], right[0] * left[1] + right[1]

        _, h = jax.lax.associative_scan(combine, (a, u), reverse=options.reverse)
        ys = jnp.where(valid[..., None], h, 0.0)
        return (h[0] if options.reverse else h[-1]), ys


def _decay_np(p, xs, lengths=None, reverse=False):
    w, a, xs = np.float64(p["w"]), float(p["a"]), np.float64(xs)
    t, b = xs.shape[:2]
    ys = np.zeros((t, b, w.shape[1]))
    hs = np.zeros((b, w.shape[1]))
    for i in range(b):
        n = t if lengths is None else int(lengths[i])
        h = np.zeros(w.shape[1])
        for s in range(n - 1, -1, -1) if reverse else range(n):
            h = a * h + xs[s, i] @ w
            ys[s, i] = h
        hs[i] = h
    return hs, ys


def _xs(key, d=D):
    return jax.random.normal(key, (T, B, d))


@pytest.mark.parametrize("reverse", [False, True])
def test_a_user_cell_runs_through_rollout(key, reverse):
    cell = _LeakyCell()
    w = cell.init(key, D)
    xs = _xs(jax.random.key(1))
    carry, ys = jax.jit(lambda w, xs: js.rollout(cell, w, xs, lengths=LENGTHS, reverse=reverse))(
        w, xs
    )
    want_h, want_ys = _leaky_np(w, xs, LENGTHS, reverse)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry, want_h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel: 'fused' needs a cell whose exact type"):
        js.rollout(cell, w, xs, kernel="fused")


@pytest.mark.parametrize("reverse", [False, True])
def test_a_user_sequence_layer_runs_through_rollout(key, reverse):
    layer = _DecayLayer()
    p = layer.init(key, D)
    xs = _xs(jax.random.key(1))
    carry, ys = js.rollout(layer, p, xs, lengths=LENGTHS, reverse=reverse)
    want_h, want_ys = _decay_np(p, xs, LENGTHS, reverse)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry, want_h, rtol=1e-5, atol=1e-5)
    # js.rollout hands the layer its options with js.rollout's defaults, and the mask.
    call = layer.calls[-1]
    assert call["options"] == js.recurrent.RolloutOptions(reverse=reverse)
    assert call["key"] is None
    np.testing.assert_array_equal(call["valid"], np.arange(T)[:, None] < LENGTHS)
    np.testing.assert_array_equal(call["lengths"], LENGTHS)
    with pytest.raises(ValueError, match="reset: not supported"):
        js.rollout(layer, p, xs, reset=jnp.zeros((T, B), bool))


def test_user_layers_inside_stack_and_bidirectional(key):
    """A user layer composes with the built-in layers; a Stack hands each layer a key
    of its own and passes the options on."""
    user = _DecayLayer()
    stack = js.Stack([user, js.Bidirectional(_LeakyCell(), user)])
    p = stack.init(key, D)
    xs = _xs(jax.random.key(1))
    k = jax.random.key(5)
    carries, ys = js.rollout(stack, p, xs, lengths=LENGTHS, unroll=2, key=k)
    h0, y0 = _decay_np(p[0], xs, LENGTHS)
    hf, yf = _leaky_np(p[1].forward, y0, LENGTHS)
    hb, yb = _decay_np(p[1].backward, y0, LENGTHS, reverse=True)
    np.testing.assert_allclose(ys, np.concatenate([yf, yb], -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(carries[0], h0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(carries[1].backward, hb, rtol=1e-4, atol=1e-5)
    first, second = user.calls[-2:]
    assert first["options"].unroll == second["options"].unroll == 2
    assert first["options"].reverse is False and second["options"].reverse is True
    keys = [jax.random.key_data(c["key"]) for c in (first, second)]
    assert not np.array_equal(keys[0], keys[1])
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.random.fold_in(k, 0)))


# -- the cell path's key, errors ------------------------------------------------------


def test_a_cell_ignores_the_key_but_checks_it(key):
    cell = js.GRU(H)
    p = cell.init(key, D)
    xs = _xs(key)
    np.testing.assert_array_equal(
        js.rollout(cell, p, xs, key=jax.random.key(3))[1], js.rollout(cell, p, xs)[1]
    )
    with pytest.raises(TypeError, match="key"):
        js.rollout(cell, p, xs, key=3)


def test_rollout_of_neither_a_cell_nor_a_layer_names_both(key):
    class StepOnly:
        def init(self, key, input_size):
            return None

        def initial_carry(self, batch_shape=()):
            return None

    with pytest.raises(TypeError, match=r"got StepOnly without 'step' or 'rollout'"):
        js.rollout(StepOnly(), None, _xs(key))
    with pytest.raises(TypeError, match=r"cell: expected a cell with init/initial_carry/step"):
        js.rollout_unrolled(js.Stack([js.GRU(2)]), None, _xs(key))


# -- one set of defaults --------------------------------------------------------------

_OPTIONS = ("lengths", "mask", "reset", "reverse", "unroll", "kernel", "checkpoint_every", "key")


def test_the_rollout_options_are_written_once():
    """js.rollout is the one signature with the options; the layers' methods take one
    RolloutOptions, whose fields are the settings js.rollout passes on."""
    params = inspect.signature(js.rollout).parameters
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in _OPTIONS)
    assert list(params)[-1] == "key"
    fields = [f.name for f in dataclasses.fields(js.recurrent.RolloutOptions)]
    assert fields == [
        "reverse", "unroll", "kernel", "checkpoint_every", "mesh", "sequence_axis",
    ]  # fmt: skip
    for name in fields:
        assert params[name].default == getattr(js.recurrent.RolloutOptions(), name)
    for fn in (js.Stack.rollout, js.Bidirectional.rollout, js.MinGRU.rollout):
        assert list(inspect.signature(fn).parameters) == [
            "self", "params", "seq", "carry", "options", "key",
        ]  # fmt: skip
    assert not hasattr(js.recurrent, "stacked_rollout")
    assert not hasattr(js.recurrent, "bidirectional_rollout")


def _scan_unrolls(fn, *args):
    """The ``unroll`` of every ``scan`` in the jaxpr of ``fn(*args)``, nested ones too."""
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                found.append(eqn.params["unroll"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_default_unroll_is_auto_for_stacks_and_bidirectional_layers(key):
    """Small steps: ``unroll="auto"`` picks 4 on CPU, inside a stack as for a cell."""
    xs = jnp.ones((8, 2, D))
    want = js.recurrent.auto_unroll(8, js.recurrent.step_work(js.GRU(3), (2,)))
    assert want > 1
    for layer in (js.Stack([js.GRU(3)]), js.Bidirectional(js.GRU(3))):
        p = layer.init(key, D)
        unrolls = _scan_unrolls(lambda p, layer=layer: js.rollout(layer, p, xs)[1], p)
        assert unrolls and set(unrolls) == {want}, unrolls
