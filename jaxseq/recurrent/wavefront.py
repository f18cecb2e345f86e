"""A stack of recurrent layers as ONE wavefront: layer ``l`` at step ``t`` next to layer
``l + 1`` at step ``t - 1``.

:func:`wavefront_rollout` is a ``jax.custom_vjp`` that trains ``L >= 2`` layers of
the same built-in rule (:mod:`jaxseq.recurrent.rules`: RNN, LSTM, GRU) in one
loop instead of ``L`` loops one after another (:meth:`jaxseq.Stack.rollout`
runs it with ``wavefront=True``):

* **forward** (under differentiation): ``T + L - 1`` iterations; iteration ``i``
  runs layer ``l`` at step ``t = i - l`` for every layer with ``0 <= t < T``.
  The layers of one iteration do not depend on each other (layer ``l`` reads
  layer ``l - 1``'s output of the PREVIOUS iteration), so XLA:CPU may run them
  on different cores. Layer 0's input projection is hoisted out of the loop
  (one ``[T*N, D] x [D, G*H]`` matmul, as in the single-layer kernel; its gate
  activations overwrite it for the LSTM); layer ``l > 0`` projects its input
  inside the step. The first and last ``L - 1`` iterations (not every layer
  active) are traced one by one around one ``lax.scan`` over the others.
* **backward**: the reverse wavefront over the same iterations, carrying each
  layer's ``dh`` (and ``dc``); layer ``l``'s gate cotangents at step ``t`` give
  layer ``l - 1``'s output cotangent at step ``t``, ``dx_l = dG_l W_ih_l^T``,
  consumed one iteration later. The weight gradients are formed after the
  loop, one large matmul or reduction each, as in the single-layer kernel.
* **inference** (no backward to feed) runs the layers one after another with
  the single-layer kernel's loop (a wavefront saving nothing was no faster).
* **dropout** between layers: per-layer keep masks (``bool[T, N, H_l]``, or
  ``[1, N, H_l]`` for one mask shared by all steps) applied to a layer's output
  as ``jnp.where(keep, y / (1 - rate), 0)`` before the next layer reads it,
  exactly as :func:`jaxseq.nn.dropout` does.
* ``valid`` (right padding) and ``reset`` have the single-layer kernel's
  semantics in every layer (:func:`jaxseq.rollout_unrolled`): padded steps pass
  the carry through and output zeros, resets zero the carry before a step.

The gate math is the rules' (``rule.forward``/``rule.backward``) and the
numerics are the layer-by-layer path's (every layer accumulates in its own
accumulation dtype; carries, outputs and cotangents are rounded as there), so
values and gradients equal ``js.rollout`` of each layer in turn with the same
dropout masks, to float rounding.

Speed: on 2 CPU cores it trained no faster than layer by layer at any measured
shape (each step's matmul already keeps both cores busy); the numbers, and the
rule that keeps ``Stack.rollout`` on the layer-by-layer path by default, are in
:func:`jaxseq.recurrent.dispatch.wavefront_wins`.

Shapes: ``T`` time, ``N`` the flattened batch, ``D`` input, ``H_l`` layer
``l``'s hidden size, ``G`` gates (RNN 1, LSTM 4, GRU 3), ``L`` layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq._numerics import acc_dtype, matmul_f32
from jaxseq.nn.dropout import _keep_mask
from jaxseq.recurrent._segments import (
    _carry_in,
    _Cfg,
    _mask,
    _segment_forward,
    _step,
    _step_backward,
)
from jaxseq.recurrent.dispatch import (
    KERNELS,
    fused_rule,
    step_work,
    under_forward_mode,
    wavefront_wins,
)
from jaxseq.recurrent.rollouts import _prepare, processing_resets, resolve_unroll, valid_steps
from jaxseq.recurrent.rules import _dot_t, _narrow_like

__all__ = [
    "stack_rollout",
    "wavefront_rollout",
]


class _WCfg(NamedTuple):
    """Static settings of one wavefront (hashable: a ``custom_vjp`` nondiff argument)."""

    layers: tuple  # one _Cfg per layer (its rule, hidden size, unroll, accumulation dtype)
    rate: float  # dropout rate between layers (the masks are arguments)
    in_place: bool  # LSTM: gate activations overwrite their projection, cotangents them


def _schedule(t: int, n_layers: int):
    """Iterations ``(first, main, last)``: Python-traced head and tail, scanned middle.

    Iteration ``i`` runs layer ``l`` at step ``i - l``; all layers are active
    exactly for ``i`` in ``[L - 1, T)``.
    """
    head = range(0, n_layers - 1)
    main = (n_layers - 1, t)
    tail = range(max(n_layers - 1, t), t + n_layers - 1)
    return head, main, tail


def _active(i: int, t: int, n_layers: int):
    return range(max(0, i - t + 1), min(n_layers - 1, i) + 1)


def _row(a, t):
    """``a[t]`` for a traced or Python ``t`` (``a: [S, ...]``)."""
    return jax.lax.dynamic_index_in_dim(a, t, 0, keepdims=False)


def _before(t):
    """``max(t - 1, 0)`` for a traced or Python ``t``."""
    return max(t - 1, 0) if isinstance(t, int) else jnp.maximum(t - 1, 0)


def _put(a, x, t):
    return jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), t, 0)


def _keep_row(keep, t):
    """The keep mask of step ``t``: ``keep: [T, N, H]``, or ``[1, N, H]`` shared by all steps."""
    return keep[0] if keep.shape[0] == 1 else _row(keep, t)


def _drop(y, keep_t, rate):
    """Inverted dropout of one step, exactly as ``jaxseq.nn.dropout`` computes it."""
    if keep_t is None:
        return y
    return jnp.where(keep_t, y / (1.0 - rate), jnp.zeros_like(y)).astype(y.dtype)


def _drop_seq(ys, keep, rate):
    if keep is None:
        return ys
    return jnp.where(keep, ys / (1.0 - rate), jnp.zeros_like(ys)).astype(ys.dtype)


def _step_forward(cfg: _Cfg, p, h, c, xp_t, v_t, r_t):
    """One layer at one step (the single-layer kernel's step, saving its residuals)."""
    return _step(cfg, p, h, c, xp_t, v_t, r_t, True)


def _wave_forward(w: _WCfg, params, xs, h0, c0, keep, v, r):
    """The forward wavefront, saving the backward's residuals.

    Returns ``(h, c, ys, residuals)``, per-layer tuples; ``ys[l]: [T, N, H_l]``
    are every layer's outputs, the residuals the rule's (LSTM: layer 0's gate
    activations in place of its projection).
    """
    n_layers = len(params)
    t_len = xs.shape[0]
    top = n_layers - 1
    cfgs = w.layers
    xp0 = matmul_f32(xs, params[0].w_ih)

    def buffers(k):
        cfg, p = cfgs[k], params[k]
        x_t = jnp.zeros((xs.shape[1], p.w_ih.shape[-1]), cfg.acc)
        shapes = jax.eval_shape(lambda: cfg.rule.forward(cfg, p, h0[k], c0[k], x_t, True)[2])
        bufs = [jnp.zeros((t_len,) + s.shape, s.dtype) for s in shapes]
        if w.in_place and k == 0:
            bufs[0] = xp0
        return tuple(bufs)

    ys = tuple(jnp.zeros((t_len,) + h.shape, h.dtype) for h in h0)
    res = tuple(buffers(k) for k in range(n_layers))

    def iteration(i, layers, state):
        h, c, prev, ys, res = state
        h, c, ys, res, new_prev = list(h), list(c), list(ys), list(res), list(prev)
        for k in layers:
            t = i - k
            cfg, p = cfgs[k], params[k]
            if k == 0:
                xp_t = _row(res[0][0] if w.in_place else xp0, t)
            else:
                # Layer k - 1's output of the previous iteration, after dropout.
                x = prev[k - 1]
                if keep[k - 1] is not None:
                    x = _drop(x, _keep_row(keep[k - 1], t), w.rate)
                xp_t = matmul_f32(x, p.w_ih)
            v_t = None if v is None else _row(v, t)
            r_t = None if r is None else _row(r, t)
            h[k], c[k], y, res_t = _step_forward(cfg, p, h[k], c[k], xp_t, v_t, r_t)
            ys[k] = _put(ys[k], y, t)
            res[k] = tuple(_put(b, a, t) for b, a in zip(res[k], res_t))
            if k < top:
                new_prev[k] = y
        return tuple(h), tuple(c), tuple(new_prev), tuple(ys), tuple(res)

    prev0 = tuple(jnp.zeros_like(h0[k]) for k in range(top))
    state = (tuple(h0), tuple(c0), prev0, ys, res)
    head, (lo, hi), tail = _schedule(t_len, n_layers)
    for i in head:
        state = iteration(i, _active(i, t_len, n_layers), state)
    if hi > lo:
        unroll = max(1, min(cfgs[0].unroll, hi - lo))

        def body(s, i):
            return iteration(i, range(n_layers), s), None

        state, _ = jax.lax.scan(body, state, jnp.arange(lo, hi, dtype=jnp.int32), unroll=unroll)
    for i in tail:
        state = iteration(i, _active(i, t_len, n_layers), state)
    h, c, _, ys, res = state
    return h, c, ys, res


def _layers_forward(w: _WCfg, params, xs, h0, c0, keep, v, r):
    """Inference: the layers one after another (the single-layer kernel's loop), saving
    nothing; returns ``(h, c, ys)`` with ``ys`` the last layer's outputs."""
    x, hs, cs = xs, [], []
    for k, (cfg, p) in enumerate(zip(w.layers, params)):
        (h, c), x, _ = _segment_forward(cfg, p, x, h0[k], c0[k], v, r, save=False)
        hs.append(h)
        cs.append(c)
        if k < len(params) - 1:
            x = _drop_seq(x, keep[k], w.rate)
    return tuple(hs), tuple(cs), x


def _weight_grads(cfg: _Cfg, p, x_seq, h_in, dxp, res):
    """Gradients of one layer's weights from all its steps at once (as ``_segment_backward``)."""
    rows = dxp.shape[0] * dxp.shape[1]
    dxp = dxp.reshape(rows, -1)
    cot = cfg.rule.recurrent_cotangent
    dhp = dxp if cot is None else cot(cfg, dxp, res)

    def gram(a, b, w):
        a, b = _narrow_like(a, w), _narrow_like(b, w)
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=cfg.acc)

    grads = {
        "w_ih": gram(x_seq.reshape(rows, -1), dxp, p.w_ih),
        "w_hh": gram(h_in.astype(cfg.acc).reshape(rows, -1), dhp, p.w_hh),
        "b": jnp.sum(dxp, axis=0),
    }
    if cfg.rule.extra_grads is not None:
        grads.update(cfg.rule.extra_grads(cfg, dhp))
    return grads, dxp


