"""Property-based tests of the rollout semantics (hypothesis).

Over random shapes (``T`` in 1..6, zero to two batch dims, small ``D`` and
``H``), lengths (0 and ``T`` included), reset patterns, ``reverse``, ``unroll``
(1, 2, ``"auto"``), both kernels (``"fused"``, ``"scan"``) and the cells RNN
(tanh), LSTM and GRU:

* :func:`js.rollout` (both kernels) equals a NumPy float64 reference written
  here (a per-sequence Python loop from the documented equations) and
  :func:`js.rollout_unrolled`: outputs and final carry; its gradients (those of
  a randomly weighted sum of the outputs and final carry) agree between the
  kernels and with central differences of the reference in float64;
* a padded batch equals each sequence run alone on its valid prefix;
* values written at padded steps (NaN, inf, huge) change nothing, and the
  gradient with respect to them is exactly zero;
* a reset at step ``t`` equals starting a fresh rollout at ``t`` from the zero
  carry (in reverse: the steps before ``t`` run from the zero carry).

The run is bounded: the static part of an example (cell, ``T``, batch shape,
``D``, ``H``, ``reverse``, ``unroll``) comes from a short list of
configurations that covers every value of each (every property runs on each
configuration, so the compiled programs are shared between examples and
between properties), and hypothesis draws everything else (weights, inputs,
lengths, resets, the step of a reset, the padding value) for a fixed,
derandomized number of examples per configuration (the same examples on every
run, so CI is reproducible).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxseq as js

settings.register_profile(
    "jaxseq-properties",
    max_examples=4,  # per configuration: 48 examples per property
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("jaxseq-properties")

KERNELS = ("fused", "scan")
GATES = {"tanh": 1, "lstm": 4, "gru": 3}

# (cell, T, batch shape, D, H, reverse, unroll): every T in 1..6, every cell with
# each number of batch dims, both directions and each unroll factor (also one
# larger than T and one that does not divide it).
CONFIGS = (
    ("tanh", 1, (), 2, 3, False, 1),
    ("lstm", 2, (3,), 3, 4, True, 2),
    ("gru", 3, (2, 2), 2, 3, False, "auto"),
    ("tanh", 4, (3,), 3, 4, True, "auto"),
    ("lstm", 5, (2, 2), 2, 3, False, 2),
    ("gru", 6, (), 3, 4, True, 1),
    ("tanh", 5, (2, 2), 2, 4, False, 2),
    ("lstm", 6, (), 3, 3, True, "auto"),
    ("gru", 4, (3,), 2, 4, False, 2),
    ("lstm", 3, (3,), 2, 4, False, 1),
    ("gru", 2, (2, 2), 3, 3, True, 1),
    ("tanh", 6, (3,), 3, 3, True, 2),
)


def _config_id(config):
    kind, t, batch, d, hsz, reverse, unroll = config
    b = "x".join(map(str, batch)) or "none"
    return f"{kind}-T{t}-B{b}-D{d}-H{hsz}-{'rev' if reverse else 'fwd'}-u{unroll}"


# -- the reference: NumPy float64, one sequence at a time --------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_step(kind, p, carry, x):
    """One step of one sequence: ``x: [D]``, ``carry``: ``(h,)`` or ``(h, c)`` of ``[H]``.

    Weights ``w_ih [D, G*H]``, ``w_hh [H, G*H]``, ``b [G*H]``, gates in PyTorch's
    order (LSTM i, f, g, o; GRU r, z, n with ``b_hn`` inside the reset).
    """
    h = carry[0]
    n = h.shape[0]
    if kind == "tanh":
        h = np.tanh(x @ p["w_ih"] + h @ p["w_hh"] + p["b"])
        return (h,), h
    if kind == "lstm":
        z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        i, f, g, o = (z[k * n : (k + 1) * n] for k in range(4))
        c = _sigmoid(f) * carry[1] + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        return (h, c), h
    xi = x @ p["w_ih"] + p["b"]
    hh = h @ p["w_hh"]
    r = _sigmoid(xi[:n] + hh[:n])
    u = _sigmoid(xi[n : 2 * n] + hh[n : 2 * n])
    cand = np.tanh(xi[2 * n :] + r * (hh[2 * n :] + p["b_hn"]))
    h = (1.0 - u) * cand + u * h
    return (h,), h


def ref_rollout(kind, p, xs, carry, lengths, reset, reverse):
    """``xs: [T, *B, D]``, ``carry``: tuple of ``[*B, H]`` -> ``(carry, ys [T, *B, H])``.

    Sequence ``b`` runs its steps ``0 .. lengths[b] - 1`` only (backwards when
    ``reverse``), its outputs elsewhere are zeros and its carry is the one after
    its last step. Forward, ``reset[t, b]`` zeroes the carry before step ``t``;
    in reverse, before step ``t - 1`` (the boundary keeps its forward-time meaning).
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    t_len, d = xs.shape[0], xs.shape[-1]
    batch = xs.shape[1:-1]
    n_seq = int(np.prod(batch, dtype=np.int64))
    hsz = carry[0].shape[-1]
    xs = np.asarray(xs, np.float64).reshape(t_len, n_seq, d)
    flat = [np.asarray(c, np.float64).reshape(n_seq, hsz) for c in carry]
    lengths = np.broadcast_to(np.asarray(lengths), batch).reshape(n_seq)
    reset = np.asarray(reset).reshape(t_len, n_seq)
    ys = np.zeros((t_len, n_seq, hsz))
    out = [np.zeros((n_seq, hsz)) for _ in carry]
    for b in range(n_seq):
        n = int(lengths[b])
        state = tuple(c[b] for c in flat)
        for t in range(n - 1, -1, -1) if reverse else range(n):
            flag = t + 1 if reverse else t
            if flag < n and reset[flag, b]:
                state = tuple(np.zeros(hsz) for _ in state)
            state, ys[t, b] = ref_step(kind, p, state, xs[t, b])
        for i, s in enumerate(state):
            out[i][b] = s
    return tuple(o.reshape(*batch, hsz) for o in out), ys.reshape(t_len, *batch, hsz)


