"""The fused kernel's loops over one segment of steps: forward, and its backward.

The custom-VJP core of :mod:`jaxseq.recurrent.kernels`. A segment is ``S``
consecutive steps (the whole sequence, or one checkpoint segment of
:mod:`jaxseq.recurrent._remat`); its inputs are flattened to ``N`` rows.

* **forward** (:func:`_segment_forward`): the input projection is hoisted out
  of the loop (one ``[S*N, D] x [D, G*H]`` matmul; the bias is added inside the
  step, where it fuses into the gate math), then a ``lax.scan`` runs one fused
  ``h @ W_hh`` for all gates per step plus the rule's gate math, saving only
  what the rule's backward needs.
* **backward** (:func:`_segment_backward`): a reverse ``lax.scan`` that carries
  only ``dh`` (and ``dc``) and per step computes the gate cotangents ``dG_t``
  and ``dh_{t-1} = dG_t W_hh^T``. The weight gradients are formed after the
  loop, each as ONE large matmul or reduction over all steps:
  ``dW_hh = sum_t h_{t-1}^T dG_t``, ``dW_ih = X^T dG``, ``db = sum dG``,
  ``dX = dG W_ih^T``.
* ``v`` (valid steps, right padding) and ``r`` (resets in processing order)
  follow :func:`jaxseq.rollout_unrolled` exactly: padded steps pass the carry
  through and output zeros; resets zero the carry before a step.

Shapes: ``S`` steps, ``N`` rows, ``D`` input, ``H`` hidden, ``G`` gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq._numerics import add_bias, matmul_f32
from jaxseq.recurrent.dispatch import Plan
from jaxseq.recurrent.rules import _dot_t, _narrow_like


def _mask(m, x):
    return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


# The carry beyond ``h`` (``c``) is None, one array (the LSTM's cell state) or a tuple
# of arrays (the sLSTM's ``c, n, m``): everything done to it is mapped over its leaves.
_tree = jax.tree_util.tree_map


def _step(cfg: Plan, params, h, c, xp_t, v_t, r_t, save: bool = True):
    """One step from the unbiased projection ``xp_t``, with resets and padding.

    Returns ``(h, c, y, residuals)``: resets zero the carry before the step,
    padded steps (``v_t`` False) pass the carry through and output zeros.
    """
    xp_t = add_bias(xp_t, params.b)
    hi, ci = h, c
    if r_t is not None:
        hi = jnp.where(_mask(r_t, h), jnp.zeros_like(h), h)
        ci = _tree(lambda a: jnp.where(_mask(r_t, a), jnp.zeros_like(a), a), c)
    hn, cn, res = cfg.rule.forward(cfg, params, hi, ci, xp_t, save)
    y = hn
    if v_t is not None:
        y = jnp.where(_mask(v_t, hn), hn, jnp.zeros_like(hn))
        hn = jnp.where(_mask(v_t, hn), hn, h)
        cn = _tree(lambda a, b: jnp.where(_mask(v_t, a), a, b), cn, c)
    return hn, cn, y, res


def _segment_forward(cfg: Plan, params, xs, h0, c0, v, r, save: bool = True):
    """Runs the segment; returns ``((h, c), ys, residuals)``. ``xs: [S, N, D]``."""
    # The bias is added inside the step (where it fuses into the gate math for
    # free) rather than to the whole [S, N, G*H] projection (one more pass over it).
    xp = matmul_f32(xs, params.w_ih)

    def step(h, c, xp_t, v_t, r_t):
        return _step(cfg, params, h, c, xp_t, v_t, r_t, save)

    steps = xs.shape[0]
    unroll = max(1, min(cfg.unroll, steps))
    if cfg.rule.in_place and cfg.rule.forward_in_place and save:
        # The gate activations overwrite the projection they came from, step by
        # step, in the one [S, N, 4H] buffer carried through the loop: the
        # training step holds one such buffer instead of two (its temporaries
        # are first-touched memory on every call on CPU, see _segment_backward).
        def body_inplace(carry, inp):
            h, c, buf = carry
            t, v_t, r_t = inp
            xp_t = jax.lax.dynamic_index_in_dim(buf, t, 0, keepdims=False)
            hn, cn, y, (a, *rest) = step(h, c, xp_t, v_t, r_t)
            buf = jax.lax.dynamic_update_index_in_dim(buf, a, t, 0)
            return (hn, cn, buf), (y, tuple(rest))

        (h, c, acts), (ys, rest) = jax.lax.scan(
            body_inplace,
            (h0, c0, xp),
            (jnp.arange(steps, dtype=jnp.int32), v, r),
            reverse=cfg.reverse,
            unroll=unroll,
        )
        return (h, c), ys, (acts, *rest)

    def body(carry, inp):
        h, c = carry
        hn, cn, y, res = step(h, c, *inp)
        return (hn, cn), (y, res)

    carry, (ys, res) = jax.lax.scan(body, (h0, c0), (xp, v, r), reverse=cfg.reverse, unroll=unroll)
    return carry, ys, res


def _prev_in_order(seq, first, reverse: bool):
    """``out[t] = seq[t - 1]`` in processing order, ``first`` at the first processed step."""
    if reverse:
        return jnp.concatenate([seq[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _carry_in(seq, start, v, r, reverse: bool):
    """The carry each step starts from (after resets): ``[S, N, H]``.

    Under ``lengths`` (right padding) the valid steps of a sequence are a
    prefix of the processing order (forward) or a suffix (reverse), so a step
    whose predecessor was padding starts from the segment's start carry.
    """
    prev = _prev_in_order(seq, start, reverse)
    if v is not None:
        v_prev = _prev_in_order(v, jnp.ones_like(v[0]), reverse)
        prev = jnp.where(_mask(v_prev, prev), prev, start[None])
    if r is not None:
        prev = jnp.where(_mask(r, prev), jnp.zeros_like(prev), prev)
    return prev


def _step_backward(cfg: Plan, params, res_t, y_t, hin_t, cin_t, gh_c, gc_c, dy_t, v_t, r_t,
                   h_dtype, c_dtype):  # fmt: skip
    """One step of the backward, with resets and padding: ``(dh_in, dc_in, dxp)``.

    ``gh_c``/``gc_c`` are the carry cotangents arriving from the next step, ``dy_t``
    the output's; a padded step (``v_t`` False) passes them through untouched, a
    reset stops them. The carry cotangents are rounded as the carry was
    (``h_dtype``/``c_dtype``) and returned in the accumulation dtype.
    """
    gh = gh_c + dy_t.astype(cfg.acc)
    gc = gc_c
    if v_t is not None:
        vm = _mask(v_t, gh)
        gh = jnp.where(vm, gh, 0.0)
        gc = _tree(lambda a: jnp.where(vm, a, 0.0), gc)
    dxp, dh_in, dc_in = cfg.rule.backward(cfg, params, res_t, y_t, hin_t, cin_t, gh, gc)
    if r_t is not None:
        rm = _mask(r_t, dh_in)
        dh_in = jnp.where(rm, 0.0, dh_in)
        dc_in = _tree(lambda a: jnp.where(rm, 0.0, a), dc_in)
    if v_t is not None:
        dh_in = jnp.where(vm, dh_in, gh_c)
        dc_in = _tree(lambda a, b: jnp.where(vm, a, b), dc_in, gc_c)
    dh_in = dh_in.astype(h_dtype).astype(cfg.acc)
    dc_in = _tree(lambda a, dt: a.astype(dt).astype(cfg.acc), dc_in, c_dtype)
    return dh_in, dc_in, dxp


def _backward_in_place(cfg: Plan, body, init, res, c0, dys, v, r, steps: int, unroll: int):
    """The LSTM backward loop writing the gate cotangents over the saved activations.

    Returns ``(dh0, dc0, dxp)`` with ``dxp: [S, N, 4H]`` in the activations' buffer.
    """
    # The gate cotangents overwrite the activations they came from, step by
    # step, in the residual's [S, N, 4H] buffer carried through the loop, and
    # the carry each step started from is read from the saved cell states
    # by index: no second [S, N, 4H] buffer (nor its zero fill) and no
    # shifted copy of the cell states. On CPU a training step's temporaries
    # are fresh pages on every call, so memory not allocated is time saved.
    # cs: the carry states after each step (the LSTM's c, the sLSTM's (c, n, m)) in
    # the accumulation dtype; extra: the rule's other per-step residuals.
    acts, cs, *extra = res
    c_seq = _tree(lambda a, a0: a.astype(a0.dtype), cs, c0)  # rounded as the carry was
    first, delta = (steps - 1, 1) if cfg.reverse else (0, -1)

    def at(tree, t):
        return _tree(lambda a: jax.lax.dynamic_index_in_dim(a, t, 0, keepdims=False), tree)

    def body_inplace(carry, inp):
        gh_c, gc_c, buf, a_t = carry
        t, dy_t, v_t, r_t = inp
        is_first = t == first
        t_prev = jnp.clip(t + delta, 0, steps - 1)
        c_prev = _tree(lambda a, a0: jnp.where(is_first, a0, a), at(c_seq, t_prev), c0)
        if v is not None:
            v_prev = jax.lax.dynamic_index_in_dim(v, t_prev, 0, keepdims=False)
            keep = v_prev | is_first
            c_prev = _tree(lambda a, a0: jnp.where(_mask(keep, a), a, a0), c_prev, c0)
        if r_t is not None:
            c_prev = _tree(lambda a: jnp.where(_mask(r_t, a), jnp.zeros_like(a), a), c_prev)
        c_prev = _tree(lambda a: a.astype(cfg.acc), c_prev)
        res_t = (a_t, at(cs, t), *at(extra, t))
        (dh_in, dc_in), dxp = body((gh_c, gc_c), (res_t, None, None, c_prev, dy_t, v_t, r_t))
        buf = jax.lax.dynamic_update_index_in_dim(buf, dxp, t, 0)
        # The next step's activations are read from the updated buffer (they
        # are untouched there): the write is then the old buffer's only reader
        # and XLA updates it in place. Read before the write, as an input of
        # this step's gate math, the activations would make XLA copy the
        # whole buffer every step to keep the readers' view intact.
        a_next = jax.lax.dynamic_index_in_dim(buf, t_prev, 0, keepdims=False)
        return (dh_in, dc_in, buf, a_next), None

    start = steps - 1 - first  # the step this backward scan processes first
    a0 = jax.lax.dynamic_index_in_dim(acts, start, 0, keepdims=False)
    (dh0, dc0, dxp, _), _ = jax.lax.scan(
        body_inplace,
        (*init, acts, a0),
        (jnp.arange(steps, dtype=jnp.int32), dys, v, r),
        reverse=not cfg.reverse,
        unroll=unroll,
    )
    return dh0, dc0, dxp


def _segment_backward(cfg: Plan, params, xs, h0, c0, v, r, ys, res, dys, dh, dc):
    """Backward of one segment; returns ``(dh0, dc0, dparams, dxs)``."""
    h_in = _carry_in(ys, h0, v, r, cfg.reverse)
    # In place (see below) only for a rolled loop: in an unrolled body XLA
    # copies the buffer between the unrolled steps (the buffers are small there).
    in_place = cfg.rule.in_place and cfg.unroll == 1
    c_in = None
    if cfg.rule.cell_state and not in_place:  # res[1]: the carry states after each step
        c_in = _tree(
            lambda a, a0: _carry_in(a.astype(a0.dtype), a0, v, r, cfg.reverse).astype(cfg.acc),
            res[1],
            c0,
        )
    h_in_loop = h_in.astype(cfg.acc) if cfg.rule.needs_h_in else None

    def body(carry, inp):
        gh_c, gc_c = carry
        res_t, y_t, hin_t, cin_t, dy_t, v_t, r_t = inp
        dh_in, dc_in, dxp = _step_backward(
            cfg, params, res_t, y_t, hin_t, cin_t, gh_c, gc_c, dy_t, v_t, r_t, h0.dtype,
            _tree(lambda a: a.dtype, c0),
        )  # fmt: skip
        return (dh_in, dc_in), dxp

    steps = xs.shape[0]
    unroll = max(1, min(cfg.unroll, steps))
    init = (dh.astype(cfg.acc), _tree(lambda a: a.astype(cfg.acc), dc))
    if in_place:
        dh0, dc0, dxp = _backward_in_place(cfg, body, init, res, c0, dys, v, r, steps, unroll)
    else:
        y_loop = ys if (cfg.rule.needs_y and not res) else None
        (dh0, dc0), dxp = jax.lax.scan(
            body,
            init,
            (res, y_loop, h_in_loop, c_in, dys, v, r),
            reverse=not cfg.reverse,
            unroll=unroll,
        )
    # Weight gradients: one matmul / reduction each over all steps of the segment,
    # on [S*N, .] matrices (one view of each operand for all its consumers).
    rows = steps * xs.shape[1]
    dxp = dxp.reshape(rows, -1)
    cot = cfg.rule.recurrent_cotangent
    dhp = dxp if cot is None else cot(cfg, dxp, res)

    def gram(a, b, w):  # a^T b over the rows; 16-bit operands for 16-bit weights
        a, b = _narrow_like(a, w), _narrow_like(b, w)
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=cfg.acc)

    h_rows = h_in.astype(cfg.acc).reshape(rows, -1)
    if cfg.rule.recurrent_grad is None:
        d_w_hh = gram(h_rows, dhp, params.w_hh)
    else:  # a structured W_hh (the sLSTM's block-diagonal one)
        d_w_hh = cfg.rule.recurrent_grad(cfg, _narrow_like(h_rows, params.w_hh), dhp, params.w_hh)
    d_w_ih = gram(xs.reshape(rows, -1), dxp, params.w_ih)
    d_b = jnp.sum(dxp, axis=0)
    dparams = {"w_ih": d_w_ih, "w_hh": d_w_hh, "b": d_b}
    if cfg.rule.extra_grads is not None:
        dparams.update(cfg.rule.extra_grads(cfg, dhp))
    dxs = _dot_t(dxp, params.w_ih).reshape(xs.shape)
    return dh0, dc0, dparams, dxs