def _wave_backward(w: _WCfg, params, xs, h0, c0, keep, v, r, ys, res, dys, dh, dc):
    """The reverse wavefront; returns ``(dparams, dxs, dh0, dc0)`` (per-layer tuples)."""
    n_layers = len(params)
    t_len = xs.shape[0]
    top = n_layers - 1
    cfgs = w.layers
    # Layer l's inputs (layer l-1's outputs after dropout), and the carries each step
    # started from.
    x_seqs = [xs] + [_drop_seq(ys[k - 1], keep[k - 1], w.rate) for k in range(1, n_layers)]
    h_in = [_carry_in(ys[k], h0[k], v, r, False) for k in range(n_layers)]
    h_in_loop = [
        h_in[k].astype(cfgs[k].acc) if cfgs[k].rule.needs_h_in else None for k in range(n_layers)
    ]
    # In place only for a rolled loop, as in _segment_backward.
    in_place = w.in_place and cfgs[0].unroll == 1
    cell_state = cfgs[0].rule.cell_state
    c_in = [None] * n_layers
    if cell_state and not in_place:
        c_in = [
            _carry_in(res[k][1].astype(c0[k].dtype), c0[k], v, r, False).astype(cfgs[k].acc)
            for k in range(n_layers)
        ]
    c_seq = [res[k][1].astype(c0[k].dtype) for k in range(n_layers)] if in_place else None

    # The gate cotangents: in place of the activations (LSTM), else fresh buffers.
    if in_place:
        dxp = tuple(res[k][0] for k in range(n_layers))
    else:
        dxp = tuple(
            jnp.zeros((t_len, xs.shape[1], params[k].w_hh.shape[-1]), cfgs[k].acc)
            for k in range(n_layers)
        )
    # In place, each layer's next activations are read from its updated buffer after
    # the write (see _segment_backward): carried as `a_next`.
    a_next = tuple(_row(dxp[k], t_len - 1) for k in range(n_layers)) if in_place else None

    def layer_step(k, t, gh_c, gc_c, dy_t, bufs, a_t):
        cfg, p = cfgs[k], params[k]
        v_t = None if v is None else _row(v, t)
        r_t = None if r is None else _row(r, t)
        if in_place:
            if isinstance(t, int):
                c_prev = c0[k] if t == 0 else _row(c_seq[k], t - 1)
                v_prev = None if (v is None or t == 0) else _row(v, t - 1)
            else:
                c_prev = jnp.where(t == 0, c0[k], _row(c_seq[k], _before(t)))
                v_prev = None if v is None else _row(v, _before(t)) | (t == 0)
            if v_prev is not None:
                c_prev = jnp.where(_mask(v_prev, c_prev), c_prev, c0[k])
            if r_t is not None:
                c_prev = jnp.where(_mask(r_t, c_prev), jnp.zeros_like(c_prev), c_prev)
            res_t = (a_t, _row(res[k][1], t))
            cin_t = c_prev.astype(cfg.acc)
        else:
            res_t = tuple(_row(b, t) for b in res[k])
            cin_t = None if c_in[k] is None else _row(c_in[k], t)
        y_t = _row(ys[k], t) if (cfg.rule.needs_y and not res[k]) else None
        hin_t = None if h_in_loop[k] is None else _row(h_in_loop[k], t)
        dh_in, dc_in, dxp_t = _step_backward(
            cfg, p, res_t, y_t, hin_t, cin_t, gh_c, gc_c, dy_t, v_t, r_t, h0[k].dtype,
            None if c0[k] is None else c0[k].dtype,
        )  # fmt: skip
        bufs = _put(bufs, dxp_t, t)
        a_t = _row(bufs, _before(t)) if in_place else None
        # The output cotangent of the layer below at this step (after its dropout).
        dx = None
        if k > 0:
            dx = _dot_t(dxp_t, p.w_ih).astype(x_seqs[k].dtype)
            if keep[k - 1] is not None:
                dx = jnp.where(_keep_row(keep[k - 1], t), dx / (1.0 - w.rate), 0.0).astype(dx.dtype)
        return dh_in, dc_in, bufs, a_t, dx

    def iteration(i, layers, state):
        gh, gc, dnext, bufs, a_cur = state
        gh, gc, bufs = list(gh), list(gc), list(bufs)
        a_cur = list(a_cur) if a_cur is not None else None
        new_dnext = list(dnext)
        for k in layers:
            t = i - k
            dy_t = _row(dys, t) if k == top else dnext[k]
            a_t = a_cur[k] if a_cur is not None else None
            gh[k], gc[k], bufs[k], a_t, dx = layer_step(k, t, gh[k], gc[k], dy_t, bufs[k], a_t)
            if a_cur is not None:
                a_cur[k] = a_t
            if k > 0:
                new_dnext[k - 1] = dx
        a_cur = tuple(a_cur) if a_cur is not None else None
        return tuple(gh), tuple(gc), tuple(new_dnext), tuple(bufs), a_cur

    gh0 = tuple(dh[k].astype(cfgs[k].acc) for k in range(n_layers))
    gc0 = tuple(None if dc[k] is None else dc[k].astype(cfgs[k].acc) for k in range(n_layers))
    dnext0 = tuple(jnp.zeros_like(h0[k], dtype=x_seqs[k + 1].dtype) for k in range(top))
    state = (gh0, gc0, dnext0, dxp, a_next)
    head, (lo, hi), tail = _schedule(t_len, n_layers)
    for i in reversed(tail):
        state = iteration(i, _active(i, t_len, n_layers), state)
    if hi > lo:
        unroll = max(1, min(cfgs[0].unroll, hi - lo))

        def body(s, i):
            return iteration(i, range(n_layers), s), None

        state, _ = jax.lax.scan(
            body, state, jnp.arange(lo, hi, dtype=jnp.int32), reverse=True, unroll=unroll
        )
    for i in reversed(head):
        state = iteration(i, _active(i, t_len, n_layers), state)
    gh, gc, _, dxp, _ = state

    dparams = []
    for k in range(n_layers):
        grads, dxp_rows = _weight_grads(cfgs[k], params[k], x_seqs[k], h_in[k], dxp[k], res[k])
        dparams.append(grads)
        if k == 0:
            dxs = _dot_t(dxp_rows, params[0].w_ih).reshape(xs.shape)
    return tuple(dparams), dxs, gh, gc


