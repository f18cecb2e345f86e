"""An independent reference of the recurrent cells and of rollout semantics.

Written from the documented equations, with nothing imported from ``jaxseq``,
so that tests comparing ``jaxseq`` against it can fail when ``jaxseq`` is wrong
(comparing ``js.rollout`` with ``js.rollout_unrolled`` cannot: they share the
argument preparation, the reset flags and the masked step).

* Parameters are a mapping (or a NamedTuple) of arrays in the cells' layout:
  weights ``[in, out]``, gates concatenated along ``out`` in PyTorch's order
  (LSTM ``i, f, g, o``; GRU ``r, z, n`` with ``b_hn`` applied inside the reset).
* A carry is a tuple ``(h,)`` or, for the LSTM, ``(h, c)`` of ``[..., H]`` arrays.
* :func:`rollout` runs every sequence on its own with Python loops: the
  lengths, resets and the reverse direction are handled per sequence, in the
  most literal way, and never with masks.

By default everything is NumPy float64. The functions take an array namespace
``xnp`` (``numpy`` or ``jax.numpy``) only so that tests can differentiate the
very same loops with ``jax.grad``: the code uses nothing but ``xnp.tanh``,
``exp``, ``where``, ``zeros``, ``stack``, ``asarray`` and ``@``.
"""

from __future__ import annotations

import numpy

KINDS = ("tanh", "relu", "lstm", "gru")


def as_arrays(params, xnp=numpy, dtype=numpy.float64) -> dict:
    """A params NamedTuple or mapping -> ``{name: array}`` of ``dtype``."""
    items = params._asdict().items() if hasattr(params, "_asdict") else dict(params).items()
    return {name: xnp.asarray(value, dtype) for name, value in items}


def sigmoid(x, xnp=numpy):
    return 1.0 / (1.0 + xnp.exp(-x))


def num_carry(kind: str) -> int:
    return 2 if kind == "lstm" else 1


def zero_carry(kind: str, hidden: int, batch=(), xnp=numpy, dtype=numpy.float64) -> tuple:
    """The zero carry of a cell: ``num_carry(kind)`` arrays ``[*batch, hidden]``."""
    return tuple(xnp.zeros((*batch, hidden), dtype) for _ in range(num_carry(kind)))


def step(kind: str, p: dict, carry: tuple, x, xnp=numpy):
    """One cell step: ``x: [..., D]``, ``carry[i]: [..., H]`` -> ``(new_carry, y)``."""
    h = carry[0]
    hsz = h.shape[-1]
    if kind in ("tanh", "relu"):
        z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        new_h = xnp.tanh(z) if kind == "tanh" else xnp.where(z > 0, z, 0.0)
        return (new_h,), new_h
    if kind == "lstm":
        (c,) = carry[1:]
        z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        i = sigmoid(z[..., 0 * hsz : 1 * hsz], xnp)
        f = sigmoid(z[..., 1 * hsz : 2 * hsz], xnp)
        g = xnp.tanh(z[..., 2 * hsz : 3 * hsz])
        o = sigmoid(z[..., 3 * hsz : 4 * hsz], xnp)
        new_c = f * c + i * g
        new_h = o * xnp.tanh(new_c)
        return (new_h, new_c), new_h
    if kind == "gru":
        xi = x @ p["w_ih"] + p["b"]
        hh = h @ p["w_hh"]
        r = sigmoid(xi[..., :hsz] + hh[..., :hsz], xnp)
        z = sigmoid(xi[..., hsz : 2 * hsz] + hh[..., hsz : 2 * hsz], xnp)
        n = xnp.tanh(xi[..., 2 * hsz :] + r * (hh[..., 2 * hsz :] + p["b_hn"]))
        new_h = (1.0 - z) * n + z * h
        return (new_h,), new_h
    raise ValueError(f"unknown cell kind {kind!r}")


