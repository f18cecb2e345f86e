"""sLSTM (Beck et al. 2024, "xLSTM"): exponential gating with a normaliser and a
stabiliser, and a block-diagonal recurrent weight (one block per head).

The step, gates in order i, f, z, o, with ``R`` block-diagonal (head ``k``'s
hidden units feed only head ``k``'s gates)::

    [ĩ, f̃, z̃, õ] = x_t W_ih + h_{t-1} R + b
    log i = ĩ,  log f = log sigmoid(f̃)  (forget_gate="sigmoid")  or  f̃  ("exp")
    z = tanh(z̃),  o = sigmoid(õ)
    m_t = max(log f + m_{t-1}, log i)                  the stabiliser
    i' = exp(log i - m_t),  f' = exp(log f + m_{t-1} - m_t)
    c_t = f' c_{t-1} + i' z,   n_t = f' n_{t-1} + i',   h_t = o * c_t / n_t,   y_t = h_t

``c_t e^{m_t}`` and ``n_t e^{m_t}`` are the paper's unstabilised cell and
normaliser states; ``m_t`` only rescales both, so ``h_t`` does not depend on it
and ``i', f' <= 1`` keep every value finite however large the gate
pre-activations are.

**An empty state.** A carry with ``n = 0`` (the zero initial carry, and the carry
after a reset) holds nothing: its ``c`` is ignored (``f' = 0``) and the step
takes ``m_t = log i`` (the xLSTM reference takes ``m_t = log i`` when all of
``n`` is zero; here it is decided per unit). Then ``i' = 1`` at the first step,
and by induction ``n_t >= 1`` at every later step (either ``f' = 1`` and ``n``
does not shrink, or ``i' = 1``), so ``h_t = o c_t / n_t`` never divides by a
small number and ``|c_t / n_t| <= 1``. A given carry with ``0 < n < 1`` keeps
``n_t >= min(n, 1)``.

**Numerics.** The gate math runs in float32 (float64 for float64 operands)
whatever the input dtype; the new carry is rounded to the carry's dtype, ``m``
first, and ``i'``, ``f'`` are formed against the rounded ``m`` so the stored
``(c, n, m)`` are consistent with each other.

**Defaults** follow the xLSTM reference implementation: a sigmoid forget gate,
the recurrent blocks initialised to zeros, and the forget-gate bias of each head
spread by a power law from 5 down to -7 over the head's units (``5 - 12
(j / (d - 1))^0.3``, its "powerlaw_blockdependent" init for the first block), so
some units start remembering for hundreds of steps and others forget at once.

Params: ``SLSTMParams(w_ih [D, 4H], w_hh [K, H/K, 4H/K], b [4H])``, gate blocks
i, f, z, o (``w_hh[k]``'s columns are head ``k``'s i, f, z, o, ``H/K`` each).
Carry: ``SLSTMCarry(h, c, n, m)``, each ``[*B, H]``.

Rollouts: ``js.rollout`` runs the fused kernel (:mod:`jaxseq.recurrent.kernels`,
with the rule registered here: one ``custom_vjp``, hand-written backward, the
recurrent matmul a batched matmul per head, its weight gradient one batched
matmul over all steps), with lengths, resets, reverse and ``checkpoint_every``;
``kernel="scan"`` steps the cell.

Shapes: ``D`` input, ``H`` hidden, ``K`` heads, ``*B`` batch dims, ``N`` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import acc_dtype
from jaxseq.recurrent import dispatch, kernels
from jaxseq.recurrent.cells import _CellBase
from jaxseq.recurrent.dispatch import FusedRule, register_fused_rule
from jaxseq.recurrent.rollouts import RolloutOptions
from jaxseq.recurrent.rules import _narrow_like
from jaxseq.recurrent.sequence import Sequence, compute_dtype

__all__ = [
    "SLSTM",
    "SLSTMCarry",
    "SLSTMParams",
    "SLSTM_EXP_RULE",
    "SLSTM_RULE",
]

FORGET_GATES = ("sigmoid", "exp")


class SLSTMParams(NamedTuple):
    """sLSTM weights, gates i, f, z, o: ``w_ih [D, 4H]``, ``w_hh [K, H/K, 4H/K]`` (one
    block per head), ``b [4H]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.recurrent.SLSTM(8, num_heads=2).init(jax.random.key(0), 3)]
    [(3, 32), (2, 4, 16), (32,)]
    """

    w_ih: jax.Array  # [D, 4H], gate blocks i, f, z, o
    w_hh: jax.Array  # [K, H/K, 4H/K]: head k's units -> head k's i, f, z, o
    b: jax.Array  # [4H]


class SLSTMCarry(NamedTuple):
    """Carry of the sLSTM: ``h``, the cell state ``c``, the normaliser ``n`` and the
    stabiliser ``m``, each ``[*B, H]`` (``n = 0``: an empty state).

    >>> import jaxseq as js
    >>> js.recurrent.SLSTM(4, num_heads=2).initial_carry((2,)).m.shape
    (2, 4)
    """

    h: jax.Array  # [*B, H]
    c: jax.Array  # [*B, H], stabilised: c e^m is the paper's c
    n: jax.Array  # [*B, H], stabilised: n e^m is the paper's n
    m: jax.Array  # [*B, H]


def powerlaw_forget_bias(key, shape, dtype=jnp.float32):
    """The xLSTM reference's forget-gate bias of one head: ``5 - 12 (j / (d - 1))^0.3``,
    ``j = 0 .. d - 1`` over the last axis (``key`` unused).

    >>> import jax
    >>> [round(v, 2) for v in powerlaw_forget_bias(jax.random.key(0), (3,)).tolist()]
    [5.0, -4.75, -7.0]
    """
    d = shape[-1]
    j = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
    return jnp.broadcast_to(5.0 - 12.0 * j**0.3, shape).astype(dtype)


def _blocks(h, w_hh):
    """``h [..., H]`` times the block-diagonal ``w_hh [K, H/K, 4H/K]``: ``[..., 4H]``
    (gate-major, as ``w_ih``'s columns), accumulated in float32 (float64)."""
    k, d, g = w_hh.shape
    acc = acc_dtype(h, w_hh)
    if h.dtype != w_hh.dtype:
        h, w_hh = h.astype(acc), w_hh.astype(acc)
    hk = h.reshape(h.shape[:-1] + (k, d))
    nd = hk.ndim
    out = jax.lax.dot_general(
        hk, w_hh, (((nd - 1,), (1,)), ((nd - 2,), (0,))), preferred_element_type=acc
    )  # [K, ..., 4 d]
    out = out.reshape(out.shape[:-1] + (4, d))
    out = jnp.moveaxis(out, 0, -2)  # [..., 4, K, d]
    return out.reshape(out.shape[:-3] + (4 * k * d,))


def _blocks_t(dz, w_hh):
    """The transpose of :func:`_blocks`: ``dz [N, 4H] -> [N, H]`` in ``dz``'s dtype."""
    k, d, g = w_hh.shape
    n = dz.shape[0]
    dz4 = _narrow_like(dz, w_hh).reshape(n, 4, k, d)
    w4 = w_hh.reshape(k, d, 4, d)
    out = jax.lax.dot_general(
        dz4, w4, (((1, 3), (2, 3)), ((2,), (0,))), preferred_element_type=dz.dtype
    )  # [K, N, d]
    return jnp.moveaxis(out, 0, 1).reshape(n, k * d)


def _blocks_grad(cfg, h_rows, dhp, w_hh):
    """``d w_hh [K, H/K, 4H/K]``: per head, ``h_in^T dG`` over all ``S*N`` rows at once."""
    k, d, g = w_hh.shape
    rows = h_rows.shape[0]
    hk = h_rows.reshape(rows, k, d)
    dg = _narrow_like(dhp, w_hh).reshape(rows, 4, k, d)
    out = jax.lax.dot_general(
        hk, dg, (((0,), (0,)), ((1,), (2,))), preferred_element_type=cfg.acc
    )  # [K, d, 4, d]
    return out.reshape(k, d, g)


def _pointwise(pre, c, n, m, exp_forget: bool, m_dtype):
    """The gate math of one step from the pre-activations ``pre [..., 4H]`` and the
    carry ``c, n, m`` (accumulation dtype). Returns ``(h, c, n, m, parts)``,
    ``parts = (i', f', z, o, sel, f̃)``; ``sel``: ``m`` took ``log f + m_prev``."""
    hsz = pre.shape[-1] // 4
    ip, fp, zp, op = (pre[..., k * hsz : (k + 1) * hsz] for k in range(4))
    log_f = fp if exp_forget else jax.nn.log_sigmoid(fp)
    a = log_f + m
    empty = n == 0
    sel = (a >= ip) & ~empty
    m_new = jnp.where(sel, a, ip).astype(m_dtype).astype(pre.dtype)
    # An empty state contributes nothing (f' = 0); the exponent is 0 there, so neither
    # the value nor the gradient can overflow.
    fg = jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, m_new, a) - m_new))
    ig = jnp.exp(ip - m_new)
    z, o = jnp.tanh(zp), jax.nn.sigmoid(op)
    c_new = fg * c + ig * z
    n_new = fg * n + ig
    h = o * c_new / n_new
    return h, c_new, n_new, m_new, (ig, fg, z, o, sel, fp)