def _split(w: _WCfg, carries):
    h0 = tuple(cc[0] for cc in carries)
    c0 = tuple(cc[1] if cfg.rule.cell_state else None for cc, cfg in zip(carries, w.layers))
    return h0, c0


def _join(w: _WCfg, carries, h, c):
    if w.layers[0].rule.cell_state:
        return tuple(type(cc)(hk, ck) for cc, hk, ck in zip(carries, h, c))
    return tuple(type(cc)(hk) for cc, hk in zip(carries, h))


def _wave_primal(w: _WCfg, params, xs, carries, keep, v, r):
    """Inference (no backward to feed): the layers one after another, see the module docstring."""
    h0, c0 = _split(w, carries)
    h, c, ys = _layers_forward(w, params, xs, h0, c0, keep, v, r)
    return _join(w, carries, h, c), ys


def _wave_fwd(w: _WCfg, params, xs, carries, keep, v, r):
    h0, c0 = _split(w, carries)
    h, c, ys, res = _wave_forward(w, params, xs, h0, c0, keep, v, r)
    return (_join(w, carries, h, c), ys[-1]), (params, xs, carries, keep, v, r, ys, res)


def _wave_bwd(w: _WCfg, saved, cts):
    params, xs, carries, keep, v, r, ys, res = saved
    d_carries, dys = cts
    h0, c0 = _split(w, carries)
    dh, dc = _split(w, d_carries)
    dparams, dxs, dh0, dc0 = _wave_backward(w, params, xs, h0, c0, keep, v, r, ys, res, dys, dh, dc)
    dparams = tuple(
        type(p)(**{name: g[name].astype(getattr(p, name).dtype) for name in g})
        for p, g in zip(params, dparams)
    )
    d_init = []
    for cc, gh, gc in zip(carries, dh0, dc0):
        leaves = [gh.astype(cc[0].dtype)]
        if w.layers[0].rule.cell_state:
            leaves.append(gc.astype(cc[1].dtype))
        d_init.append(type(cc)(*leaves))
    return dparams, dxs.astype(xs.dtype), tuple(d_init), None, None, None