def rollout(kind, p, xs, carry, lengths=None, reset=None, reverse=False, xnp=numpy):
    """Reference rollout: ``xs: [T, *B, D]``, ``carry[i]: [*B, H]`` -> ``(carry, ys: [T, *B, H])``.

    ``kind`` names a cell of :func:`step`, or is a step function
    ``(p, carry, x, xnp) -> (carry, y)`` of another cell (same carry layout).

    For every sequence ``b`` (any number of batch dims, none included):

    * only its valid steps ``0 .. lengths[b] - 1`` run; the carry returned is the
      one after its last valid step, its outputs at the other steps are zeros;
    * forward, ``reset[t, b]`` sets the carry to zeros right before step ``t``;
    * reverse, the valid steps run from ``lengths[b] - 1`` down to 0 and the
      episode that starts at step ``t`` ends the backward pass through it: the
      carry is set to zeros before step ``t - 1`` when ``reset[t, b]``;
    * flags at steps ``t >= lengths[b]`` are never looked at.
    """
    t_len = xs.shape[0]
    batch = tuple(xs.shape[1:-1])
    hsz = carry[0].shape[-1]
    n_seq = int(numpy.prod(batch, dtype=numpy.int64))
    xs_f = xs.reshape((t_len, n_seq, xs.shape[-1]))
    carry_f = [leaf.reshape((n_seq, hsz)) for leaf in carry]
    len_f = None if lengths is None else numpy.asarray(lengths).reshape(n_seq)
    reset_f = None if reset is None else numpy.asarray(reset).reshape(t_len, n_seq)
    zeros = xnp.zeros((hsz,), xs.dtype)
    step_fn = kind if callable(kind) else (lambda p, c, x, xnp: step(kind, p, c, x, xnp))

    final = []  # per sequence: its final carry
    outputs = []  # per sequence: its T outputs
    for b in range(n_seq):
        n_valid = t_len if len_f is None else int(len_f[b])
        state = tuple(leaf[b] for leaf in carry_f)
        ys_b = [zeros] * t_len
        order = range(n_valid - 1, -1, -1) if reverse else range(n_valid)
        for t in order:
            if reset_f is not None:
                flag_step = t + 1 if reverse else t  # the step whose flag starts an episode here
                if flag_step < n_valid and reset_f[flag_step, b]:
                    state = tuple(xnp.zeros_like(leaf) for leaf in state)
            state, ys_b[t] = step_fn(p, state, xs_f[t, b], xnp)
        final.append(state)
        outputs.append(xnp.stack(ys_b))
    ys = xnp.stack(outputs, axis=1).reshape((t_len, *batch, hsz))
    new_carry = tuple(
        xnp.stack([s[i] for s in final]).reshape((*batch, hsz)) for i in range(len(carry))
    )
    return new_carry, ys


def rollout_vjp(kind, p, xs, carry, cotangents, lengths=None, reset=None, reverse=False):
    """Values and gradients of the reference in float64, as NumPy arrays.

    The gradients are those of ``sum(ys * dys) + sum_i sum(carry_i * dcarry_i)``
    (``cotangents = (dcarry, dys)``) with respect to ``(p, xs, carry)``: the
    loops of :func:`rollout` run on ``jax.numpy`` and ``jax.vjp`` differentiates
    them (JAX here is only the differentiator of these loops).
    """
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        args = (
            {k: jnp.asarray(v, jnp.float64) for k, v in p.items()},
            jnp.asarray(xs, jnp.float64),
            tuple(jnp.asarray(c, jnp.float64) for c in carry),
        )

        def f(p, xs, carry):
            return rollout(kind, p, xs, carry, lengths, reset, reverse, xnp=jnp)

        out, pullback = jax.vjp(f, *args)
        dcarry, dys = cotangents
        cts = (tuple(jnp.asarray(c, jnp.float64) for c in dcarry), jnp.asarray(dys, jnp.float64))
        grads = pullback(cts)
        return jax.tree_util.tree_map(numpy.asarray, (out, grads))


# ----------------------------------------------------------------------------------
# Problems and comparisons shared by the tests
# ----------------------------------------------------------------------------------
def param_shapes(kind: str, d: int, h: int) -> dict:
    """The documented parameter layout: ``w_ih [D, G*H]``, ``w_hh [H, G*H]``, ``b [G*H]``
    (and the GRU's ``b_hn [H]``)."""
    g = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}[kind]
    shapes = {"w_ih": (d, g * h), "w_hh": (h, g * h), "b": (g * h,)}
    if kind == "gru":
        shapes["b_hn"] = (h,)
    return shapes


def random_problem(kind, t, batch, d, h, seed=0, scale=0.5):
    """``(params, xs, carry, cotangents)`` as float64 NumPy arrays whose values are
    exact in float32 (so float32 and float64 runs see the very same numbers).

    The initial carry is random and non-zero; ``cotangents = (dcarry, dys)``
    weight every output and every leaf of the final carry.
    """
    rng = numpy.random.default_rng(seed)

    def f32(a):
        return a.astype(numpy.float32).astype(numpy.float64)

    params = {
        name: f32(scale * rng.standard_normal(shape))
        for name, shape in param_shapes(kind, d, h).items()
    }
    xs = f32(rng.standard_normal((t, *batch, d)))
    carry = tuple(f32(0.5 * rng.standard_normal((*batch, h))) for _ in range(num_carry(kind)))
    dcarry = tuple(rng.standard_normal((*batch, h)) for _ in range(num_carry(kind)))
    dys = rng.standard_normal((t, *batch, h))
    return params, xs, carry, (dcarry, dys)


