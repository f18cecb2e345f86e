"""What the rollouts make of what they are given: padded steps, and carries of the wrong kind.

Whatever is written at padded steps (``t >= lengths[b]``) changes nothing.

Padded steps must not touch the outputs, the final carry or any gradient (with
respect to the params, the inputs at valid steps and the initial carry), and
the gradient with respect to the inputs at padded steps is exactly zero. NaN,
inf and 1e30 are written there: ``NaN * 0`` is NaN, so a rollout that lets a
padded row into any product (the hoisted input projection ``xs @ w_ih``, the
weight-gradient matmul ``xs^T dG``, a cell's step whose result is then masked)
poisons the gradients even though its outputs stay finite.

The known answer is the same rollout with zeros at the padded steps (the same
compiled function, so it must agree bit for bit), and the tests check that all
of it is finite.

A :class:`js.Stack` takes one carry per layer and a :class:`js.Bidirectional` one
per direction; given a single cell's carry (itself a NamedTuple, so a tuple of
the right length by chance) they say so, instead of an error about its fields.
"""

import dataclasses

import _cells
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

T, D, H = 6, 3, 4
LENGTHS = np.array([4, 6, 0, 1], np.int32)  # a full sequence, an empty one, one step
B = LENGTHS.size
POISONS = (np.nan, np.inf, -np.inf, 1e30)
KINDS = ("tanh", "relu", "lstm", "gru")


def make_cell(kind, hidden=H):
    return _cells.make_cell(kind, hidden)


def _valid(lengths, t):
    """``bool[T, *B, 1]``: ``t < lengths[b]``, broadcastable over the features."""
    lengths = np.asarray(lengths)
    steps = np.arange(t).reshape((t,) + (1,) * lengths.ndim)
    return (steps < lengths)[..., None]


def _problem(layer, batch, lengths, seed=0):
    """Params, inputs with zeros at padded steps, a random non-zero initial carry,
    and random cotangents for every output and carry leaf."""
    rng = np.random.default_rng(seed)
    params = layer.init(jax.random.key(seed), D)
    xs = rng.standard_normal((T, *batch, D)).astype(np.float32)
    xs = np.where(_valid(lengths, T), xs, np.float32(0.0))
    carry = layer.initial_carry(batch)
    carry = jax.tree_util.tree_map(
        lambda c: jnp.asarray(0.5 * rng.standard_normal(c.shape), c.dtype), carry
    )
    return params, jnp.asarray(xs), carry, rng


def _cotangents(rng, out_shapes):
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), out_shapes
    )


def _run_all(cases, params, xs, carry, rng):
    """``{name: (carry, ys, dparams, dxs, dcarry)}`` for every ``cases[name](p, xs, carry)``,
    all cases in one jit; returns ``run(xs)`` so several paddings share the compilation."""
    cts = {
        name: _cotangents(rng, jax.eval_shape(f, params, xs, carry)) for name, f in cases.items()
    }

    @jax.jit
    def run(params, xs, carry):
        out = {}
        for name, f in cases.items():
            values, pullback = jax.vjp(f, params, xs, carry)
            out[name] = (values, pullback(cts[name]))
        return out

    return lambda xs_: jax.tree_util.tree_map(np.asarray, run(params, xs_, carry))


def _check_padding_ignored(run, xs, lengths):
    """Zeros at the padded steps, then each poison: identical results, all finite,
    and exactly zero input gradients at the padded steps."""
    valid = _valid(lengths, xs.shape[0])
    clean = run(xs)
    failures = []
    for name, ((c, ys), (dp, dxs, dc)) in clean.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(((c, ys), (dp, dxs, dc))):
            if not np.all(np.isfinite(leaf)):
                failures.append(
                    f"{name}: non-finite {jax.tree_util.keystr(path)} with zero padding"
                )
        if np.any(np.where(valid, 0.0, dxs)):
            failures.append(f"{name}: non-zero d xs at padded steps with zero padding")
    for poison in POISONS:
        got = run(jnp.where(valid, xs, jnp.float32(poison)))
        for name in clean:
            want_leaves = jax.tree_util.tree_leaves_with_path(clean[name])
            got_leaves = jax.tree_util.tree_leaves(got[name])
            for (path, w), g in zip(want_leaves, got_leaves):
                if not np.array_equal(g, w):
                    bad = "non-finite" if not np.all(np.isfinite(g)) else "changed"
                    failures.append(f"{name}, padding {poison}: {bad} {jax.tree_util.keystr(path)}")
    assert not failures, "\n".join(failures)