_wave = jax.custom_vjp(_wave_primal, nondiff_argnums=(0,))
_wave.defvjp(_wave_fwd, _wave_bwd)


def wavefront_rollout(
    cells, params, xs, carries, *, keep=None, rate=0.0, valid=None, reset=None, unroll=1
):
    """A stack of ``L >= 2`` built-in cells of one kind as one wavefront: ``[T, *B, D] -> [T, *B, H_L]``.

    The kernel behind :meth:`jaxseq.Stack.rollout`'s wavefront path (see the
    module docstring); equal to running :func:`jaxseq.rollout` layer after layer
    (``kernel="fused"``) with dropout ``keep`` masks between the layers, in
    values and gradients (reverse mode only: it is a ``jax.custom_vjp``).

    Args:
      cells: ``L >= 2`` cells with the same fused rule (all ``LSTM``, all ``GRU``, or
        all ``RNN`` with one activation), bottom first.
      params: a sequence of their params.
      xs: ``[T, *B, D]`` inputs of the bottom layer.
      carries: a sequence of the layers' initial carries, batch ``*B``.
      keep: None, or ``L - 1`` dropout keep masks (each None or ``bool[T, *B, H_l]``,
        or ``[1, *B, H_l]`` for one mask shared by all steps) for the outputs of every
        layer but the last: layer ``l + 1`` reads ``where(keep[l], y_l / (1 - rate), 0)``.
      rate: the dropout rate of those masks, in ``[0, 1)``.
      valid: optional ``bool[T, *B]``: step ``t`` is inside the sequence (right
        padding); the inputs at invalid steps must be finite (zeros, as
        :func:`jaxseq.rollout` makes them).
      reset: optional ``bool[T, *B]``: zero every layer's carry before step ``t``
        (in processing order, see ``jaxseq.recurrent.rollouts.processing_resets``).
      unroll: positive int, the ``lax.scan`` unroll of the wavefront loops.

    Returns:
      ``(final_carries, ys)``: a tuple of the layers' final carries and the last
      layer's outputs ``ys: [T, *B, H_L]``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent.wavefront import wavefront_rollout
    >>> cells = (js.LSTM(4), js.LSTM(3))
    >>> params = (cells[0].init(jax.random.key(0), 2), cells[1].init(jax.random.key(1), 4))
    >>> carries = tuple(c.initial_carry((5,)) for c in cells)
    >>> finals, ys = wavefront_rollout(cells, params, jnp.ones((6, 5, 2)), carries)
    >>> ys.shape, finals[0].c.shape
    ((6, 5, 3), (5, 4))
    """
    cells, params, carries = tuple(cells), tuple(params), tuple(carries)
    n_layers = len(cells)
    if n_layers < 2:
        raise ValueError(f"cells: expected at least 2 cells, got {n_layers}")
    if len(params) != n_layers or len(carries) != n_layers:
        raise ValueError(
            f"params, carries: expected one per cell ({n_layers}), "
            f"got {len(params)} params and {len(carries)} carries"
        )
    rule = fused_rule(cells[0])
    if rule is None or any(fused_rule(c) != rule for c in cells[1:]):
        raise ValueError(
            "cells: expected cells with one and the same fused rule (all LSTM, all GRU, or all "
            f"RNN with one activation), got {[type(c).__name__ for c in cells]}"
        )
    if keep is None:
        keep = (None,) * (n_layers - 1)
    keep = tuple(keep)
    if len(keep) != n_layers - 1:
        raise ValueError(f"keep: expected {n_layers - 1} masks (one per layer but the last)")
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: expected a dropout rate in [0, 1), got {rate}")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll: expected a positive int, got {unroll!r}")

    t = xs.shape[0]
    batch_shape = tuple(xs.shape[1:-1])
    n = math.prod(batch_shape)
    if t == 0:
        top = cells[-1].hidden_size
        return carries, jnp.zeros((0, *batch_shape, top), carries[-1][0].dtype)

    cfgs, x_dtype = [], xs.dtype
    for cell, p, cc in zip(cells, params, carries):
        acc = acc_dtype(*jax.tree_util.tree_leaves(p), x_dtype, *cc)
        cfgs.append(_Cfg(rule, cell.hidden_size, False, int(unroll), 0, jnp.dtype(acc)))
        x_dtype = cc[0].dtype
    w = _WCfg(tuple(cfgs), rate, bool(rule.in_place))

    def flat(leaf):
        return leaf.reshape((n, leaf.shape[-1]))

    carries_f = tuple(type(cc)(*(flat(leaf) for leaf in cc)) for cc in carries)
    keep_f = tuple(None if m is None else m.reshape((m.shape[0], n, m.shape[-1])) for m in keep)
    v_f = None if valid is None else valid.reshape((t, n))
    r_f = None if reset is None else reset.reshape((t, n))
    xs_f = xs.reshape((t, n, xs.shape[-1]))
    finals, ys = _wave(w, params, xs_f, carries_f, keep_f, v_f, r_f)
    finals = tuple(
        type(cc)(*(leaf.reshape(batch_shape + leaf.shape[-1:]) for leaf in cc)) for cc in finals
    )
    return finals, ys.reshape((t, *batch_shape, ys.shape[-1]))