# -- the fused kernel's rule ------------------------------------------------------------


def _slstm_forward(cfg, params, h, c, xp_t, save: bool = True):
    cs, ns, ms = c
    acc = cfg.acc
    pre = xp_t + _blocks(h, params.w_hh)
    exp_forget = cfg.rule.name == "slstm_exp"
    h32, c32, n32, m32, (ig, fg, z, o, sel, fp) = _pointwise(
        pre, cs.astype(acc), ns.astype(acc), ms.astype(acc), exp_forget, ms.dtype
    )
    new = (c32.astype(cs.dtype), n32.astype(ns.dtype), m32.astype(ms.dtype))
    if not save:
        return h32.astype(h.dtype), new, ()
    acts = jnp.concatenate([ig, fg, z, o], axis=-1)
    extra = (sel,) if exp_forget else (sel, jax.nn.sigmoid(-fp))
    return h32.astype(h.dtype), new, (acts, (c32, n32, m32), *extra)


def _slstm_backward(cfg, params, res, y_t, h_in, c_in, gh, gc):
    """Hand-written backward of :func:`_pointwise` (the derivative autodiff takes,
    the stabiliser's included): ``(dxp [N, 4H], dh_in, (dc_in, dn_in, dm_in))``."""
    hsz = cfg.hidden
    acts, (c, n, _), sel, *fs = res
    ig, fg, z, o = (acts[:, k * hsz : (k + 1) * hsz] for k in range(4))
    c_prev, n_prev, _ = c_in
    g_c, g_n, g_m = gc
    inv_n = 1.0 / n
    q = c * inv_n  # c / n
    dc = g_c + gh * o * inv_n
    dn = g_n - gh * o * q * inv_n
    da = (dc * c_prev + dn * n_prev) * fg  # through f' = exp(a - m), a = log f + m_prev
    di = (dc * z + dn) * ig  # through i' = exp(log i - m)
    dm = g_m - da - di  # m's own cotangent, to the branch the max took
    da = da + jnp.where(sel, dm, 0.0)
    di = di + jnp.where(sel, 0.0, dm)
    df = da * fs[0] if fs else da
    dz = jnp.concatenate(
        [di, df, dc * ig * (1.0 - z * z), gh * q * o * (1.0 - o)],
        axis=-1,
    )
    return dz, _blocks_t(dz, params.w_hh), (dc * fg, dn * fg, da)