# -- problems ------------------------------------------------------------------------------


def make_cell(kind, hidden):
    return {"tanh": js.RNN, "lstm": js.LSTM, "gru": js.GRU}[kind](hidden)


def _valid(lengths, t):
    """``bool[T, *B, 1]``: ``t < lengths[b]``."""
    lengths = np.asarray(lengths)
    return (np.arange(t).reshape((t,) + (1,) * lengths.ndim) < lengths)[..., None]


@st.composite
def problems(draw, config):
    """The arrays of one example of ``config`` (float32, padded steps random)."""
    kind, t, batch, d, hsz, reverse, unroll = config
    n_seq = int(np.prod(batch, dtype=np.int64))
    lengths = np.array(
        draw(st.lists(st.integers(0, t), min_size=n_seq, max_size=n_seq)), np.int32
    ).reshape(batch)
    reset = np.array(
        draw(st.lists(st.booleans(), min_size=t * n_seq, max_size=t * n_seq)), bool
    ).reshape((t, *batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = GATES[kind]

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    params = {
        "w_ih": normal(d, g * hsz, scale=0.6),
        "w_hh": normal(hsz, g * hsz, scale=0.6),
        "b": normal(g * hsz, scale=0.3),
    }
    if kind == "lstm":
        params["b"][hsz : 2 * hsz] += 1.0  # the cell's forget_bias
    if kind == "gru":
        params["b_hn"] = normal(hsz, scale=0.3)
    n_carry = 2 if kind == "lstm" else 1
    return dict(
        kind=kind,
        reverse=reverse,
        unroll=unroll,
        params=params,
        xs=normal(t, *batch, d),
        carry=tuple(normal(*batch, hsz, scale=0.5) for _ in range(n_carry)),
        lengths=lengths,
        reset=reset,
        cts=(tuple(normal(*batch, hsz) for _ in range(n_carry)), normal(t, *batch, hsz)),
        rng=rng,
    )


def _jax_args(pb):
    cell = make_cell(pb["kind"], pb["carry"][0].shape[-1])
    params = cell.params_type(**{k: jnp.asarray(v) for k, v in pb["params"].items()})
    carry = cell.carry_type(*(jnp.asarray(c) for c in pb["carry"]))
    dcarry, dys = pb["cts"]
    cts = (cell.carry_type(*(jnp.asarray(c) for c in dcarry)), jnp.asarray(dys))
    return params, carry, cts


# -- the programs under test, compiled once per configuration ------------------------------


@functools.cache
def _engine(kind, hsz, reverse, unroll):
    """Both kernels with their VJP, and the unrolled rollout, in one jit (its own
    cache keys the shapes)."""
    cell = make_cell(kind, hsz)

    def run(params, xs, carry, lengths, reset, cts):
        out = {}
        for kernel in KERNELS:

            def f(p, x, c, kernel=kernel):
                return js.rollout(
                    cell,
                    p,
                    x,
                    c,
                    lengths=lengths,
                    reset=reset,
                    reverse=reverse,
                    unroll=unroll,
                    kernel=kernel,
                )

            values, pullback = jax.vjp(f, params, xs, carry)
            out[kernel] = (values, pullback(cts))
        out["unrolled"] = js.rollout_unrolled(
            cell, params, xs, carry, lengths=lengths, reset=reset, reverse=reverse
        )
        return out

    return jax.jit(run)


def run_engine(pb, xs=None):
    params, carry, cts = _jax_args(pb)
    xs = pb["xs"] if xs is None else xs
    f = _engine(pb["kind"], carry[0].shape[-1], pb["reverse"], pb["unroll"])
    out = f(
        params, jnp.asarray(xs), carry, jnp.asarray(pb["lengths"]), jnp.asarray(pb["reset"]), cts
    )
    return jax.tree_util.tree_map(np.asarray, out)


@functools.cache
def _forward(kind, hsz, reverse):
    """Both kernels, values only, ``unroll=1``; ``lengths``/``reset`` may be None."""
    cell = make_cell(kind, hsz)

    def run(params, xs, carry, lengths, reset):
        return {
            k: js.rollout(
                cell,
                params,
                xs,
                carry,
                lengths=lengths,
                reset=reset,
                reverse=reverse,
                unroll=1,
                kernel=k,
            )
            for k in KERNELS
        }

    return jax.jit(run)


def run_forward(pb, xs, carry, lengths=None, reset=None):
    params, _, _ = _jax_args(pb)
    cell = make_cell(pb["kind"], pb["carry"][0].shape[-1])
    carry = cell.carry_type(*(jnp.asarray(c) for c in carry))
    f = _forward(pb["kind"], carry[0].shape[-1], pb["reverse"])
    as_j = lambda a: None if a is None else jnp.asarray(a)
    out = f(params, jnp.asarray(xs), carry, as_j(lengths), as_j(reset))
    return jax.tree_util.tree_map(np.asarray, out)


# -- comparisons -----------------------------------------------------------------------------

# float32 round-off over at most 6 steps (the measured errors are below 1e-6 of the
# largest entry); a wrong step, carry or reset is off by far more.
TOL = 2e-5


def assert_close(got, want, tol=TOL, what=""):
    """Every leaf within ``tol`` of ``want``, relative to the leaf's largest entry (floor 1)."""
    got_l, want_l = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_l) == len(want_l), what
    for i, (g, w) in enumerate(zip(got_l, want_l)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        scale = max(1.0, float(np.max(np.abs(w), initial=0.0)))
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= tol * scale, f"{what} leaf {i}: max error {err:.3g} (scale {scale:.3g})"


def _loss_ref(pb, params, xs, carry):
    """The randomly weighted sum of the reference's outputs and final carry."""
    c, ys = ref_rollout(pb["kind"], params, xs, carry, pb["lengths"], pb["reset"], pb["reverse"])
    dcarry, dys = pb["cts"]
    return float(np.sum(ys * dys) + sum(np.sum(a * b) for a, b in zip(c, dcarry)))


def _central_difference(pb, which, direction, eps=1e-5):
    """d loss / d eps along ``direction`` of argument ``which`` (params, xs or carry)."""
    args = {
        "params": {k: np.asarray(v, np.float64) for k, v in pb["params"].items()},
        "xs": np.asarray(pb["xs"], np.float64),
        "carry": tuple(np.asarray(c, np.float64) for c in pb["carry"]),
    }

    def moved(sign):
        a = dict(args)
        a[which] = jax.tree_util.tree_map(lambda v, d: v + sign * eps * d, args[which], direction)
        return _loss_ref(pb, a["params"], a["xs"], a["carry"])

    return (moved(1.0) - moved(-1.0)) / (2 * eps)


def _plain_tree(tree):
    """Params as a dict, a carry as a plain tuple (the reference's layouts)."""
    if hasattr(tree, "_asdict") and not isinstance(
        tree, js.recurrent.LSTMCarry | js.recurrent.RNNCarry
    ):
        return dict(tree._asdict())
    return tuple(tree) if isinstance(tree, tuple) else tree


# -- properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@PROFILE
@given(data=st.data())
def test_rollout_equals_the_reference_and_the_unrolled_rollout(config, data):
    pb = data.draw(problems(config), label="problem")
    t_len, lengths = pb["xs"].shape[0], pb["lengths"]
    event(
        f"lengths: 0 {'in' if np.any(lengths == 0) else 'not in'}, T {'in' if np.any(lengths == t_len) else 'not in'}"
    )
    out = run_engine(pb)
    want_carry, want_ys = ref_rollout(
        pb["kind"], pb["params"], pb["xs"], pb["carry"], pb["lengths"], pb["reset"], pb["reverse"]
    )
    for name in (*KERNELS, "unrolled"):
        values = out[name][0] if name in KERNELS else out[name]
        assert_close(values, (want_carry, want_ys), what=f"{name}: (carry, ys) vs the reference")
    # Gradients: the kernels agree leaf by leaf, and each agrees with central
    # differences of the float64 reference along a random direction per argument.
    grads = {k: out[k][1] for k in KERNELS}
    assert_close(grads["fused"], grads["scan"], what="gradients, fused vs scan")
    rng = pb["rng"]
    for i, which in enumerate(("params", "xs", "carry")):
        plain = {k: _plain_tree(grads[k][i]) for k in KERNELS}
        direction = jax.tree_util.tree_map(
            lambda g: rng.standard_normal(np.shape(g)), plain["fused"]
        )
        want = _central_difference(pb, which, direction)
        for kernel in KERNELS:
            terms = jax.tree_util.tree_leaves(
                jax.tree_util.tree_map(
                    lambda g, d: np.asarray(g, np.float64) * d, plain[kernel], direction
                )
            )
            got = sum(float(np.sum(t)) for t in terms)
            scale = sum(float(np.sum(np.abs(t))) for t in terms)
            assert abs(got - want) <= 1e-4 * scale + 1e-6, (kernel, which, got, want, scale)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@PROFILE
@given(data=st.data())
def test_a_padded_batch_equals_each_sequence_run_alone(config, data):
    pb = data.draw(problems(config), label="problem")
    out = run_engine(pb)
    xs, lengths, reset = pb["xs"], pb["lengths"], pb["reset"]
    batch = xs.shape[1:-1]
    for index in np.ndindex(*batch):
        n = int(lengths[index])
        col = (slice(None), *index)
        carry_b = tuple(c[index] for c in pb["carry"])
        alone = run_forward(pb, xs[col][:n], carry_b, reset=reset[col][:n])
        for kernel in KERNELS:
            carry, ys = out[kernel][0]
            want_carry, want_ys = alone[kernel]
            what = f"{kernel}, sequence {index} of length {n}"
            assert_close([c[index] for c in carry], list(want_carry), what=what + ": carry")
            assert_close(ys[col][:n], want_ys, what=what + ": outputs")
            assert not np.any(ys[col][n:]), what + ": non-zero output at a padded step"
            if n == 0:  # nothing ran: the initial carry comes back bit for bit
                for c, c0 in zip(carry, pb["carry"]):
                    np.testing.assert_array_equal(c[index], c0[index], err_msg=what)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@PROFILE
@given(data=st.data())
def test_values_at_padded_steps_change_nothing(config, data):
    pb = data.draw(problems(config), label="problem")
    poison = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -3e38]), label="poison")
    valid = _valid(pb["lengths"], pb["xs"].shape[0])
    clean = run_engine(pb)
    poisoned = run_engine(pb, np.where(valid, pb["xs"], np.float32(poison)))
    for name in clean:
        for i, (g, w) in enumerate(
            zip(jax.tree_util.tree_leaves(poisoned[name]), jax.tree_util.tree_leaves(clean[name]))
        ):
            np.testing.assert_array_equal(g, w, err_msg=f"{name} leaf {i}, padding {poison}")
    for kernel in KERNELS:
        dxs = clean[kernel][1][1]
        assert not np.any(np.where(valid, 0.0, dxs)), f"{kernel}: d xs non-zero at padded steps"


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@PROFILE
@given(data=st.data())
def test_a_reset_equals_a_fresh_rollout_from_zeros(config, data):
    """One reset row at step ``t`` (for a random subset of the sequences), against
    rollouts over the two sides of ``t`` without resets."""
    pb = data.draw(problems(config), label="problem")
    xs, lengths, c0 = pb["xs"], pb["lengths"], pb["carry"]
    t_len, batch = xs.shape[0], xs.shape[1:-1]
    t = data.draw(st.integers(0, t_len - 1), label="t")
    flagged = np.array(
        data.draw(
            st.lists(
                st.booleans(), min_size=len(lengths.reshape(-1)), max_size=len(lengths.reshape(-1))
            ),
            label="flagged",
        ),
        bool,
    ).reshape(batch)
    reset = np.zeros((t_len, *batch), bool)
    reset[t] = flagged
    zeros = tuple(np.zeros_like(c) for c in c0)
    with_reset = run_engine(dict(pb, reset=reset))
    without = run_engine(dict(pb, reset=np.zeros_like(reset)))
    if not pb["reverse"]:
        # Steps before t from the initial carry; from t on, a fresh rollout from zeros.
        applies = flagged & (t < lengths)
        before = run_forward(pb, xs[:t], c0, lengths=np.minimum(lengths, t))
        after = run_forward(pb, xs[t:], zeros, lengths=np.maximum(lengths - t, 0))
        carry_of = after
    else:
        # Steps from t on (run first) from the initial carry; the steps before t,
        # entered from step t, from zeros.
        applies = flagged & (t >= 1) & (t < lengths)
        before = run_forward(pb, xs[:t], zeros, lengths=np.minimum(lengths, t))
        after = run_forward(pb, xs[t:], c0, lengths=np.maximum(lengths - t, 0))
        carry_of = before
    sel = applies[..., None]
    for kernel in KERNELS:
        want_ys = np.where(
            sel[None],
            np.concatenate([before[kernel][1], after[kernel][1]], axis=0),
            without[kernel][0][1],
        )
        want_carry = [
            np.where(sel, a, b) for a, b in zip(carry_of[kernel][0], without[kernel][0][0])
        ]
        got_carry, got_ys = with_reset[kernel][0]
        assert_close(got_ys, want_ys, what=f"{kernel}, reset at {t}: outputs")
        assert_close(list(got_carry), want_carry, what=f"{kernel}, reset at {t}: carry")
