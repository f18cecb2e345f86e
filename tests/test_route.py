"""The route from ``js.rollout`` to the kernels: checked once, one mask, one plan.

What the programs contain (jaxprs), not only what they compute: a rollout without
padding does no padded-step work, the padding mask of a whole stack is built once,
and the dtypes follow params and inputs. Values against independent references are
tests/test_rollout.py's and tests/test_kernels.py's job.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

T, D, H = 6, 3, 4
B = 2
LENGTHS = np.array([6, 3], np.int32)


def _count(jaxpr, in_loops: bool, shape=None):
    """Primitive counts of ``jaxpr``: inside scan bodies (``in_loops``) or outside them.

    Only operations whose output has ``shape`` count (all of at least 2 dims when
    None): a padded step's selects act on ``[B, H]`` states and outputs, while a
    scalar ``select_n`` or ``lt`` is a loop index's bookkeeping and a ``[B, 4H]``
    one the LSTM's constant gate scales, neither of them padded-step work."""
    counts = collections.Counter()

    def counted(eqn):
        shapes = [tuple(v.aval.shape) for v in eqn.outvars]
        return shape in shapes if shape is not None else max(map(len, shapes)) >= 2

    def walk(jx, inside):
        for eqn in jx.eqns:
            if inside == in_loops and counted(eqn):
                counts[eqn.primitive.name] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub, inside or eqn.primitive.name == "scan")

    walk(jaxpr.jaxpr, False)
    return counts


def _stack_program(lengths, grad: bool):
    stack = js.Stack([js.LSTM(H), js.LSTM(H)])
    params = stack.init(jax.random.key(0), D)
    xs = jnp.ones((T, B, D))

    def f(p, x):
        return jnp.sum(js.rollout(stack, p, x, lengths=lengths)[1] ** 2)

    return jax.make_jaxpr(jax.grad(f) if grad else f)(params, xs)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_no_padded_step_work_without_lengths(grad):
    """A 2-layer LSTM stack without lengths: no select in any loop body, forward or
    backward (nothing is padded, so no step asks whether it is)."""
    loops = _count(_stack_program(None, grad), in_loops=True, shape=(B, H))
    assert loops["tanh"] > 0  # the loops are there
    assert loops["select_n"] == 0, loops
    with_lengths = _count(_stack_program(jnp.asarray(LENGTHS), grad), in_loops=True, shape=(B, H))
    assert with_lengths["select_n"] > 0  # the count sees them when they are there


def test_with_lengths_the_padded_step_selects_run_once_per_step_and_layer():
    """With lengths, each layer's forward step selects its output and its carry
    (h, c) once each: 3 selects per step and layer, 6 for the 2-layer stack, nothing
    recomputed per layer from the lengths."""
    loops = _count(_stack_program(jnp.asarray(LENGTHS), False), in_loops=True, shape=(B, H))
    assert loops["select_n"] == 6, loops
    per_step_mask = _count(_stack_program(jnp.asarray(LENGTHS), False), in_loops=True, shape=(B,))
    assert per_step_mask["lt"] == 0, per_step_mask  # no ``t < lengths`` inside a loop


def test_the_padding_mask_of_a_stack_is_built_once():
    """``t < lengths`` is evaluated once for the whole stack (not per layer), and the
    padded inputs are zeroed once (the layers above get outputs that are already zero)."""
    outside = _count(_stack_program(jnp.asarray(LENGTHS), False), in_loops=False)
    assert outside["lt"] == 1, outside
    assert outside["select_n"] == 1, outside


def test_a_mask_is_used_as_it_is_and_equals_lengths(key):
    stack = js.Stack([js.GRU(H), js.Bidirectional(js.LSTM(H))])
    params = stack.init(key, D)
    xs = jax.random.normal(key, (T, B, D))
    mask = np.arange(T)[:, None] < LENGTHS
    c1, y1 = js.rollout(stack, params, xs, lengths=LENGTHS)
    c2, y2 = js.rollout(stack, params, xs, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(y1, y2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, c1, c2)
    c3, y3 = js.rollout(stack, params, jnp.swapaxes(xs, 0, 1), mask=mask.T, time_major=False)
    np.testing.assert_array_equal(jnp.swapaxes(y3, 0, 1), y1)
    with pytest.raises(ValueError, match="lengths, mask: expected at most one"):
        js.rollout(stack, params, xs, lengths=LENGTHS, mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"mask: expected shape \[6, 2\]"):
        js.rollout(stack, params, xs, mask=jnp.asarray(mask.T))
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        js.rollout(stack, params, xs, mask=jnp.asarray(mask, jnp.int32))


# -- dtypes ----------------------------------------------------------------------------

LAYERS = {
    "lstm-fused": js.LSTM(H),
    "gru-scan": js.GRU(H),
    "rnn": js.RNN(H),
    "mingru": js.MinGRU(H),
    "stack": js.Stack([js.LSTM(H), js.Bidirectional(js.GRU(H))]),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_bfloat16_params_and_inputs_give_bfloat16_outputs_and_carries(name, key):
    layer = LAYERS[name]
    params = layer.init(key, D, jnp.bfloat16)
    xs = jax.random.normal(key, (T, B, D), jnp.bfloat16)
    kernel = "scan" if name == "gru-scan" else "auto"
    carry, ys = js.rollout(layer, params, xs, lengths=LENGTHS, kernel=kernel)
    assert ys.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.bfloat16)}
    # float32 params with bfloat16 inputs compute (and output) float32
    carry, ys = js.rollout(layer, layer.init(key, D), xs, lengths=LENGTHS, kernel=kernel)
    assert ys.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.float32)}


