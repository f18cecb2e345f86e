"""Per-cell rules of the fused kernel: one step's gate math, forward and backward.

Each built-in cell registers its rule here (:func:`register_fused_rule`, exact
types only): ``RNN`` (tanh or ReLU, by its ``activation``), ``LSTM`` and ``GRU``.
The shared loops that call these rules live in :mod:`jaxseq.recurrent.kernels`.

Invariants:

* The gate nonlinearities are computed over whole rows (LSTM: one ``tanh`` over
  all ``4H`` columns, see ``_lstm_gates``), never over column slices, which
  XLA:CPU runs several times slower inside a loop step.
* A forward saves only what its backward needs (LSTM: the four gate
  activations and the cell state; GRU: ``r, z, n`` and ``h W_hn + b_hn``; RNN:
  nothing beyond the outputs themselves, unless the carry is rounded to a
  narrower dtype than the accumulation).
* The gate math and all cotangents run in the accumulation dtype ``cfg.acc``
  (float32, float64 when an operand is float64); the new carry is rounded to
  the carry's dtype exactly as the cell's ``recur`` rounds it.

Shapes: ``N`` rows (the flattened batch), ``H`` hidden, ``G`` gates (RNN 1,
LSTM 4, GRU 3); ``xp_t: [N, G*H]`` the biased input projection of one step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq._numerics import add_bias, matmul_f32
from jaxseq.recurrent.cells import GRU, LSTM, RNN
from jaxseq.recurrent.dispatch import FusedRule, register_fused_rule

__all__ = [
    "GRU_RULE",
    "LSTM_RULE",
    "RELU_RULE",
    "TANH_RULE",
]


def _narrow_like(x, w):
    """``x`` in ``w``'s dtype when ``w`` is a 16-bit float (bfloat16/float16 weights), else ``x``.

    The backward's matmuls then take 16-bit operands, as the forward's do (mixed
    precision: 16-bit weights mean 16-bit matmul inputs in both directions), and
    still accumulate in float32.
    """
    if jnp.issubdtype(w.dtype, jnp.floating) and jnp.dtype(w.dtype).itemsize == 2:
        return x.astype(w.dtype)
    return x


def _dot_t(dz, w):
    """``dz @ w.T`` accumulated in ``dz``'s dtype: ``[..., O] x [I, O] -> [..., I]``.

    With 16-bit weights ``dz`` enters the matmul in their dtype (``_narrow_like``).
    """
    return jax.lax.dot_general(
        _narrow_like(dz, w), w, (((dz.ndim - 1,), (1,)), ((), ())), preferred_element_type=dz.dtype
    )


# Rows * hidden from which the LSTM backward step uses the whole-row form (below it the
# per-gate slices are as fast or faster); the measurements are in benchmarks/README.md
# ("The LSTM backward's whole-row threshold").
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


# -- Elman RNN --------------------------------------------------------------------------


def _rnn_forward(cfg, params, h, c, xp_t, save: bool = True):
    z = xp_t + matmul_f32(h, params.w_hh)
    h32 = jnp.tanh(z) if cfg.rule.name == "tanh" else jax.nn.relu(z)
    res = () if h.dtype == cfg.acc or not save else (h32,)
    return h32.astype(h.dtype), None, res


def _rnn_backward(cfg, params, res, y_t, h_in, c_in, gh, gc):
    h32 = res[0] if res else y_t.astype(cfg.acc)
    dz = gh * (1.0 - h32 * h32) if cfg.rule.name == "tanh" else jnp.where(h32 > 0, gh, 0.0)
    return dz, _dot_t(dz, params.w_hh), None


# -- LSTM -------------------------------------------------------------------------------


def _lstm_forward(cfg, params, h, c, xp_t, save: bool = True):
    hsz = cfg.hidden
    a = _lstm_gates(xp_t + matmul_f32(h, params.w_hh), hsz)
    c32 = a[:, hsz : 2 * hsz] * c.astype(cfg.acc) + a[:, :hsz] * a[:, 2 * hsz : 3 * hsz]
    h32 = a[:, 3 * hsz :] * jnp.tanh(c32)
    return h32.astype(h.dtype), c32.astype(c.dtype), ((a, c32) if save else ())


def _lstm_backward(cfg, params, res, y_t, h_in, c_in, gh, gc):
    hsz = cfg.hidden
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


# -- GRU --------------------------------------------------------------------------------


def _gru_forward(cfg, params, h, c, xp_t, save: bool = True):
    hsz = cfg.hidden
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


def _gru_backward(cfg, params, res, y_t, h_in, c_in, gh, gc):
    """``dxp_t`` is the input-side cotangent; see :func:`_gru_recurrent_cotangent`."""
    hsz = cfg.hidden
    rz, n, hn = res
    r, zg = rz[:, :hsz], rz[:, hsz:]
    dpn = gh * (1.0 - zg) * (1.0 - n * n)
    dpr = dpn * hn * r * (1.0 - r)
    dpz = gh * (h_in - n) * zg * (1.0 - zg)
    dhp = jnp.concatenate([dpr, dpz, dpn * r], axis=-1)
    dxp = jnp.concatenate([dpr, dpz, dpn], axis=-1)
    return dxp, _dot_t(dhp, params.w_hh) + gh * zg, None


def _gru_recurrent_cotangent(cfg, dxp, res):
    """Cotangent of ``h_{t-1} W_hh`` for all steps: the n block is scaled by r."""
    hsz = cfg.hidden
    r = res[0][..., :hsz].reshape(dxp.shape[0], hsz)
    return jnp.concatenate([dxp[..., : 2 * hsz], dxp[..., 2 * hsz :] * r], axis=-1)


def _gru_extra_grads(cfg, dhp):
    return {"b_hn": jnp.sum(dhp[:, 2 * cfg.hidden :], axis=0)}


# -- the rules and their registration ---------------------------------------------------
# A subclass of a built-in cell that keeps its step (say, one that only adds a method)
# may register the same rule: ``js.recurrent.register_fused_rule(MyLSTM, js.recurrent.LSTM_RULE)``.

TANH_RULE = FusedRule("tanh", _rnn_forward, _rnn_backward, needs_y=True)
RELU_RULE = FusedRule("relu", _rnn_forward, _rnn_backward, needs_y=True)
LSTM_RULE = FusedRule("lstm", _lstm_forward, _lstm_backward, cell_state=True, in_place=True)
GRU_RULE = FusedRule(
    "gru",
    _gru_forward,
    _gru_backward,
    needs_h_in=True,
    recurrent_cotangent=_gru_recurrent_cotangent,
    extra_grads=_gru_extra_grads,
)


def _rnn_rule(cell: RNN) -> FusedRule:
    return TANH_RULE if cell.activation == "tanh" else RELU_RULE


register_fused_rule(RNN, _rnn_rule)
register_fused_rule(LSTM, LSTM_RULE)
register_fused_rule(GRU, GRU_RULE)
