"""Fast recurrent kernels for the built-in cells (used by ``js.rollout``).

:func:`fused_rollout` runs a whole rollout of an :class:`~jaxseq.RNN`,
:class:`~jaxseq.LSTM` or :class:`~jaxseq.GRU` as one ``jax.custom_vjp``:

* **forward**: the input projection is hoisted out of the loop (one
  ``[T*N, D] x [D, G*H]`` matmul; the bias is added inside the step, where it
  fuses into the gate math), then a ``lax.scan`` runs one fused ``h @ W_hh``
  for all gates per step plus the gate math, saving only what the backward
  needs (LSTM: the four gate activations and the cell state; GRU: ``r, z, n``
  and ``h W_hn + b_hn``; RNN: nothing beyond the outputs themselves). The gate
  nonlinearities are computed over whole rows (LSTM: one ``tanh`` over all
  ``4H`` columns, see :func:`_lstm_gates`), never over column slices, which
  XLA:CPU runs several times slower inside a loop step.
* **backward**: a reverse ``lax.scan`` that carries only ``dh`` (and ``dc``)
  and per step computes the gate cotangents ``dG_t`` and
  ``dh_{t-1} = dG_t W_hh^T``. The weight gradients are formed after the loop,
  each as ONE large matmul or reduction over all steps:
  ``dW_hh = sum_t h_{t-1}^T dG_t``, ``dW_ih = X^T dG``, ``db = sum dG``,
  ``dX = dG W_ih^T``.
* **memory**: the LSTM keeps ONE ``[T, N, 4H]`` buffer through a training
  step: the forward writes the gate activations over the projection they came
  from, and the backward (rolled loop, ``unroll=1``) writes the gate
  cotangents over the activations. XLA:CPU hands a jitted call its
  temporaries as fresh memory on every call, and first-touching it costs
  about a millisecond per megabyte on a small VM, so memory not used is time
  saved: the training step at ``(B, H, T) = (32, 256, 100)`` went from 46 to
  20 MB of temporaries and from ~11k page faults per call to none.
* ``lengths`` (right padding), ``reset`` and ``reverse`` are handled inside
  the kernel with the exact semantics of :func:`jaxseq.rollout_unrolled`
  (padded steps pass the carry through and output zeros; resets zero the
  carry before a step); gradients equal plain autodiff of that reference.
* ``checkpoint_every=k`` (rematerialisation): the forward keeps only the carry
  at the start of every ``k``-step segment (and the outputs); the backward
  recomputes each segment's forward, including its input projection, right
  before running its backward, and accumulates the weight gradients segment by
  segment (each still one matmul per segment). Activation memory drops from
  ``O(T * N * G * H)`` to ``O(T * N * (D + H) + k * N * G * H)`` for about one
  extra forward pass of compute. ``T`` need not be a multiple of ``k`` (the
  last segment is padded with masked steps).

Shapes: ``T`` time, ``N`` the flattened batch (``prod(*B)``), ``D`` input,
``H`` hidden, ``G`` gates (RNN 1, LSTM 4, GRU 3).

Numerics follow the cells: matmuls accumulate in float32 (float64 when an
operand is float64, so float64 rollouts, which take this kernel under
``kernel="auto"`` like any other dtype, are float64 throughout), the gate math
and all cotangents inside the kernel use that accumulation dtype; carries keep
their dtype
(rounded each step exactly as :meth:`cell.recur` does), cotangents are cast
back to the dtype of the primal they belong to.

**When the fused kernel is used** (``kernel="auto"``, the default of
:func:`jaxseq.rollout`): for cells whose type is exactly ``RNN``, ``LSTM`` or
``GRU``, unless the rollout is being traced for forward-mode autodiff
(``jax.jvp``/``jax.jacfwd``/``jax.hessian``, detected from the inputs'
tracers), which a ``custom_vjp`` cannot support: then, and for every other
cell (subclasses and user cells included), the plain ``lax.scan`` path with
ordinary autodiff runs. One case cannot be detected: ``jax.jvp`` of an
already-``jit``-ed function whose rollout uses the fused kernel; pass
``kernel="scan"`` there.

**The ``unroll="auto"`` rule** (:func:`auto_unroll`): on CPU each scan
iteration costs a fixed few microseconds of loop bookkeeping on top of its
work, so unrolling pays only when the per-step work is tiny, while compile
time grows with the factor. Measured on a 2-core x86 CPU, float32 training
steps: LSTM ``(B, H, T) = (1, 128, 1000)``: unroll 2-4 is 1.03-1.4x faster
than 1 (the gain shrank when the gate math got cheaper); RNN, LSTM and GRU at
``(16, 128)``, ``(32, 128)``, ``(32, 256)``, ``(64, 256)`` and ``(8, 512)``, T=100:
unroll 1 is fastest or within noise, except the LSTM at ``(32, 256)`` where 2-4
was 2-14% faster from run to run (not enough to set a rule on). The rule therefore uses the per-step
recurrent work ``N * H * G * H`` multiply-adds: ``< 2**18`` -> unroll 4,
otherwise 1; on GPU/TPU (where unrolling lets XLA fuse across steps) a flat
4. The factor never exceeds ``T``, and compile time stays independent of
``T``. Re-measure on other hardware with
``python -m benchmarks.scan_vs_unrolled`` and
``python -m benchmarks.kernels --only unroll``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq._numerics import acc_dtype, add_bias, matmul_f32
from jaxseq.recurrent.cells import GRU, LSTM, RNN

__all__ = [
    "KERNELS",
    "auto_unroll",
    "fused_rollout",
    "step_work",
    "supports_fused",
    "under_forward_mode",
]


KERNELS = ("auto", "fused", "scan")


def supports_fused(cell) -> bool:
    """Whether ``cell`` has a fused kernel (its type is exactly RNN, LSTM or GRU)."""
    return type(cell) in (RNN, LSTM, GRU)


def _forward_mode_tracer(x) -> bool:
    from jax._src.interpreters import ad, batching

    seen = 0
    while isinstance(x, jax.core.Tracer) and seen < 64:
        seen += 1
        if isinstance(x, ad.JVPTracer):
            return True
        if isinstance(x, ad.LinearizeTracer):
            x = x.primal
        elif isinstance(x, batching.BatchTracer):
            x = x.val
        else:
            return False
    return False


def under_forward_mode(*trees) -> bool:
    """True when any leaf of ``trees`` is being traced for forward-mode autodiff."""
    try:
        return any(_forward_mode_tracer(x) for x in jax.tree_util.tree_leaves(trees))
    except (ImportError, AttributeError):  # internal layout changed: be conservative
        return False


def auto_unroll(t: int, work: int | None = None, backend: str | None = None) -> int:
    """Unroll factor for ``unroll="auto"``.

    Args:
      t: sequence length (the factor never exceeds it).
      work: multiply-adds of one step's recurrent matmul, ``N * H * G * H``
        (None: unknown, treated as small).
      backend: ``jax.default_backend()`` when None.

    See the module docstring for how the thresholds were measured.
    """
    t = max(int(t), 1)
    backend = backend or jax.default_backend()
    if backend != "cpu":
        u = 4
    elif work is None or work < 2**18:
        u = 4
    else:
        u = 1
    return max(1, min(u, t))


class _Cfg(NamedTuple):
    kind: str  # "tanh" | "relu" | "lstm" | "gru"
    hidden: int
    reverse: bool
    unroll: int
    segment: int  # 0: no rematerialisation, else checkpoint_every
    acc: object  # accumulation dtype: float32, or float64 when an operand is float64


def _kind(cell) -> str:
    if isinstance(cell, LSTM):
        return "lstm"
    if isinstance(cell, GRU):
        return "gru"
    return cell.activation


def _dot_t(dz, w):
    """``dz @ w.T`` accumulated in ``dz``'s dtype: ``[..., O] x [I, O] -> [..., I]``."""
    return jax.lax.dot_general(
        dz, w, (((dz.ndim - 1,), (1,)), ((), ())), preferred_element_type=dz.dtype
    )