def _leaves(tree, path=""):
    if hasattr(tree, "_asdict"):
        tree = tree._asdict()
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{path}.{k}")
    elif isinstance(tree, tuple | list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, tree


def max_rel_errors(got, want) -> dict:
    """``{leaf path: max |got - want| / max |want|}`` over matching trees
    (NamedTuples are compared with dicts of the same names; shapes must match)."""
    g_leaves, w_leaves = list(_leaves(got)), list(_leaves(want))
    g_paths = [p for p, _ in g_leaves]
    w_paths = [p for p, _ in w_leaves]
    assert g_paths == w_paths, (g_paths, w_paths)
    out = {}
    for (path, g), (_, w) in zip(g_leaves, w_leaves):
        g = numpy.asarray(g, numpy.float64)
        w = numpy.asarray(w, numpy.float64)
        assert g.shape == w.shape, (path, g.shape, w.shape)
        scale = max(float(numpy.max(numpy.abs(w), initial=0.0)), 1e-30)
        out[path] = float(numpy.max(numpy.abs(g - w), initial=0.0)) / scale
    return out


def assert_close(got, want, tol: float, what: str = "") -> None:
    """Every leaf of ``got`` within ``tol`` of ``want``, relative to the leaf's largest entry."""
    errors = max_rel_errors(got, want)
    bad = {path: err for path, err in errors.items() if not err <= tol}
    assert not bad, f"{what}: max relative errors above {tol:g}: {bad}"


# ----------------------------------------------------------------------------------
# Harness: runs a rollout under test on a problem and checks it against the reference.
# The rollout function is passed in, so this module never imports the library.
# ----------------------------------------------------------------------------------
# Max error relative to each leaf's largest entry. float32 runs carry float32
# round-off through the steps (measured: at most ~4e-7); float64 ones agree with
# the reference to ~1e-15.
TOL = {"float32": 3e-6, "float64": 1e-13}


def to_jax(cell, prob, dtype):
    """``(params, xs, carry, cotangents)`` as the cell's NamedTuples of jax arrays of
    ``dtype`` (for float64, call inside ``jax.enable_x64(True)``)."""
    import jax.numpy as jnp

    params, xs, carry, (dcarry, dys) = prob
    params = cell.params_type(**{k: jnp.asarray(v, dtype) for k, v in params.items()})
    carry = cell.carry_type(*(jnp.asarray(c, dtype) for c in carry))
    cts = (cell.carry_type(*(jnp.asarray(c, dtype) for c in dcarry)), jnp.asarray(dys, dtype))
    return params, jnp.asarray(xs, dtype), carry, cts


def as_numpy(result):
    """``((carry, ys), (dparams, dxs, dcarry))`` of the library in the reference's layout."""
    (carry, ys), (dp, dxs, dcarry) = result
    return (tuple(numpy.asarray(c) for c in carry), numpy.asarray(ys)), (
        {k: numpy.asarray(v) for k, v in dp._asdict().items()},
        numpy.asarray(dxs),
        tuple(numpy.asarray(c) for c in dcarry),
    )


def run_vjp(rollout_fn, cell, prob, dtype: str, cases: dict) -> dict:
    """``{name: ((carry, ys), (dparams, dxs, dcarry))}`` of
    ``rollout_fn(cell, params, xs, carry, **cases[name])`` and its VJP with the
    problem's cotangents, every case in ONE ``jax.jit`` (compile time dominates).
    Every returned array must have ``dtype``."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(dtype == "float64"):
        params, xs, carry, cts = to_jax(cell, prob, jnp.dtype(dtype))

        def all_cases(params, xs, carry, cts):
            out = {}
            for name, kw in cases.items():
                f = lambda p, x, c, kw=kw: rollout_fn(cell, p, x, c, **kw)
                values, pullback = jax.vjp(f, params, xs, carry)
                out[name] = (values, pullback(cts))
            return out

        out = jax.jit(all_cases)(params, xs, carry, cts)
        for leaf in jax.tree_util.tree_leaves(out):
            assert leaf.dtype == jnp.dtype(dtype), leaf.dtype
        return {name: as_numpy(r) for name, r in out.items()}


def check(got, want, dtype: str, carry0=None, lengths=None, what: str = "") -> None:
    """Values ``(carry, ys)`` and, when given, gradients against the reference.

    With ``lengths``, outputs at padded steps must be exactly zero and a sequence
    of length 0 must return its initial carry ``carry0`` exactly.
    """
    tol = TOL[dtype]
    assert_close(got[0], want[0], tol, f"{what}: values (carry, ys)")
    if len(got) > 1:
        assert_close(got[1], want[1], tol, f"{what}: grads (params, xs, carry)")
    if lengths is not None:
        carry, ys = got[0]
        n = numpy.asarray(lengths).reshape(-1)
        ys = ys.reshape(ys.shape[0], n.size, -1)
        for b, n_b in enumerate(n):
            assert not numpy.any(ys[n_b:, b]), f"{what}: non-zero output at a padded step of {b}"
            if n_b == 0:
                for c, c0 in zip(carry, carry0):
                    numpy.testing.assert_array_equal(
                        c.reshape(n.size, -1)[b], c0.reshape(n.size, -1)[b], err_msg=what
                    )


def check_cases(got: dict, wants: dict, dtype: str, carry0, options: dict, label: str) -> None:
    """:func:`check` for every case, reporting all failing cases at once."""
    failures = []
    for name, want in wants.items():
        try:
            check(got[name], want, dtype, carry0, options[name].get("lengths"), f"{label}/{name}")
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)