def _cell_cases(cell, lengths):
    lengths = jnp.asarray(lengths)
    reset = np.zeros((T, *lengths.shape), bool)
    reset.reshape(T, -1)[[2, 5], 0] = True  # inside the first sequence, and at a padded step
    variants = {  # kernel -> (reverse, checkpoint_every) pairs
        "fused": ((False, None), (True, None), (False, 4), (True, 4)),
        "scan": ((False, None), (True, 4)),
    }
    cases = {}
    for kernel, pairs in variants.items():
        for reverse, every in pairs:
            kw = dict(lengths=lengths, reverse=reverse, kernel=kernel, checkpoint_every=every)
            cases[f"{kernel}/reverse={reverse}/checkpoint_every={every}"] = lambda p, x, c, kw=kw: (
                js.rollout(cell, p, x, c, **kw)
            )
        kw = dict(lengths=lengths, reset=jnp.asarray(reset), kernel=kernel, unroll=1)
        cases[f"{kernel}/reset"] = lambda p, x, c, kw=kw: js.rollout(cell, p, x, c, **kw)
    cases["unrolled/reverse"] = lambda p, x, c: js.rollout_unrolled(
        cell, p, x, c, lengths=lengths, reverse=True
    )
    return cases


@pytest.mark.parametrize("kind", KINDS)
def test_padded_steps_change_nothing_for_the_builtin_cells(kind):
    """Both kernels, reverse, checkpoint_every, resets and the unrolled reference."""
    cell = make_cell(kind)
    params, xs, carry, rng = _problem(cell, (B,), LENGTHS)
    run = _run_all(_cell_cases(cell, LENGTHS), params, xs, carry, rng)
    _check_padding_ignored(run, xs, LENGTHS)


def test_the_issue_example_has_finite_gradients():
    """The LSTM with NaN at the two padded steps of a length-4 sequence, both kernels."""
    cell = js.LSTM(5)
    p = cell.init(jax.random.key(0), 4)
    xs = jnp.ones((6, 3, 4)).at[4:, 0].set(jnp.nan)
    lengths = jnp.array([4, 6, 6])
    for kernel in ("fused", "scan"):
        loss = lambda p, k=kernel: js.rollout(cell, p, xs, lengths=lengths, kernel=k)[1].sum()
        g = jax.grad(loss)(p)
        for name, leaf in g._asdict().items():
            assert np.all(np.isfinite(leaf)), (kernel, name)


def test_padded_steps_change_nothing_with_several_batch_dims():
    lengths = np.array([[3, 0, 6], [1, 6, 2]], np.int32)
    cell = js.LSTM(H)
    params, xs, carry, rng = _problem(cell, lengths.shape, lengths, seed=1)
    cases = {
        f"{kernel}/reverse={rev}": (
            lambda p, x, c, kernel=kernel, rev=rev: js.rollout(
                cell, p, x, c, lengths=jnp.asarray(lengths), kernel=kernel, reverse=rev
            )
        )
        for kernel, rev in (("fused", False), ("fused", True), ("scan", True))
    }
    run = _run_all(cases, params, xs, carry, rng)
    _check_padding_ignored(run, xs, lengths)