# Rows * hidden from which the LSTM backward step uses the whole-row form. Measured
# (training step, same process): N=1, H=128 slices 22 vs whole-row 27 ms; N=2, H=128
# level; N=1, H=512 level; N=4, H=128 34 vs 30 ms; N=32, H=256 145 vs 134 ms.
_WHOLE_ROW_MIN = 512


def _lstm_gates(z, hsz):
    """LSTM gate activations ``[sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)]`` of ``z: [N, 4H]``.

    Computed as ONE ``tanh`` over the whole contiguous ``z`` with
    ``sigmoid(x) = (1 + tanh(x / 2)) / 2``: ``a = s * tanh(s * z) + (1 - s)``,
    ``s = 1/2`` on the sigmoid columns and 1 on the ``g`` columns. Inside a scan
    step XLA:CPU runs transcendentals of column slices of ``z`` several times
    slower than one over the whole row (``python -m benchmarks.kernels --only
    gates``). The result equals the sigmoid to within float32 rounding in
    absolute terms (a few ``1e-8``); for very negative inputs, where the exact
    sigmoid is below that, it may round to 0.
    """
    col = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    s = jnp.where((col >= 2 * hsz) & (col < 3 * hsz), 1.0, 0.5).astype(z.dtype)
    return s * jnp.tanh(s * z) + (1.0 - s)