def test_a_carry_in_another_dtype_than_the_model_is_an_error(key):
    """A float16 carry no longer turns a float32 model's outputs float16 silently."""
    cell = js.LSTM(H)
    params = cell.init(key, D)
    xs = jnp.ones((T, B, D))
    c16 = cell.initial_carry((B,), jnp.float16)
    with pytest.raises(TypeError, match=r"carry\.h: expected dtype float32 .*got float16\[2, 4\]"):
        js.rollout(cell, params, xs, c16)
    stack = js.Stack([js.GRU(H), cell])
    sp = stack.init(key, D)
    carry = (None, c16)  # None: zeros for that layer
    with pytest.raises(TypeError, match=r"carry\[1\]\.h: expected dtype float32"):
        js.rollout(stack, sp, xs, carry)
    with pytest.raises(TypeError, match=r"carry\.h: expected dtype float32"):
        js.rollout_unrolled(cell, params, xs, c16)


# -- output_size -----------------------------------------------------------------------


class _NoSize:
    def init(self, key, input_size, dtype=jnp.float32):
        return jax.random.normal(key, (input_size, H), dtype)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, H), dtype)

    def step(self, params, carry, x):
        h = jnp.tanh(x @ params + carry)
        return h, h


class _WrongSize(_NoSize):
    output_size = H + 1


def test_a_missing_output_size_is_caught_where_the_stack_is_declared():
    with pytest.raises(
        TypeError, match=r"layers\[1\]: expected a cell or layer with an 'output_size'.*_NoSize"
    ):
        js.Stack([js.GRU(H), _NoSize()])
    with pytest.raises(TypeError, match=r"layers\[0\]: expected output_size to be a positive int"):
        js.Stack([type("StrSize", (_NoSize,), {"output_size": "4"})()])
    with pytest.raises(
        TypeError, match=r"backward: expected a cell or layer with an 'output_size'.*_NoSize"
    ):
        js.Bidirectional(js.GRU(H), _NoSize())


def test_a_wrong_output_size_names_the_layer_that_declares_it(key):
    stack = js.Stack([_WrongSize(), js.GRU(H)])
    params = (_WrongSize().init(key, D), js.GRU(H).init(key, H))
    with pytest.raises(
        ValueError, match=r"layers\[0\]: _WrongSize declares output_size=5 .*\[6, 2, 4\]"
    ):
        js.rollout(stack, params, jnp.ones((T, B, D)))


# -- the public helper for whole-sequence layers -------------------------------------


def test_prepare_gives_a_layer_what_it_needs(key):
    xs = jax.random.normal(key, (B, T, D)).at[1, 4].set(jnp.nan)  # NaN at a padded step
    reset = np.zeros((B, T), bool)
    reset[0, 2] = True
    seq = js.recurrent.prepare(js.GRU(H), None, xs, lengths=LENGTHS, reset=reset, time_major=False)
    assert seq.xs.shape == (T, B, D) and seq.batch_shape == (B,) and seq.t == T
    np.testing.assert_array_equal(seq.valid, np.arange(T)[:, None] < LENGTHS)
    assert np.all(np.isfinite(seq.xs)) and np.all(np.asarray(seq.xs)[3:, 1] == 0)
    np.testing.assert_array_equal(seq.reset, reset.T)
    np.testing.assert_array_equal(seq.lengths, LENGTHS)
    assert js.recurrent.prepare(js.GRU(H), None, jnp.ones((T, B, D))).valid is None


def test_a_bfloat16_language_model_starts_from_a_bfloat16_carry(key):
    """A model's ``apply(carry=None)`` starts from zeros in its params' dtype (a float32
    zero carry against bfloat16 params would now be refused by the rollout)."""
    lm = js.char_lm(7, num_layers=2, hidden_size=H, embedding_size=D)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), lm.init(key))
    carry, logits = lm.apply(params, None, jnp.zeros((T, B), jnp.int32))
    assert logits.dtype == jnp.float32  # the head's logits, for the loss
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.bfloat16)}
    again, _ = lm.apply(params, carry, jnp.zeros((T, B), jnp.int32))  # and goes on from it
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(carry)