@dataclasses.dataclass(frozen=True)
class StepOnlyCell:
    """A user cell with only ``step`` (no ``project``/``recur``): the scan path, unhoisted.
    ``h' = tanh(x W + h U)`` with a bias, carry ``(h,)``."""

    hidden_size: int = H
    output_size: int = H

    def init(self, key, input_size, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return {
            "w": 0.5 * jax.random.normal(k1, (input_size, self.hidden_size), dtype),
            "u": 0.5 * jax.random.normal(k2, (self.hidden_size, self.hidden_size), dtype),
            "b": jnp.full((self.hidden_size,), 0.1, dtype),
        }

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return (jnp.zeros((*batch_shape, self.hidden_size), dtype),)

    def step(self, params, carry, x):
        z = x @ params["w"] + carry[0] @ params["u"]
        h = jnp.tanh(z + jnp.broadcast_to(params["b"], z.shape))
        return (h,), h


class SubLSTM(js.LSTM):
    """A subclass keeps ``project``/``recur`` but has no fused rule: the hoisted scan path."""


@pytest.mark.parametrize("layer_name", ["step_only", "sub_lstm"])
def test_padded_steps_change_nothing_for_user_cells(layer_name):
    cell = StepOnlyCell() if layer_name == "step_only" else SubLSTM(H)
    params, xs, carry, rng = _problem(cell, (B,), LENGTHS, seed=2)
    lengths = jnp.asarray(LENGTHS)
    cases = {
        f"reverse={rev}/checkpoint_every={every}": (
            lambda p, x, c, rev=rev, every=every: js.rollout(
                cell, p, x, c, lengths=lengths, reverse=rev, checkpoint_every=every
            )
        )
        for rev in (False, True)
        for every in (None, 4)
    }
    cases["unrolled"] = lambda p, x, c: js.rollout_unrolled(cell, p, x, c, lengths=lengths)
    run = _run_all(cases, params, xs, carry, rng)
    _check_padding_ignored(run, xs, LENGTHS)


def test_padded_steps_change_nothing_for_bidirectional_and_stack():
    """A residual stack with dropout (a key is given) around a bidirectional layer."""
    lengths = jnp.asarray(LENGTHS)
    stack = js.Stack(
        [js.GRU(H), js.Bidirectional(js.LSTM(H // 2))], residual=True, dropout_rate=0.3
    )
    key = jax.random.key(3)
    params, xs, carry, rng = _problem(stack, (B,), LENGTHS, seed=10)
    cases = {
        f"{kernel}/reverse={rev}": (
            lambda p, x, c, kernel=kernel, rev=rev: js.rollout(
                stack, p, x, c, lengths=lengths, kernel=kernel, reverse=rev, key=key
            )
        )
        for kernel, rev in (("fused", False), ("scan", True), ("fused", True))
    }
    run = _run_all(cases, params, xs, carry, rng)
    _check_padding_ignored(run, xs, LENGTHS)


# -- carries and params of the wrong kind -------------------------------------------------


def test_stack_given_one_cells_carry_says_it_wants_one_per_layer():
    stack = js.Stack([js.LSTM(5)] * 2)
    sp = stack.init(jax.random.key(0), 4)
    xs = jnp.ones((6, 3, 4))
    one = js.LSTM(5).initial_carry((3,))  # LSTMCarry(h, c): 2 fields, like 2 layers
    want = (
        r"carry: expected a tuple of 2 layer carries \(one per layer of the Stack\), got LSTMCarry"
    )
    with pytest.raises(TypeError, match=want):
        js.rollout(stack, sp, xs, carry=one)
    # Its fields as a plain tuple: the first layer's carry is then an array.
    with pytest.raises(TypeError, match=r"carry\[0\]: expected LSTMCarry\('h', 'c'\) for LSTM"):
        js.rollout(stack, sp, xs, carry=tuple(one))
    with pytest.raises(
        ValueError, match=r"carry: expected a tuple of 2 layer carries .*got a tuple of 3"
    ):
        js.rollout(stack, sp, xs, carry=(one, one, one))
    with pytest.raises(ValueError, match=r"carry\[1\]\.c: expected shape \[3, 5\]"):
        js.rollout(stack, sp, xs, carry=(one, one._replace(c=jnp.zeros((2, 5)))))
    # The same for params: one LSTM's params have 3 fields, like a 3-layer stack's.
    stack3 = js.Stack([js.LSTM(5)] * 3)
    want = (
        r"params: expected a tuple of 3 layer params \(one per layer of the Stack\), got LSTMParams"
    )
    with pytest.raises(TypeError, match=want):
        js.rollout(stack3, js.LSTM(5).init(jax.random.key(0), 4), xs)
    # A correct carry still runs (a list is accepted too).
    carries, ys = js.rollout(stack, sp, xs, carry=[one, one])
    assert ys.shape == (6, 3, 5) and isinstance(carries[1], js.recurrent.LSTMCarry)


def test_bidirectional_given_one_cells_carry_says_it_wants_one_per_direction():
    bi = js.Bidirectional(js.LSTM(5), js.GRU(3))
    p = bi.init(jax.random.key(0), 4)
    xs = jnp.ones((6, 3, 4))
    want = r"carry: expected BidirectionalCarry\(forward, backward\) \(one carry per direction.*got LSTMCarry"
    with pytest.raises(TypeError, match=want):
        js.rollout(bi, p, xs, carry=js.LSTM(5).initial_carry((3,)))
    carry = bi.initial_carry((3,))
    bad = carry._replace(backward=js.LSTM(3).initial_carry((3,)))
    with pytest.raises(TypeError, match=r"carry\.backward: expected RNNCarry\('h',\) for GRU"):
        js.rollout(bi, p, xs, carry=bad)
    # Inside a stack, the path names the layer and the direction.
    stack = js.Stack([bi])
    with pytest.raises(TypeError, match=r"carry\[0\]\.backward: expected RNNCarry"):
        js.rollout(stack, (p,), xs, carry=(bad,))
    with pytest.raises(
        TypeError, match=r"params: expected BidirectionalParams\(forward, backward\)"
    ):
        js.rollout(bi, p.forward, xs)