def _cell_forward(cfg: _Cfg, params, h, c, xp_t, save: bool = True):
    """One step from the (already reset) carry; returns ``(h_new, c_new, residual)``.

    With ``save=False`` (inference, or the forward of a checkpointed rollout)
    nothing is kept for the backward.
    """
    hsz = cfg.hidden
    if cfg.kind == "lstm":
        a = _lstm_gates(xp_t + matmul_f32(h, params.w_hh), hsz)
        c32 = a[:, hsz : 2 * hsz] * c.astype(cfg.acc) + a[:, :hsz] * a[:, 2 * hsz : 3 * hsz]
        h32 = a[:, 3 * hsz :] * jnp.tanh(c32)
        return h32.astype(h.dtype), c32.astype(c.dtype), ((a, c32) if save else ())
    if cfg.kind == "gru":
        # Whole-row transcendentals (see _lstm_gates): r and z come from one tanh
        # over all 3H columns of xp + hp, n from one tanh over all 3H columns of
        # xp + r * (hp + b_hn) tiled three times (only its last H columns are used).
        hp = matmul_f32(h, params.w_hh)
        rz = 0.5 * jnp.tanh(0.5 * (xp_t + hp)) + 0.5
        r, zg = rz[:, :hsz], rz[:, hsz : 2 * hsz]
        hn3 = add_bias(hp, jnp.concatenate([params.b_hn] * 3))
        n = jnp.tanh(xp_t + jnp.concatenate([r, r, r], axis=-1) * hn3)[:, 2 * hsz :]
        hn = hn3[:, 2 * hsz :]
        rz = rz[:, : 2 * hsz]
        h32 = (1.0 - zg) * n + zg * h.astype(cfg.acc)
        if not save:
            return h32.astype(h.dtype), None, ()
        return h32.astype(h.dtype), None, (rz, n, hn)
    z = xp_t + matmul_f32(h, params.w_hh)
    h32 = jnp.tanh(z) if cfg.kind == "tanh" else jax.nn.relu(z)
    res = () if h.dtype == cfg.acc or not save else (h32,)
    return h32.astype(h.dtype), None, res


def _cell_backward(cfg: _Cfg, params, res, y_t, h_in, c_in, gh, gc):
    """Gate cotangents of one step given the cotangents ``gh``/``gc`` of its new carry.

    Returns ``(dxp_t, dh_in, dc_in)``: ``dxp_t`` is the cotangent of the step's
    pre-activations (for GRU the input-side one; see :func:`_recurrent_cotangent`).
    """
    hsz = cfg.hidden
    if cfg.kind == "lstm":
        a, c32 = res
        i, f, g, o = (a[:, k * hsz : (k + 1) * hsz] for k in range(4))
        tc = jnp.tanh(c32)
        dc = gc + gh * o * (1.0 - tc * tc)
        if gh.shape[0] * hsz >= _WHOLE_ROW_MIN:
            # Whole-row form (see _lstm_gates): the activation derivative is
            # a(1 - a) on the sigmoid columns and 1 - a^2 on the g columns.
            col = jax.lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 1)
            da = jnp.where((col >= 2 * hsz) & (col < 3 * hsz), 1.0, a) - a * a
            outer = jnp.concatenate([dc, dc, dc, gh], axis=-1)
            inner = jnp.concatenate([g, c_in, i, tc], axis=-1)
            dz = outer * inner * da
        else:  # tiny steps: fewer ops per step beat vector-friendly ones
            dz = jnp.concatenate(
                [
                    dc * g * i * (1.0 - i),
                    dc * c_in * f * (1.0 - f),
                    dc * i * (1.0 - g * g),
                    gh * tc * o * (1.0 - o),
                ],
                axis=-1,
            )
        return dz, _dot_t(dz, params.w_hh), dc * f
    if cfg.kind == "gru":
        rz, n, hn = res
        r, zg = rz[:, :hsz], rz[:, hsz:]
        dpn = gh * (1.0 - zg) * (1.0 - n * n)
        dpr = dpn * hn * r * (1.0 - r)
        dpz = gh * (h_in - n) * zg * (1.0 - zg)
        dhp = jnp.concatenate([dpr, dpz, dpn * r], axis=-1)
        dxp = jnp.concatenate([dpr, dpz, dpn], axis=-1)
        return dxp, _dot_t(dhp, params.w_hh) + gh * zg, None
    h32 = res[0] if res else y_t.astype(cfg.acc)
    dz = gh * (1.0 - h32 * h32) if cfg.kind == "tanh" else jnp.where(h32 > 0, gh, 0.0)
    return dz, _dot_t(dz, params.w_hh), None


