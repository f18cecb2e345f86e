"""Rematerialisation (``checkpoint_every=k``) for the fused kernel.

The forward keeps only the carry at the start of every ``k``-step segment (and
the outputs); the backward recomputes each segment's forward, including its
input projection, right before running its backward, and accumulates the
weight gradients segment by segment (each still one matmul per segment).
Activation memory drops from ``O(T * N * G * H)`` to
``O(T * N * (D + H) + k * N * G * H)`` for about one extra forward pass of
compute. ``T`` need not be a multiple of ``k``: ``T // k`` full segments run in
an outer ``lax.scan``, the last ``T % k`` steps as one shorter segment.

Shapes: ``T`` time, ``N`` rows, ``D`` input, ``H`` hidden, ``G`` gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq.recurrent._segments import Plan, _segment_backward, _segment_forward


def _plan(cfg, t):
    """Segments of a checkpointed rollout: ``S`` full ones of ``k`` steps, then ``[m, T)``."""
    k = cfg.segment
    n_full = t // k
    return k, n_full, n_full * k


def _segment(a, s, k):
    """Segment ``s`` (``k`` steps) of ``a: [T, ...]``, sliced inside the loop so the
    full-segment prefix of ``a`` is never copied out (``None`` stays ``None``)."""
    return None if a is None else jax.lax.dynamic_slice_in_dim(a, s * k, k, axis=0)


def _tail(a, m):
    return None if a is None else a[m:]


def _ckpt_fwd(cfg: Plan, params, xs, h0, c0, v, r):
    """Forward keeping only the carry at each segment start (and the outputs).

    An outer ``lax.scan`` over the segments slices its inputs and writes each
    segment's outputs into one ``[T, N, H]`` buffer it carries (updated in
    place: the write is the buffer's only reader in the loop), so the outputs
    occupy their own size once, with no stacked copy to concatenate with the
    last, shorter segment.
    """
    t = xs.shape[0]
    k, n_full, m = _plan(cfg, t)
    hsz = cfg.hidden

    def outer(carry, s):
        hc, buf = carry
        x_k, v_k, r_k = (_segment(a, s, k) for a in (xs, v, r))
        new, ys_k, _ = _segment_forward(cfg, params, x_k, *hc, v_k, r_k, save=False)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, ys_k, s * k, axis=0)
        return (new, buf), hc

    def full_segments(hc, buf):
        (hc, buf), starts = jax.lax.scan(outer, (hc, buf), jnp.arange(n_full), reverse=cfg.reverse)
        return hc, buf, starts

    def tail(hc, buf):
        if m == t:
            return hc, buf, None
        new, ys_r, _ = _segment_forward(
            cfg, params, xs[m:], *hc, _tail(v, m), _tail(r, m), save=False
        )
        return new, jax.lax.dynamic_update_slice_in_dim(buf, ys_r, m, axis=0), hc

    hc = (h0, c0)
    buf = jnp.zeros((t, xs.shape[1], hsz), h0.dtype)
    if cfg.reverse:
        hc, buf, tail_start = tail(hc, buf)
        hc, buf, starts = full_segments(hc, buf)
    else:
        hc, buf, starts = full_segments(hc, buf)
        hc, buf, tail_start = tail(hc, buf)
    return hc, buf, (starts, tail_start)


def _ckpt_bwd(cfg: Plan, params, xs, v, r, saved, dys, dh, dc):
    """Backward segment by segment, recomputing each segment's forward first.

    The outputs are recomputed with the rest of the segment rather than saved:
    the loss's cotangent ``dys`` can then take the outputs' memory.
    """
    t = xs.shape[0]
    k, n_full, m = _plan(cfg, t)
    starts, tail_start = saved
    acc = {name: jnp.zeros(getattr(params, name).shape, cfg.acc) for name in params._fields}

    def one(state, x_k, v_k, r_k, dys_k, hs, cs):
        dh, dc, acc = state
        _, ys_k, res_k = _segment_forward(cfg, params, x_k, hs, cs, v_k, r_k)
        dh, dc, dp, dx_k = _segment_backward(
            cfg, params, x_k, hs, cs, v_k, r_k, ys_k, res_k, dys_k, dh, dc
        )
        acc = {name: acc[name] + dp[name] for name in acc}
        return (dh, dc, acc), dx_k

    def full_segments(state, dx):
        def outer(carry, inp):
            state, dx = carry
            s, (hs, cs) = inp
            state, dx_k = one(state, *(_segment(a, s, k) for a in (xs, v, r, dys)), hs, cs)
            return (state, jax.lax.dynamic_update_slice_in_dim(dx, dx_k, s * k, axis=0)), None

        (state, dx), _ = jax.lax.scan(
            outer, (state, dx), (jnp.arange(n_full), starts), reverse=not cfg.reverse
        )
        return state, dx

    def tail(state, dx):
        if m == t:
            return state, dx
        seq = (xs[m:], _tail(v, m), _tail(r, m), dys[m:])
        state, dx_r = one(state, *seq, *tail_start)
        return state, jax.lax.dynamic_update_slice_in_dim(dx, dx_r, m, axis=0)

    # The input cotangents go into one [T, N, D] buffer (as the outputs in _ckpt_fwd).
    state, dx = (dh, dc, acc), jnp.zeros(xs.shape, cfg.acc)
    if cfg.reverse:
        state, dx = full_segments(state, dx)
        state, dx = tail(state, dx)
    else:
        state, dx = tail(state, dx)
        state, dx = full_segments(state, dx)
    return (*state, dx)
