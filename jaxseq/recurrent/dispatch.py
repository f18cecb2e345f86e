"""Which kernel a rollout runs, and how far its loops are unrolled: one :class:`Plan`.

:func:`plan` is the only place a rollout's kernel is decided. It is called once
per cell rollout, after :func:`jaxseq.rollout` validated the inputs, and what it
returns is handed to the kernel (:mod:`jaxseq.recurrent.kernels`) unchanged:

* **the kernel**: one registry maps EXACT cell types to fused-kernel rules
  (:func:`register_fused_rule`; the built-in ``RNN``, ``LSTM`` and ``GRU``
  register theirs in :mod:`jaxseq.recurrent.rules`, ``SLSTM`` in
  :mod:`jaxseq.recurrent.slstm`). Subclasses and user cells
  have no entry (a subclass may change the step), so they take the plain
  ``lax.scan`` path with ordinary autodiff. ``kernel="auto"`` picks the fused
  kernel for a registered cell unless the rollout is traced for forward-mode
  autodiff (:func:`under_forward_mode`): the fused kernel is a
  ``jax.custom_vjp``, which has no forward mode. The dtype does not change the
  choice (float64 rollouts take the fused kernel too, accumulating in float64).
* **the unroll**: ``unroll="auto"`` asks :func:`auto_unroll`, once for a
  differentiated call and once for a forward-only call (the fused kernel runs
  each with its own factor);
* **rematerialisation**: ``checkpoint_every=k`` segments (none when ``k >= T``).

**The ``unroll="auto"`` rule** (:func:`auto_unroll`): on CPU each scan iteration
costs a fixed few microseconds of loop bookkeeping on top of its work, so
unrolling pays only when the per-step work is tiny, while compile time grows
with the factor. The rule uses the per-step recurrent work ``N * H * G * H``
multiply-adds (:func:`step_work`): ``< 2**18`` -> unroll 4, otherwise 1; on
GPU/TPU (where unrolling lets XLA fuse across steps) a flat 4. A forward-only
call of an LSTM or RNN step of at least ``2**22`` multiply-adds unrolls by 2.
The factor never exceeds ``T``, and compile time stays independent of ``T``.
The measurements behind the thresholds are in ``benchmarks/README.md``
("Choosing the unroll factor"); re-measure on other hardware with
``python -m benchmarks.scan_vs_unrolled`` and
``python -m benchmarks.kernels --only unroll``.

Shapes: ``T`` time, ``N`` the flattened batch (``prod(*B)``), ``H`` hidden,
``G`` gates (RNN 1, LSTM 4, GRU 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq._numerics import acc_dtype, under_forward_mode

__all__ = [
    "KERNELS",
    "FusedRule",
    "Plan",
    "auto_unroll",
    "fused_rule",
    "register_fused_rule",
    "plan",
    "resolve_unroll",
    "step_work",
    "under_forward_mode",
]


KERNELS = ("auto", "fused", "scan")


class FusedRule(NamedTuple):
    """The per-cell part of the fused kernel: one step's gate math, forward and backward.

    The kernel's loops, masks, resets and weight gradients are shared
    (:mod:`jaxseq.recurrent.kernels`); a rule says what one step computes.
    Shapes inside a rule: ``N`` rows (flattened batch), ``H`` hidden, ``G``
    gates; ``cfg`` carries ``hidden`` (H) and ``acc`` (the accumulation dtype).

    Fields:
      name: a label (``"tanh"``, ``"relu"``, ``"lstm"``, ``"gru"``).
      forward: ``(cfg, params, h, c, xp_t, save) -> (h_new, c_new, residual)``,
        ``xp_t: [N, G*H]`` the biased input projection, ``c`` None without a cell state.
      backward: ``(cfg, params, residual, y_t, h_in, c_in, gh, gc) -> (dxp_t, dh_in, dc_in)``.
      cell_state: the carry is ``(h, c)`` (LSTM) rather than ``(h,)``.
      in_place: the residual is ``(activations [N, G*H], c)``, so the gate
        activations may overwrite the projection they came from, and the
        backward writes the gate cotangents over the activations.
      forward_in_place: with ``in_place``, whether the forward writes the
        activations over the projection (False: the backward alone works in
        place; for gate math that reads the projection from several fusions,
        where XLA would copy a buffer written in place every step).
      needs_h_in: the backward reads the carry each step started from.
      needs_y: the backward reads the step's output when the residual is empty.
      recurrent_cotangent: ``(cfg, dxp [S*N, G*H], residual) -> dhp``, the
        cotangent of ``h W_hh`` when it differs from ``dxp`` (GRU), else None.
      extra_grads: ``(cfg, dhp) -> dict`` of gradients of params beyond
        ``w_ih``, ``w_hh``, ``b`` (GRU: ``b_hn``), else None.
      recurrent_grad: ``(cfg, h_in [S*N, H], dhp [S*N, G*H], w_hh) -> d w_hh`` for a
        structured ``w_hh`` (the sLSTM's block-diagonal ``[K, H/K, G*H/K]``: one
        batched matmul over all steps per head), else None (a dense ``[H, G*H]``:
        ``h_in^T dhp``).

    With ``cell_state`` the carry beyond ``h`` (the ``c`` of the signatures
    above, and its cotangent ``gc``/``dc_in``) is one array (LSTM) or a tuple of
    arrays (sLSTM: ``c, n, m``), and the residual is ``(activations, states,
    *extra)``: ``states`` that carry after the step in the accumulation dtype
    (the backward reads the carry each step started from there), ``extra`` any
    other per-step arrays.

    >>> from jaxseq.recurrent import rules
    >>> rules.LSTM_RULE.name, rules.LSTM_RULE.cell_state
    ('lstm', True)
    """

    name: str
    forward: Callable
    backward: Callable
    cell_state: bool = False
    in_place: bool = False
    forward_in_place: bool = True
    needs_h_in: bool = False
    needs_y: bool = False
    recurrent_cotangent: Callable | None = None
    extra_grads: Callable | None = None
    recurrent_grad: Callable | None = None


_RULES: dict[type, FusedRule | Callable[[Any], FusedRule | None]] = {}


def register_fused_rule(cell_type: type, rule) -> None:
    """Registers the fused kernel of cells whose type is EXACTLY ``cell_type``.

    Args:
      cell_type: a cell class; subclasses are not covered (they take the scan path).
      rule: a :class:`FusedRule`, or a function ``cell -> FusedRule | None``
        for rules that depend on the cell's config (``None``: no fused kernel
        for that config). The cell class must have ``hidden_size`` and
        ``num_gates`` attributes and params/carries laid out as the built-ins'.

    >>> import jaxseq as js
    >>> from jaxseq.recurrent import dispatch, rules
    >>> class MyLSTM(js.LSTM): ...
    >>> dispatch.fused_rule(MyLSTM(4)) is None
    True
    >>> dispatch.register_fused_rule(MyLSTM, rules.LSTM_RULE)
    >>> dispatch.fused_rule(MyLSTM(4)).name
    'lstm'
    >>> del dispatch._RULES[MyLSTM]
    """
    if not isinstance(cell_type, type):
        raise TypeError(f"cell_type: expected a class, got {type(cell_type).__name__}")
    if not isinstance(rule, FusedRule) and not callable(rule):
        raise TypeError(
            f"rule: expected a FusedRule or a function cell -> FusedRule, got {type(rule).__name__}"
        )
    _RULES[cell_type] = rule


def fused_rule(cell) -> FusedRule | None:
    """The fused-kernel rule registered for ``type(cell)`` exactly, or None.

    >>> import jaxseq as js
    >>> from jaxseq.recurrent import dispatch
    >>> dispatch.fused_rule(js.RNN(4, activation="relu")).name
    'relu'
    >>> dispatch.fused_rule(object()) is None
    True
    """
    rule = _RULES.get(type(cell))
    if rule is None or isinstance(rule, FusedRule):
        return rule
    return rule(cell)


def auto_unroll(
    t: int,
    work: int | None = None,
    backend: str | None = None,
    *,
    inference: bool = False,
    gates: int | None = None,
) -> int:
    """Unroll factor for ``unroll="auto"``.

    Args:
      t: sequence length ``T`` (the factor never exceeds it).
      work: multiply-adds of one step's recurrent matmul, ``N * H * G * H``
        (None: unknown, treated as small).
      backend: ``jax.default_backend()`` when None.
      inference: the factor for a forward-only call of the fused kernel (nothing
        saved for a backward): on CPU, LSTM and RNN steps of ``work >= 2**22``
        unroll by 2 there, while the GRU's and the smaller steps' factor stays
        the training one (measurements in ``benchmarks/README.md``).
      gates: ``G`` of the cell (LSTM 4, GRU 3, RNN 1), for the inference rule.

    See the module docstring for how the thresholds were measured.

    >>> auto_unroll(100, 32 * 256 * 4 * 256, "cpu"), auto_unroll(100, 2**10, "cpu")
    (1, 4)
    >>> auto_unroll(100, 32 * 256 * 4 * 256, "cpu", inference=True, gates=4)
    2
    >>> auto_unroll(3, None, "gpu")
    3
    """
    t = max(int(t), 1)
    backend = backend or jax.default_backend()
    if backend != "cpu":
        u = 4
    elif work is None or work < 2**18:
        u = 4
    elif inference and gates != 3 and work >= 2**22:
        u = 2
    else:
        u = 1
    return max(1, min(u, t))


def step_work(cell, batch_shape) -> int:
    """Multiply-adds of one step's recurrent matmul, ``N * H * G * H``, ``N = prod(*B)``.

    For cells with ``hidden_size`` and ``num_gates`` (the built-ins); a cell
    with a block-diagonal recurrent weight of ``num_heads`` blocks (the sLSTM)
    does ``N * H * G * H / K``.

    >>> import jaxseq as js
    >>> js.recurrent.step_work(js.LSTM(8), (2, 3))  # 6 * 8 * 4 * 8
    1536
    >>> js.recurrent.step_work(js.recurrent.SLSTM(8, num_heads=2), (2, 3))
    768
    """
    n = int(np.prod(batch_shape, dtype=np.int64))
    g = int(getattr(cell, "num_gates", 1))
    blocks = int(getattr(cell, "num_heads", 1)) if getattr(cell, "block_diagonal", False) else 1
    return n * cell.hidden_size * g * cell.hidden_size // blocks


def resolve_unroll(unroll, t: int, work: int | None = None, **rule) -> int:
    """Turns the ``unroll`` argument into a positive int for ``lax.scan``.

    ``"auto"`` asks :func:`auto_unroll` (``work``: multiply-adds of one step's
    recurrent matmul, when known; ``rule``: its keyword arguments); ``True``
    unrolls all ``T`` steps; an int is capped at ``T``.

    >>> resolve_unroll(True, 7), resolve_unroll(2, 7), resolve_unroll(9, 7)
    (7, 2, 7)
    """
    if unroll is True:
        return max(t, 1)
    if isinstance(unroll, str) and unroll == "auto":
        return auto_unroll(t, work, **rule)
    if isinstance(unroll, bool) or not isinstance(unroll, int | np.integer) or unroll < 1:
        raise ValueError(f"unroll: expected a positive int, True or 'auto', got {unroll!r}")
    return max(1, min(int(unroll), t))


class Plan(NamedTuple):
    """How one cell rollout runs: what :func:`plan` decides and the kernel follows.

    Hashable (a ``custom_vjp``'s static argument). Fields:
      rule: the cell's :class:`FusedRule` (the fused kernel), or None (``lax.scan``).
      hoisted: scan path: the cell has ``project``/``recur``, so the input
        projection runs once before the loop.
      reverse: process from ``T - 1`` down to 0.
      unroll: the loops' unroll factor (a differentiated call).
      inference_unroll: the factor of a forward-only call of the fused kernel.
      segment: ``checkpoint_every`` when it is below ``T``, else 0 (no remat).
      hidden: ``H`` of a fused rule's cell (0 on the scan path).
      acc: the fused kernel's accumulation dtype (float32; float64 when an operand is).

    >>> import jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent import dispatch
    >>> seq = js.recurrent.prepare(js.LSTM(4), None, jnp.ones((10, 2, 3)))
    >>> p = dispatch.plan(js.LSTM(4), None, seq, None, js.recurrent.RolloutOptions())
    >>> p.rule.name, p.unroll, p.segment
    ('lstm', 4, 0)
    """

    rule: FusedRule | None
    hoisted: bool
    reverse: bool
    unroll: int
    inference_unroll: int
    segment: int
    hidden: int = 0
    acc: Any = None


def plan(cell, params, seq, carry, options) -> Plan:
    """The :class:`Plan` of a rollout of ``cell`` over ``seq`` (a validated
    :class:`~jaxseq.recurrent.Sequence`) with ``options`` (a
    :class:`~jaxseq.recurrent.RolloutOptions`).

    ``kernel="fused"`` for a cell without a rule is a ``ValueError``.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent import dispatch
    >>> seq = js.recurrent.prepare(js.GRU(4), None, jnp.ones((10, 2, 3)))
    >>> opts = js.recurrent.RolloutOptions(kernel="scan", unroll=2, checkpoint_every=5)
    >>> p = dispatch.plan(js.GRU(4), None, seq, None, opts)
    >>> p.rule is None, p.hoisted, p.unroll, p.segment
    (True, True, 2, 5)
    """
    t, kernel = seq.t, options.kernel
    rule = None if kernel == "scan" else fused_rule(cell)
    if kernel == "fused" and rule is None:
        raise ValueError(
            f"kernel: 'fused' needs a cell whose exact type has a registered fused rule "
            f"(RNN, LSTM, GRU, SLSTM), got {type(cell).__name__}; use kernel='auto' or 'scan'"
        )
    if kernel == "auto" and rule is not None and under_forward_mode(params, seq.xs, carry):
        rule = None
    sized = hasattr(cell, "hidden_size") and hasattr(cell, "num_gates")
    work = step_work(cell, seq.batch_shape) if sized else None
    unroll = resolve_unroll(options.unroll, t, work)
    k = options.checkpoint_every
    segment = k if k and k < t else 0
    if rule is None:
        hoisted = callable(getattr(cell, "project", None)) and callable(
            getattr(cell, "recur", None)
        )
        return Plan(None, hoisted, options.reverse, unroll, unroll, segment)
    inference = unroll
    if isinstance(options.unroll, str):
        inference = auto_unroll(t, work, inference=True, gates=int(cell.num_gates))
    acc = jnp.dtype(acc_dtype(*jax.tree_util.tree_leaves((params, seq.xs, carry))))
    return Plan(rule, True, options.reverse, unroll, inference, segment, cell.hidden_size, acc)
