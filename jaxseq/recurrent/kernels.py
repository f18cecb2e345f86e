"""Fast recurrent kernels for the built-in cells (used by ``js.rollout``).

:func:`fused_rollout` runs a whole rollout of a cell with a registered fused
rule (:func:`~jaxseq.recurrent.dispatch.register_fused_rule`; the built-in
:class:`~jaxseq.RNN`, :class:`~jaxseq.LSTM` and :class:`~jaxseq.GRU`) as one
``jax.custom_vjp``. The pieces, one idea per module:

* :mod:`jaxseq.recurrent.dispatch`: which kernel runs (the registry, forward
  mode) and the ``unroll="auto"`` rule;
* :mod:`jaxseq.recurrent.rules`: each cell's gate math, forward and backward;
* ``jaxseq.recurrent._segments``: the forward and backward loops over a
  segment of steps (hoisted input projection, one fused ``h @ W_hh`` per step,
  weight gradients as one matmul each after the loop);
* ``jaxseq.recurrent._remat``: ``checkpoint_every=k``, rematerialised segments;
* this module: the ``custom_vjp`` that ties them together, and
  :func:`fused_rollout`, its entry point.

Properties of the kernel:

* **memory**: the LSTM keeps ONE ``[T, N, 4H]`` buffer through a training
  step: the forward writes the gate activations over the projection they came
  from, and the backward (rolled loop, ``unroll=1``) writes the gate
  cotangents over the activations. XLA:CPU hands a jitted call its
  temporaries as fresh memory on every call, and first-touching it costs
  about a millisecond per megabyte on a small VM, so memory not used is time
  saved.
* ``lengths`` (right padding), ``reset`` and ``reverse`` are handled inside
  the kernel with the exact semantics of :func:`jaxseq.rollout_unrolled`
  (padded steps pass the carry through and output zeros; resets zero the
  carry before a step); gradients equal plain autodiff of that reference.
* Numerics follow the cells: matmuls accumulate in float32 (float64 when an
  operand is float64, so float64 rollouts are float64 throughout), the gate
  math and all cotangents inside the kernel use that accumulation dtype;
  carries keep their dtype (rounded each step exactly as :meth:`cell.recur`
  does), cotangents are cast back to the dtype of the primal they belong to.
* A ``custom_vjp`` has no forward mode: ``kernel="auto"`` takes the scan path
  under ``jax.jvp`` (see :func:`~jaxseq.recurrent.dispatch.under_forward_mode`).

Shapes: ``T`` time, ``N`` the flattened batch (``prod(*B)``), ``D`` input,
``H`` hidden, ``G`` gates (RNN 1, LSTM 4, GRU 3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxseq._numerics import acc_dtype
from jaxseq.recurrent._remat import _ckpt_bwd, _ckpt_fwd
from jaxseq.recurrent._segments import _Cfg, _segment_backward, _segment_forward, _split_carry
from jaxseq.recurrent.dispatch import fused_rule

__all__ = [
    "fused_rollout",
]


def _fused_fwd(cfg: _Cfg, params, xs, carry, v, r):
    h0, c0 = _split_carry(cfg, carry)
    if not cfg.segment:
        (h, c), ys, res = _segment_forward(cfg, params, xs, h0, c0, v, r)
        return (h, c), ys, (params, xs, carry, v, r, ys, res)
    (h, c), ys, saved = _ckpt_fwd(cfg, params, xs, h0, c0, v, r)
    return (h, c), ys, (params, xs, carry, v, r, None, saved)


def _fused_bwd(cfg: _Cfg, saved, cts):
    params, xs, carry, v, r, ys, extra = saved
    (dh, dc), dys = cts
    h0, c0 = _split_carry(cfg, carry)
    dh = dh.astype(cfg.acc)
    dc = None if dc is None else dc.astype(cfg.acc)
    if not cfg.segment:
        dh0, dc0, dp, dxs = _segment_backward(cfg, params, xs, h0, c0, v, r, ys, extra, dys, dh, dc)
    else:
        dh0, dc0, dp, dxs = _ckpt_bwd(cfg, params, xs, v, r, extra, dys, dh, dc)
    dparams = type(params)(**{name: dp[name].astype(getattr(params, name).dtype) for name in dp})
    dcarry = [dh0.astype(h0.dtype)]
    if cfg.rule.cell_state:
        dcarry.append(dc0.astype(c0.dtype))
    return dparams, dxs.astype(xs.dtype), type(carry)(*dcarry), None, None


def _fused_primal(cfg: _Cfg, params, xs, carry, v, r):
    """Inference: the same scan, saving nothing for a backward, with its own unroll."""
    if cfg.primal_unroll:
        cfg = cfg._replace(unroll=cfg.primal_unroll)
    h0, c0 = _split_carry(cfg, carry)
    if cfg.segment:
        (h, c), ys, _ = _ckpt_fwd(cfg, params, xs, h0, c0, v, r)
    else:
        (h, c), ys, _ = _segment_forward(cfg, params, xs, h0, c0, v, r, save=False)
    return (type(carry)(h, c) if cfg.rule.cell_state else type(carry)(h)), ys


def _fused_fwd_rule(cfg, params, xs, carry, v, r):
    (h, c), ys, saved = _fused_fwd(cfg, params, xs, carry, v, r)
    new = type(carry)(h, c) if cfg.rule.cell_state else type(carry)(h)
    return (new, ys), saved


def _fused_bwd_rule(cfg, saved, cts):
    new_carry, dys = cts
    kind_lstm = cfg.rule.cell_state
    dh = new_carry.h
    dc = new_carry.c if kind_lstm else None
    return _fused_bwd(cfg, saved, ((dh, dc), dys))


_fused = jax.custom_vjp(_fused_primal, nondiff_argnums=(0,))
_fused.defvjp(_fused_fwd_rule, _fused_bwd_rule)


def fused_rollout(
    cell,
    params,
    xs,
    carry,
    *,
    valid=None,
    reset=None,
    reverse=False,
    unroll=1,
    checkpoint_every=None,
    inference_unroll=None,
):
    """Rollout of a built-in cell through the fused kernel: ``[T, *B, D] -> [T, *B, H]``.

    The kernel behind :func:`jaxseq.rollout`'s ``kernel="fused"``; arguments are
    validated there (call that instead unless you need the kernel itself).

    Args:
      cell: a cell whose exact type has a registered rule (``RNN``, ``LSTM``,
        ``GRU``; see :func:`~jaxseq.recurrent.dispatch.supports_fused`).
      params: its parameters.
      xs: ``[T, *B, D]``.
      carry: carry of batch ``*B`` (``RNNCarry``/``LSTMCarry``).
      valid: optional ``bool[T, *B]``: step ``t`` is inside the sequence
        (right padding, i.e. ``t < lengths``). The inputs at invalid steps still
        enter the projection and the weight gradients, so they must be finite
        (:func:`jaxseq.rollout` sets them to zero first).
      reset: optional ``bool[T, *B]`` in processing order: zero the carry
        before step ``t`` (see ``jaxseq.recurrent.rollouts.processing_resets``).
      reverse: process from ``T - 1`` down to 0.
      unroll: positive int, the ``lax.scan`` unroll of the time loops.
      inference_unroll: None (same as ``unroll``) or a positive int: the unroll of
        a call that is not differentiated (a forward-only call saves nothing for a
        backward, and its best unroll differs; see
        :func:`~jaxseq.recurrent.dispatch.auto_unroll`).
      checkpoint_every: None, or a positive int ``k``: rematerialise the
        forward in segments of ``k`` steps during the backward.

    Returns:
      ``(final_carry, ys)`` with ``ys: [T, *B, H]``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.LSTM(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> xs = jnp.ones((5, 2, 3))
    >>> carry, ys = fused_rollout(cell, params, xs, cell.initial_carry((2,)))
    >>> ys.shape, carry.c.shape
    ((5, 2, 4), (2, 4))
    """
    t = xs.shape[0]
    batch_shape = tuple(xs.shape[1:-1])
    n = math.prod(batch_shape)
    hsz = cell.hidden_size
    seg = 0 if checkpoint_every is None or checkpoint_every >= t else int(checkpoint_every)
    acc = acc_dtype(*jax.tree_util.tree_leaves((params, xs, carry)))
    rule = fused_rule(cell)
    if rule is None:
        raise ValueError(
            f"cell: expected a cell whose exact type has a registered fused rule (RNN, LSTM, GRU), "
            f"got {type(cell).__name__}"
        )
    primal = 0 if inference_unroll is None else max(1, min(int(inference_unroll), t))
    cfg = _Cfg(rule, hsz, bool(reverse), int(unroll), seg, jnp.dtype(acc), primal)

    if t == 0:
        return carry, jnp.zeros((0, *batch_shape, hsz), carry.h.dtype)

    def flat(a, tail):
        return None if a is None else a.reshape((n,) + tail)

    xs_f = xs.reshape((t, n, xs.shape[-1]))
    carry_f = type(carry)(*(flat(leaf, (hsz,)) for leaf in carry))
    v_f = None if valid is None else valid.reshape((t, n))
    r_f = None if reset is None else reset.reshape((t, n))
    carry_o, ys = _fused(cfg, params, xs_f, carry_f, v_f, r_f)
    carry_o = type(carry)(*(leaf.reshape(batch_shape + (hsz,)) for leaf in carry_o))
    return carry_o, ys.reshape((t, *batch_shape, hsz))
