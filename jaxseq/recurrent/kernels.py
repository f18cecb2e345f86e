"""The two kernels of a cell rollout, each following the
:class:`~jaxseq.recurrent.dispatch.Plan` it is handed and trusting the validated
:class:`~jaxseq.recurrent.Sequence` it runs over:

* :func:`scan_rollout`: any cell, its step (or ``recur`` after one hoisted
  ``project``) in a ``lax.scan`` with ordinary autodiff;
* :func:`fused_rollout`: a cell with a registered fused rule
  (:func:`~jaxseq.recurrent.dispatch.register_fused_rule`; the built-in
  :class:`~jaxseq.RNN`, :class:`~jaxseq.LSTM`, :class:`~jaxseq.GRU` and
  :class:`~jaxseq.recurrent.SLSTM`) as one ``jax.custom_vjp`` with one forward
  and one backward rule.

The pieces of the fused kernel, one idea per module:

* :mod:`jaxseq.recurrent.dispatch`: which kernel runs (the registry, forward
  mode), the ``unroll="auto"`` rule, the plan;
* :mod:`jaxseq.recurrent.rules`: each cell's gate math, forward and backward;
* ``jaxseq.recurrent._segments``: the forward and backward loops over a
  segment of steps (hoisted input projection, one fused ``h @ W_hh`` per step,
  weight gradients as one matmul each after the loop);
* ``jaxseq.recurrent._remat``: ``checkpoint_every=k``, rematerialised segments;
* this module: the ``custom_vjp`` that ties them together.

Properties of the kernel:

* **memory**: the LSTM keeps ONE ``[T, N, 4H]`` buffer through a training
  step: the forward writes the gate activations over the projection they came
  from, and the backward (rolled loop, ``unroll=1``) writes the gate
  cotangents over the activations. XLA:CPU hands a jitted call its
  temporaries as fresh memory on every call, and first-touching memory has a
  cost, so memory not used is time saved (``benchmarks/README.md``).
* padding (``Sequence.valid``), ``reset`` and ``reverse`` are handled inside
  the kernel with the exact semantics of :func:`jaxseq.rollout_unrolled`
  (padded steps pass the carry through and output zeros; resets zero the
  carry before a step; a sequence without padding does no padded-step work);
  gradients equal plain autodiff of that reference.
* Numerics follow the cells: matmuls accumulate in float32 (float64 when an
  operand is float64, so float64 rollouts are float64 throughout), the gate
  math and all cotangents inside the kernel use that accumulation dtype;
  carries keep their dtype (rounded each step exactly as :meth:`cell.recur`
  does), cotangents are cast back to the dtype of the primal they belong to.
* A ``custom_vjp`` has no forward mode: ``kernel="auto"`` takes the scan path
  under ``jax.jvp`` (see :func:`~jaxseq.recurrent.dispatch.under_forward_mode`).

Shapes: ``T`` time, ``N`` the flattened batch (``prod(*B)``), ``D`` input,
``H`` hidden, ``G`` gates (RNN 1, LSTM 4, GRU 3, sLSTM 4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxseq.recurrent._remat import _ckpt_bwd, _ckpt_fwd
from jaxseq.recurrent._segments import _segment_backward, _segment_forward
from jaxseq.recurrent.dispatch import Plan
from jaxseq.recurrent.sequence import Sequence, processing_resets

__all__ = [
    "fused_rollout",
    "scan_rollout",
]


def _expand(mask, leaf):
    """``mask: [*B]`` -> broadcastable against ``leaf: [*B, H]``."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def _select(mask, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(_expand(mask, n), n, o), new, old)


def step_fn(cell, params, zero_carry, hoisted: bool):
    """One step with resets and padding: ``(carry, (x_t, valid_t, reset_t)) -> (carry, y)``.

    A reset (``reset_t``) sets the carry to ``zero_carry`` before the step; a padded
    step (``valid_t`` False) keeps the carry it came with and outputs zeros. ``None``
    for either flag: no such work in the step.
    """
    step = cell.recur if hoisted else cell.step

    def body(carry, inp):
        x_t, v_t, r_t = inp
        prev = carry
        if r_t is not None:
            carry = _select(r_t, zero_carry, carry)
        new, y = step(params, carry, x_t)
        if v_t is not None:
            new = _select(v_t, new, prev)
            y = jnp.where(_expand(v_t, y), y, jnp.zeros_like(y))
        return new, y

    return body


def _pad_steps(a, pad, fill):
    return (
        None if a is None else jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)], 0)
    )