def _ineligible(stack, params, xs, reverse, kernel, checkpoint_every) -> str | None:
    """Why ``stack`` cannot run as a wavefront (None: it can)."""
    layers = stack.layers
    if len(layers) < 2:
        return "it needs at least 2 layers"
    if stack.residual:
        return "residual stacks run layer by layer"
    if reverse:
        return "reverse=True runs layer by layer"
    if checkpoint_every is not None:
        return "checkpoint_every runs layer by layer"
    if kernel == "scan":
        return "kernel='scan' runs layer by layer"
    rule = fused_rule(layers[0])
    if rule is None or any(fused_rule(layer) != rule for layer in layers[1:]):
        return (
            "the layers must be cells of one kind with a fused rule (all LSTM, all GRU, or all "
            f"RNN with one activation), got {[type(layer).__name__ for layer in layers]}"
        )
    if kernel == "auto" and under_forward_mode(params, xs):
        return "forward-mode autodiff (jax.jvp) runs layer by layer"
    if getattr(xs, "ndim", 0) < 2:
        return "xs is no [T, *B, D] array"
    return None


def stack_rollout(
    stack,
    params,
    xs,
    carry,
    *,
    lengths,
    reset,
    reverse,
    unroll,
    kernel,
    checkpoint_every,
    key,
    wavefront,
):
    """The wavefront path of :meth:`jaxseq.Stack.rollout` (time-major, checked params).

    Returns ``(carries, ys)``, or None when the stack runs layer by layer:
    ``wavefront=False``, or ``None`` (automatic) where the stack is not
    eligible or :func:`~jaxseq.recurrent.dispatch.wavefront_wins` says the
    layer-by-layer path is as fast. ``wavefront=True`` requires the wavefront
    (``ValueError`` naming why it cannot run). ``carry`` is a tuple of layer
    carries (None entries: zeros).

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> stack = js.Stack([js.GRU(3), js.GRU(3)])
    >>> params = stack.init(jax.random.key(0), 2)
    >>> kw = dict(lengths=None, reset=None, reverse=False, unroll=1, kernel="auto",
    ...           checkpoint_every=None, key=None)
    >>> carries, ys = stack_rollout(stack, params, jnp.ones((4, 2, 2)), (None, None),
    ...                             wavefront=True, **kw)
    >>> ys.shape, carries[1].h.shape
    ((4, 2, 3), (2, 3))
    """
    if wavefront is not None and not isinstance(wavefront, bool):
        raise TypeError(
            f"wavefront: expected None (automatic), True or False, got {type(wavefront).__name__}"
        )
    if wavefront is False:
        return None
    layers = stack.layers
    if wavefront is None:  # automatic: anything unusual is left to the layer-by-layer path
        if kernel not in KERNELS or _ineligible(
            stack, params, xs, reverse, kernel, checkpoint_every
        ):
            return None
        if not wavefront_wins(layers[0], len(layers), tuple(xs.shape[1:-1]), xs.shape[0]):
            return None
    else:
        _checks.check_choice("kernel", kernel, KERNELS)
        why = _ineligible(stack, params, xs, reverse, kernel, checkpoint_every)
        if why is not None:
            raise ValueError(f"wavefront: this stack cannot run as a wavefront: {why}")

    # The checks (and the zeroing of padded inputs) of the layer-by-layer path.
    xs, batch_shape, t, carry0, lengths, reset = _prepare(
        layers[0], params[0], xs, carry[0], lengths, reset
    )
    carries, x_dtype = [carry0], carry0[0].dtype
    for k in range(1, len(layers)):
        layer, p, c = layers[k], params[k], carry[k]
        layer.check_params(p)
        x_struct = jax.ShapeDtypeStruct((t, *batch_shape, layers[k - 1].hidden_size), x_dtype)
        layer.check_input(p, x_struct, name="xs", min_ndim=2)
        if c is None:
            c = layer.initial_carry(batch_shape)
        else:
            layer.check_carry(c, batch_shape)
        carries.append(c)
        x_dtype = c[0].dtype
    n_unroll = resolve_unroll(unroll, t, sum(step_work(layer, batch_shape) for layer in layers))
    keep, rate = None, float(stack.dropout_rate)
    if key is not None and rate > 0.0:
        # The masks dropout() draws between the layers, from the same keys.
        keys = jax.random.split(key, len(layers) - 1)
        steps = 1 if stack.variational_dropout else t
        keep = tuple(
            _keep_mask(keys[k], (steps, *batch_shape, layers[k].hidden_size), rate)
            for k in range(len(layers) - 1)
        )
    return wavefront_rollout(
        layers,
        params,
        xs,
        carries,
        keep=keep,
        rate=rate if keep is not None else 0.0,
        valid=None if lengths is None else valid_steps(lengths, t),
        reset=processing_resets(reset, lengths, False),
        unroll=n_unroll,
    )