def _recurrent_cotangent(cfg: _Cfg, dxp, res):
    """Cotangent of ``h_{t-1} W_hh`` for all steps (GRU: the n block is scaled by r)."""
    if cfg.kind != "gru":
        return dxp
    hsz = cfg.hidden
    r = res[0][..., :hsz].reshape(dxp.shape[0], hsz)
    return jnp.concatenate([dxp[..., : 2 * hsz], dxp[..., 2 * hsz :] * r], axis=-1)


def _mask(m, x):
    return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def _segment_forward(cfg: _Cfg, params, xs, h0, c0, v, r, save: bool = True):
    """Runs the segment; returns ``((h, c), ys, residuals)``. ``xs: [S, N, D]``."""
    # The bias is added inside the step (where it fuses into the gate math for
    # free) rather than to the whole [S, N, G*H] projection (one more pass over it).
    xp = matmul_f32(xs, params.w_ih)

    def step(h, c, xp_t, v_t, r_t):
        xp_t = add_bias(xp_t, params.b)
        hi, ci = h, c
        if r_t is not None:
            hi = jnp.where(_mask(r_t, h), jnp.zeros_like(h), h)
            if c is not None:
                ci = jnp.where(_mask(r_t, c), jnp.zeros_like(c), c)
        hn, cn, res = _cell_forward(cfg, params, hi, ci, xp_t, save)
        y = hn
        if v_t is not None:
            y = jnp.where(_mask(v_t, hn), hn, jnp.zeros_like(hn))
            hn = jnp.where(_mask(v_t, hn), hn, h)
            if c is not None:
                cn = jnp.where(_mask(v_t, cn), cn, c)
        return hn, cn, y, res

    steps = xs.shape[0]
    unroll = max(1, min(cfg.unroll, steps))
    if cfg.kind == "lstm" and save:
        # The gate activations overwrite the projection they came from, step by
        # step, in the one [S, N, 4H] buffer carried through the loop: the
        # training step holds one such buffer instead of two (its temporaries
        # are first-touched memory on every call on CPU, see _segment_backward).
        def body_inplace(carry, inp):
            h, c, buf = carry
            t, v_t, r_t = inp
            xp_t = jax.lax.dynamic_index_in_dim(buf, t, 0, keepdims=False)
            hn, cn, y, (a, c32) = step(h, c, xp_t, v_t, r_t)
            buf = jax.lax.dynamic_update_index_in_dim(buf, a, t, 0)
            return (hn, cn, buf), (y, c32)

        (h, c, acts), (ys, cs) = jax.lax.scan(
            body_inplace,
            (h0, c0, xp),
            (jnp.arange(steps, dtype=jnp.int32), v, r),
            reverse=cfg.reverse,
            unroll=unroll,
        )
        return (h, c), ys, (acts, cs)

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