def scan_rollout(cell, params, seq: Sequence, carry, plan: Plan):
    """Rollout of any cell by ``lax.scan``: ``[T, *B, D] -> (carry, [T, *B, H])``.

    With ``plan.segment = k`` the scan runs in segments of ``k`` steps under
    ``jax.checkpoint`` (``T`` padded to whole segments with steps that count as padding).

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent import dispatch, kernels
    >>> cell = js.GRU(4)
    >>> params, seq = cell.init(jax.random.key(0), 3), js.recurrent.prepare(cell, None, jnp.ones((5, 2, 3)))
    >>> opts = js.recurrent.RolloutOptions(kernel="scan")
    >>> plan = dispatch.plan(cell, params, seq, None, opts)
    >>> carry, ys = kernels.scan_rollout(cell, params, seq, cell.initial_carry((2,)), plan)
    >>> ys.shape
    (5, 2, 4)
    """
    t, k = seq.t, plan.segment
    inputs = cell.project(params, seq.xs) if plan.hoisted else seq.xs
    valid, reset = seq.valid, processing_resets(seq.reset, seq.valid, plan.reverse)
    body = step_fn(cell, params, jax.tree_util.tree_map(jnp.zeros_like, carry), plan.hoisted)

    def run(c, steps):
        n = steps[0].shape[0]
        return jax.lax.scan(
            body, c, steps, reverse=plan.reverse, unroll=min(plan.unroll, max(n, 1))
        )

    if not k:
        return run(carry, (inputs, valid, reset))
    pad = -(-t // k) * k - t
    if pad:
        valid = jnp.ones((t, *seq.batch_shape), bool) if valid is None else valid
        inputs, valid, reset = (
            _pad_steps(inputs, pad, 0),
            _pad_steps(valid, pad, False),
            _pad_steps(reset, pad, False),
        )

    def segments(a):
        return None if a is None else a.reshape((-1, k) + a.shape[1:])

    carry, ys = jax.lax.scan(
        jax.checkpoint(run),
        carry,
        tuple(map(segments, (inputs, valid, reset))),
        reverse=plan.reverse,
    )
    return carry, ys.reshape((-1,) + ys.shape[2:])[:t]


def _primal(plan: Plan, params, xs, hc, v, r):
    """A forward-only call: the same loops, saving nothing, with their own unroll."""
    plan = plan._replace(unroll=plan.inference_unroll)
    h0, c0 = hc
    if plan.segment:
        hc, ys, _ = _ckpt_fwd(plan, params, xs, h0, c0, v, r)
    else:
        hc, ys, _ = _segment_forward(plan, params, xs, h0, c0, v, r, save=False)
    return hc, ys


def _forward(plan: Plan, params, xs, hc, v, r):
    h0, c0 = hc
    if plan.segment:
        hc_new, ys, saved = _ckpt_fwd(plan, params, xs, h0, c0, v, r)
        return (hc_new, ys), (params, xs, hc, v, r, None, saved)
    hc_new, ys, res = _segment_forward(plan, params, xs, h0, c0, v, r)
    return (hc_new, ys), (params, xs, hc, v, r, ys, res)


def _backward(plan: Plan, saved, cts):
    params, xs, (h0, c0), v, r, ys, res = saved
    (dh, dc), dys = cts
    dh = dh.astype(plan.acc)
    dc = jax.tree_util.tree_map(lambda a: a.astype(plan.acc), dc)
    if plan.segment:
        dh0, dc0, dp, dxs = _ckpt_bwd(plan, params, xs, v, r, res, dys, dh, dc)
    else:
        dh0, dc0, dp, dxs = _segment_backward(plan, params, xs, h0, c0, v, r, ys, res, dys, dh, dc)
    dparams = type(params)(**{name: dp[name].astype(getattr(params, name).dtype) for name in dp})
    dc0 = jax.tree_util.tree_map(lambda a, a0: a.astype(a0.dtype), dc0, c0)
    return dparams, dxs.astype(xs.dtype), (dh0.astype(h0.dtype), dc0), None, None


_fused = jax.custom_vjp(_primal, nondiff_argnums=(0,))
_fused.defvjp(_forward, _backward)


def fused_rollout(cell, params, seq: Sequence, carry, plan: Plan):
    """Rollout of a built-in cell through the fused kernel: ``[T, *B, D] -> [T, *B, H]``.

    ``plan`` comes from :func:`~jaxseq.recurrent.dispatch.plan` (its ``rule`` set);
    ``seq`` from :func:`~jaxseq.recurrent.prepare`. :func:`jaxseq.rollout` calls
    this (use that unless you need the kernel itself).

    Returns:
      ``(final_carry, ys)`` with ``ys: [T, *B, H]``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent import dispatch, kernels
    >>> cell = js.LSTM(4)
    >>> params, seq = cell.init(jax.random.key(0), 3), js.recurrent.prepare(cell, None, jnp.ones((5, 2, 3)))
    >>> plan = dispatch.plan(cell, params, seq, None, js.recurrent.RolloutOptions())
    >>> carry, ys = kernels.fused_rollout(cell, params, seq, cell.initial_carry((2,)), plan)
    >>> ys.shape, carry.c.shape
    ((5, 2, 4), (2, 4))
    """
    t, batch_shape, hsz = seq.t, seq.batch_shape, plan.hidden
    if t == 0:
        return carry, jnp.zeros((0, *batch_shape, hsz), carry.h.dtype)
    n = math.prod(batch_shape)

    def flat(a, tail):
        return None if a is None else a.reshape((n, *tail))

    reset = processing_resets(seq.reset, seq.valid, plan.reverse)
    # The carry beyond h: None, the LSTM's c, or a tuple (the sLSTM's c, n, m).
    states = tuple(flat(leaf, (hsz,)) for leaf in carry[1:]) if plan.rule.cell_state else ()
    hc = (flat(carry.h, (hsz,)), states[0] if len(states) == 1 else (states or None))
    xs = seq.xs.reshape((t, n, seq.xs.shape[-1]))
    v = None if seq.valid is None else seq.valid.reshape((t, n))
    r = None if reset is None else reset.reshape((t, n))
    (h, c), ys = _fused(plan, params, xs, hc, v, r)
    new = (h, *jax.tree_util.tree_leaves(c))
    new = type(carry)(*(leaf.reshape((*batch_shape, hsz)) for leaf in new))
    return new, ys.reshape((t, *batch_shape, hsz))