# The backward works in place, the forward does not: its gate math reads the projection
# from several fusions, and XLA would copy a buffer written in place every step.
_RULE_FIELDS: dict[str, Any] = dict(
    cell_state=True, in_place=True, forward_in_place=False, recurrent_grad=_blocks_grad
)
SLSTM_RULE = FusedRule("slstm", _slstm_forward, _slstm_backward, **_RULE_FIELDS)
SLSTM_EXP_RULE = FusedRule("slstm_exp", _slstm_forward, _slstm_backward, **_RULE_FIELDS)


# -- the cell ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SLSTM(_CellBase):
    r"""sLSTM cell (xLSTM's scalar-memory LSTM; the equations are in :mod:`jaxseq.recurrent.slstm`)::

        c_t = f' c_{t-1} + i' tanh(z̃),   n_t = f' n_{t-1} + i',   h_t = sigmoid(õ) c_t / n_t

    with exponential input gate, a stabiliser ``m``, and a block-diagonal
    recurrent weight of ``num_heads`` blocks.

    Args:
      hidden_size: H.
      num_heads: K, the number of diagonal blocks of the recurrent weight; must
        divide H (default 4, as xLSTM).
      forget_gate: ``"sigmoid"`` (default, the xLSTM reference's: ``log f =
        log sigmoid(f̃)``) or ``"exp"`` (``log f = f̃``).
      kernel_init: initialiser of the ``[D, H]`` gate blocks of ``w_ih`` (default
        LeCun normal).
      recurrent_init: initialiser of each head's ``[H/K, H/K]`` gate blocks of
        ``w_hh`` (default zeros, as xLSTM; e.g. ``initializers.orthogonal()``).
      bias_init: initialiser of the i, z, o blocks of ``b`` (default zeros).
      forget_bias_init: initialiser of each head's ``[H/K]`` forget-gate bias
        (default the xLSTM power law from 5 down to -7, see the module).

    Carry: ``SLSTMCarry(h, c, n, m)``. Params: ``SLSTMParams(w_ih [D, 4H],
    w_hh [K, H/K, 4H/K], b [4H])``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.recurrent.SLSTM(8, num_heads=2)
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> xs = jax.random.normal(jax.random.key(1), (6, 2, 3))
    >>> carry, ys = js.rollout(cell, params, xs)  # the fused kernel
    >>> _, ys_steps = js.rollout(cell, params, xs, kernel="scan")  # one step at a time
    >>> ys.shape, carry.n.shape, bool(jnp.allclose(ys, ys_steps, atol=1e-6))
    ((6, 2, 8), (2, 8), True)
    >>> js.recurrent.SLSTM(6, num_heads=4)
    Traceback (most recent call last):
    ...
    ValueError: num_heads: expected a divisor of hidden_size=6, got 4
    """

    hidden_size: int
    num_heads: int = 4
    forget_gate: str = "sigmoid"
    kernel_init: Any = None
    recurrent_init: Any = None
    bias_init: Any = None
    forget_bias_init: Any = None

    num_gates: ClassVar[int] = 4
    block_diagonal: ClassVar[bool] = True
    carry_type: ClassVar[type] = SLSTMCarry
    params_type: ClassVar[type] = SLSTMParams

    def __post_init__(self):
        self._validate_config()
        _checks.check_positive_int("num_heads", self.num_heads)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of hidden_size={self.hidden_size}, "
                f"got {self.num_heads}"
            )
        _checks.check_choice("forget_gate", self.forget_gate, FORGET_GATES)
        f = self.forget_bias_init
        if f is not None and not callable(f):
            raise TypeError(
                "forget_bias_init: expected an initializer (key, shape, dtype) -> array"
            )

    @property
    def head_size(self) -> int:
        """``H / K``, the units of one head."""
        return self.hidden_size // self.num_heads

    def init(self, key, input_size: int, dtype=jnp.float32) -> SLSTMParams:
        """Fresh params for inputs of size ``D = input_size`` (see the class for the inits)."""
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        h, k, dh = self.hidden_size, self.num_heads, self.head_size
        k_init = self.kernel_init or inits.lecun_normal()
        r_init = self.recurrent_init or inits.zeros()
        b_init = self.bias_init or inits.zeros()
        f_init = self.forget_bias_init or powerlaw_forget_bias
        kx, kh, kb, kf = jax.random.split(key, 4)
        w_ih = jnp.concatenate([k_init(q, (d, h), dtype) for q in jax.random.split(kx, 4)], axis=1)
        keys = jax.random.split(kh, (k, 4))
        w_hh = jnp.stack(
            [
                jnp.concatenate([r_init(q, (dh, dh), dtype) for q in keys[j]], axis=1)
                for j in range(k)
            ]
        )
        b = [b_init(q, (h,), dtype) for q in jax.random.split(kb, 4)]
        b[1] = jnp.concatenate([f_init(q, (dh,), dtype) for q in jax.random.split(kf, k)])
        return SLSTMParams(w_ih, w_hh, jnp.concatenate(b))

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are ``SLSTMParams`` with ``w_ih [D, 4H]``,
        ``w_hh [K, H/K, 4H/K]``, ``b [4H]``, all floating."""
        if not isinstance(params, SLSTMParams):
            raise TypeError(f"{name}: expected SLSTMParams for SLSTM, got {type(params).__name__}")
        h, k, dh = self.hidden_size, self.num_heads, self.head_size
        w_ih = params.w_ih
        if w_ih.ndim != 2 or w_ih.shape[1] != 4 * h:
            raise ValueError(
                f"{name}.w_ih: expected shape [D, {4 * h}] (4*H with H={h}), "
                f"got {_checks.describe(w_ih)}"
            )
        _checks.check_shape(f"{name}.w_hh", params.w_hh, (k, dh, 4 * dh), ("K", "H/K", "4H/K"))
        _checks.check_shape(f"{name}.b", params.b, (4 * h,))
        for field in params._fields:
            _checks.check_floating(f"{name}.{field}", getattr(params, field))

    def recur(self, params: SLSTMParams, carry: SLSTMCarry, xp: jax.Array):
        """Recurrent part of a step given ``xp = project(params, x)``: ``[*B, 4H]``."""
        pre = xp + _blocks(carry.h, params.w_hh)
        acc = pre.dtype
        h, c, n, m, _ = _pointwise(
            pre,
            carry.c.astype(acc),
            carry.n.astype(acc),
            carry.m.astype(acc),
            self.forget_gate == "exp",
            carry.m.dtype,
        )
        h = h.astype(carry.h.dtype)
        new = SLSTMCarry(
            h, c.astype(carry.c.dtype), n.astype(carry.n.dtype), m.astype(carry.m.dtype)
        )
        return new, h

    def rollout(self, params, seq: Sequence, carry, options: RolloutOptions, key=None):
        """The cell over ``seq.xs: [T, *B, D] -> ys: [T, *B, H]`` (run by :func:`jaxseq.rollout`).

        ``kernel="auto"`` and ``"fused"``: the fused kernel; ``kernel="scan"`` (and
        ``"auto"`` under ``jax.jvp``): the step in ``lax.scan``. ``key`` is not used.
        Returns ``(SLSTMCarry, ys)``, zeros at padded steps.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> cell = js.recurrent.SLSTM(4, num_heads=2)
        >>> params = cell.init(jax.random.key(0), 3)
        >>> carry, ys = js.rollout(cell, params, jnp.ones((6, 2, 3)), lengths=jnp.array([6, 2]))
        >>> ys.shape, bool(jnp.all(ys[2:, 1] == 0))
        ((6, 2, 4), True)
        """
        if carry is None:
            carry = self.initial_carry(seq.batch_shape, compute_dtype(params, seq.xs))
        plan = dispatch.plan(self, params, seq, carry, options)
        kernel = kernels.scan_rollout if plan.rule is None else kernels.fused_rollout
        return kernel(self, params, seq, carry, plan)


def _slstm_rule(cell: SLSTM) -> FusedRule:
    return SLSTM_EXP_RULE if cell.forget_gate == "exp" else SLSTM_RULE


register_fused_rule(SLSTM, _slstm_rule)