def _segment_backward(cfg: _Cfg, params, xs, h0, c0, v, r, ys, res, dys, dh, dc):
    """Backward of one segment; returns ``(dh0, dc0, dparams, dxs)``."""
    h_in = _carry_in(ys, h0, v, r, cfg.reverse)
    # In place (see below) only for a rolled loop: in an unrolled body XLA
    # copies the buffer between the unrolled steps (the buffers are small there).
    in_place = cfg.kind == "lstm" and cfg.unroll == 1
    c_in = None
    if cfg.kind == "lstm" and not in_place:
        c_in = _carry_in(res[1].astype(c0.dtype), c0, v, r, cfg.reverse).astype(cfg.acc)
    h_in_loop = h_in.astype(cfg.acc) if cfg.kind == "gru" else None

    def body(carry, inp):
        gh_c, gc_c = carry
        res_t, y_t, hin_t, cin_t, dy_t, v_t, r_t = inp
        gh = gh_c + dy_t.astype(cfg.acc)
        gc = gc_c
        if v_t is not None:
            vm = _mask(v_t, gh)
            gh = jnp.where(vm, gh, 0.0)
            if gc is not None:
                gc = jnp.where(vm, gc, 0.0)
        dxp, dh_in, dc_in = _cell_backward(cfg, params, res_t, y_t, hin_t, cin_t, gh, gc)
        if r_t is not None:
            rm = _mask(r_t, dh_in)
            dh_in = jnp.where(rm, 0.0, dh_in)
            if dc_in is not None:
                dc_in = jnp.where(rm, 0.0, dc_in)
        if v_t is not None:
            dh_in = jnp.where(vm, dh_in, gh_c)
            if dc_in is not None:
                dc_in = jnp.where(vm, dc_in, gc_c)
        dh_in = dh_in.astype(h0.dtype).astype(cfg.acc)
        if dc_in is not None:
            dc_in = dc_in.astype(c0.dtype).astype(cfg.acc)
        return (dh_in, dc_in), dxp

    steps = xs.shape[0]
    unroll = max(1, min(cfg.unroll, steps))
    init = (dh.astype(cfg.acc), None if dc is None else dc.astype(cfg.acc))
    if in_place:
        # The gate cotangents overwrite the activations they came from, step by
        # step, in the residual's [S, N, 4H] buffer carried through the loop, and
        # the carry each step started from is read from the saved cell states
        # by index: no second [S, N, 4H] buffer (nor its zero fill) and no
        # shifted copy of the cell states. On CPU a training step's temporaries
        # are fresh pages on every call (a few microseconds per 4 KiB touched),
        # so memory not allocated is time saved.
        acts, cs = res  # cs: the cell states in the accumulation dtype
        c_seq = cs.astype(c0.dtype)  # rounded as the carry was
        first, delta = (steps - 1, 1) if cfg.reverse else (0, -1)

        def body_inplace(carry, inp):
            gh_c, gc_c, buf, a_t = carry
            t, dy_t, v_t, r_t = inp
            c32_t = jax.lax.dynamic_index_in_dim(cs, t, 0, keepdims=False)
            is_first = t == first
            t_prev = jnp.clip(t + delta, 0, steps - 1)
            c_prev = jax.lax.dynamic_index_in_dim(c_seq, t_prev, 0, keepdims=False)
            c_prev = jnp.where(is_first, c0, c_prev)
            if v is not None:
                v_prev = jax.lax.dynamic_index_in_dim(v, t_prev, 0, keepdims=False)
                c_prev = jnp.where(_mask(v_prev | is_first, c_prev), c_prev, c0)
            if r_t is not None:
                c_prev = jnp.where(_mask(r_t, c_prev), jnp.zeros_like(c_prev), c_prev)
            (dh_in, dc_in), dxp = body(
                (gh_c, gc_c), ((a_t, c32_t), None, None, c_prev.astype(cfg.acc), dy_t, v_t, r_t)
            )
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
    else:
        y_loop = ys if (cfg.kind in ("tanh", "relu") and not res) else None
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
    dhp = _recurrent_cotangent(cfg, dxp, res)

    def gram(a, b):  # a^T b over the rows
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=cfg.acc)

    d_w_hh = gram(h_in.astype(cfg.acc).reshape(rows, -1), dhp)
    d_w_ih = gram(xs.reshape(rows, -1), dxp)
    d_b = jnp.sum(dxp, axis=0)
    dparams = {"w_ih": d_w_ih, "w_hh": d_w_hh, "b": d_b}
    if cfg.kind == "gru":
        dparams["b_hn"] = jnp.sum(dhp[:, 2 * cfg.hidden :], axis=0)
    dxs = _dot_t(dxp, params.w_ih).reshape(xs.shape)
    return dh0, dc0, dparams, dxs


def _split_carry(cfg, carry):
    return carry[0], (carry[1] if cfg.kind == "lstm" else None)


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


def _ckpt_fwd(cfg: _Cfg, params, xs, h0, c0, v, r):
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


def _ckpt_bwd(cfg: _Cfg, params, xs, v, r, saved, dys, dh, dc):
    """Backward segment by segment, recomputing each segment's forward first.

    The outputs are recomputed with the rest of the segment rather than saved:
    the loss's cotangent ``dys`` can then take the outputs' memory.
    """
    t = xs.shape[0]
    k, n_full, m = _plan(cfg, t)
    starts, tail_start = saved
    acc = {
        "w_ih": jnp.zeros(params.w_ih.shape, cfg.acc),
        "w_hh": jnp.zeros(params.w_hh.shape, cfg.acc),
        "b": jnp.zeros(params.b.shape, cfg.acc),
    }
    if cfg.kind == "gru":
        acc["b_hn"] = jnp.zeros(params.b_hn.shape, cfg.acc)

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
    if cfg.kind == "lstm":
        dcarry.append(dc0.astype(c0.dtype))
    return dparams, dxs.astype(xs.dtype), type(carry)(*dcarry), None, None


def _fused_primal(cfg: _Cfg, params, xs, carry, v, r):
    """Inference: the same scan, saving nothing for a backward."""
    h0, c0 = _split_carry(cfg, carry)
    if cfg.segment:
        (h, c), ys, _ = _ckpt_fwd(cfg, params, xs, h0, c0, v, r)
    else:
        (h, c), ys, _ = _segment_forward(cfg, params, xs, h0, c0, v, r, save=False)
    return (type(carry)(h, c) if cfg.kind == "lstm" else type(carry)(h)), ys


def _fused_fwd_rule(cfg, params, xs, carry, v, r):
    (h, c), ys, saved = _fused_fwd(cfg, params, xs, carry, v, r)
    new = type(carry)(h, c) if cfg.kind == "lstm" else type(carry)(h)
    return (new, ys), saved


def _fused_bwd_rule(cfg, saved, cts):
    new_carry, dys = cts
    kind_lstm = cfg.kind == "lstm"
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
):
    """Rollout of a built-in cell through the fused kernel.

    Arguments are already validated by :func:`jaxseq.rollout`.

    Args:
      cell: ``RNN``, ``LSTM`` or ``GRU`` (see :func:`supports_fused`).
      params: its parameters.
      xs: ``[T, *B, D]``.
      carry: carry of batch ``*B`` (``RNNCarry``/``LSTMCarry``).
      valid: optional ``bool[T, *B]``: step ``t`` is inside the sequence
        (right padding, i.e. ``t < lengths``).
      reset: optional ``bool[T, *B]`` in processing order: zero the carry
        before step ``t`` (see :func:`jaxseq.rollout.processing_resets`).
      reverse: process from ``T - 1`` down to 0.
      unroll: positive int, the ``lax.scan`` unroll of the time loops.
      checkpoint_every: None, or a positive int ``k``: rematerialise the
        forward in segments of ``k`` steps during the backward.

    Returns:
      ``(final_carry, ys)`` with ``ys: [T, *B, H]``.
    """
    t = xs.shape[0]
    batch_shape = tuple(xs.shape[1:-1])
    n = math.prod(batch_shape)
    hsz = cell.hidden_size
    seg = 0 if checkpoint_every is None or checkpoint_every >= t else int(checkpoint_every)
    acc = acc_dtype(*jax.tree_util.tree_leaves((params, xs, carry)))
    cfg = _Cfg(_kind(cell), hsz, bool(reverse), int(unroll), seg, jnp.dtype(acc))

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


def step_work(cell, batch_shape) -> int:
    """Multiply-adds of one step's recurrent matmul, ``N * H * G * H``, for a built-in cell."""
    n = int(np.prod(batch_shape, dtype=np.int64))
    g = {"lstm": 4, "gru": 3}.get(_kind(cell), 1)
    return n * cell.hidden_size * g * cell.hidden_size
