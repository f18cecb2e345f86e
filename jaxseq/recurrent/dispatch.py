"""Which kernel a rollout runs, and how far its loop is unrolled.

Invariants:

* **One registry** maps EXACT cell types to fused-kernel rules
  (:func:`register_fused_rule`); the built-in ``RNN``, ``LSTM`` and ``GRU``
  register theirs in :mod:`jaxseq.recurrent.rules`. Subclasses and user cells
  have no entry (a subclass may change the step), so they take the plain
  ``lax.scan`` path with ordinary autodiff. Nothing else in the package tests
  a cell's type to choose a kernel.
* ``kernel="auto"`` picks the fused kernel for a registered cell unless the
  rollout is traced for forward-mode autodiff (:func:`under_forward_mode`):
  the fused kernel is a ``jax.custom_vjp``, which has no forward mode.
* The dtype does not change the choice (float64 rollouts take the fused
  kernel too, which then accumulates in float64).

**The ``unroll="auto"`` rule** (:func:`auto_unroll`): on CPU each scan
iteration costs a fixed few microseconds of loop bookkeeping on top of its
work, so unrolling pays only when the per-step work is tiny, while compile
time grows with the factor. The rule uses the per-step recurrent work
``N * H * G * H`` multiply-adds (:func:`step_work`): ``< 2**18`` -> unroll 4,
otherwise 1; on GPU/TPU (where unrolling lets XLA fuse across steps) a flat 4.
The factor never exceeds ``T``, and compile time stays independent of ``T``.
The measurements behind the threshold are in ``benchmarks/README.md``
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
import numpy as np
from jax.interpreters import ad

__all__ = [
    "KERNELS",
    "FusedRule",
    "auto_unroll",
    "fused_rule",
    "register_fused_rule",
    "step_work",
    "supports_fused",
    "under_forward_mode",
    "wavefront_wins",
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
        activations may overwrite the projection they came from.
      needs_h_in: the backward reads the carry each step started from.
      needs_y: the backward reads the step's output when the residual is empty.
      recurrent_cotangent: ``(cfg, dxp [S*N, G*H], residual) -> dhp``, the
        cotangent of ``h W_hh`` when it differs from ``dxp`` (GRU), else None.
      extra_grads: ``(cfg, dhp) -> dict`` of gradients of params beyond
        ``w_ih``, ``w_hh``, ``b`` (GRU: ``b_hn``), else None.

    >>> from jaxseq.recurrent import rules
    >>> rules.LSTM_RULE.name, rules.LSTM_RULE.cell_state
    ('lstm', True)
    """

    name: str
    forward: Callable
    backward: Callable
    cell_state: bool = False
    in_place: bool = False
    needs_h_in: bool = False
    needs_y: bool = False
    recurrent_cotangent: Callable | None = None
    extra_grads: Callable | None = None


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
    >>> dispatch.supports_fused(MyLSTM(4))
    False
    >>> dispatch.register_fused_rule(MyLSTM, rules.LSTM_RULE)
    >>> dispatch.supports_fused(MyLSTM(4))
    True
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


def supports_fused(cell) -> bool:
    """Whether ``cell`` has a fused kernel (a rule is registered for its exact type).

    >>> import jaxseq as js
    >>> class MyGRU(js.GRU): ...
    >>> js.supports_fused(js.GRU(4)), js.supports_fused(MyGRU(4))
    (True, False)
    """
    return fused_rule(cell) is not None


def _forward_mode_tracer(x) -> bool:
    """Whether ``x`` is, or wraps, a forward-mode (JVP) tracer.

    ``jax.interpreters.ad.JVPTracer`` is the public type of ``jax.jvp``'s
    tracers. A tracer of another transformation applied on top of ``jax.jvp``
    (``jax.vmap``'s, or the linearisation ``jax.grad`` runs) keeps the value it
    traces in its ``val`` or ``primal`` attribute; those are followed down.
    """
    seen = 0
    while isinstance(x, jax.core.Tracer) and seen < 64:
        seen += 1
        if isinstance(x, ad.JVPTracer):
            return True
        inner = getattr(x, "primal", None)
        if not isinstance(inner, jax.core.Tracer):
            inner = getattr(x, "val", None)
        x = inner
    return False


def under_forward_mode(*trees) -> bool:
    """True when any leaf of ``trees`` is being traced for forward-mode autodiff.

    Covers ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` and forward-over-reverse
    (``jax.jvp`` of ``jax.grad``), also under ``jax.vmap``. It cannot see a
    ``jax.jvp`` applied to an already-``jit``-ed function (inside the jit the
    inputs are plain staging tracers): pass ``kernel="scan"`` there.

    >>> import jax, jax.numpy as jnp
    >>> from jaxseq.recurrent import dispatch
    >>> seen = []
    >>> f = lambda x: seen.append(dispatch.under_forward_mode(x)) or x
    >>> _ = jax.jvp(f, (1.0,), (1.0,)); _ = jax.grad(f)(1.0); seen
    [True, False]
    """
    return any(_forward_mode_tracer(x) for x in jax.tree_util.tree_leaves(trees))


def choose_fused(kernel: str, cell, *trees) -> bool:
    """Whether a rollout of ``cell`` with ``kernel`` runs the fused kernel.

    ``kernel`` is one of :data:`KERNELS` (already checked); ``trees`` are the
    rollout's traced inputs (params, xs, carry), looked at for forward mode.
    ``"fused"`` for a cell without a rule is a ``ValueError``.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent import dispatch
    >>> dispatch.choose_fused("auto", js.LSTM(4), jnp.ones(2))
    True
    >>> dispatch.choose_fused("scan", js.LSTM(4), jnp.ones(2))
    False
    """
    ok = supports_fused(cell)
    if kernel == "fused" and not ok:
        raise ValueError(
            f"kernel: 'fused' needs a cell whose exact type has a registered fused rule "
            f"(RNN, LSTM or GRU), got {type(cell).__name__}; use kernel='auto' or 'scan'"
        )
    return kernel == "fused" or (kernel == "auto" and ok and not under_forward_mode(*trees))


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
        saved for a backward). On CPU, LSTM and RNN steps of ``work >= 2**22``
        run faster unrolled by 2 there (LSTM (B, H) = (32, 256): 24.5 -> 21.0 ms
        at T=100; RNN (64, 512): 41.6 -> 37.6 ms; AMD EPYC, 2 cores), while the
        GRU's and the smaller steps' best stays the training factor.
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


def wavefront_wins(cell, n_layers: int, batch_shape, t: int, backend: str | None = None) -> bool:
    """Whether a :class:`~jaxseq.Stack` of ``n_layers`` cells like ``cell`` over ``T = t``
    steps should run as one wavefront (:mod:`jaxseq.recurrent.wavefront`) instead of layer
    by layer, when :meth:`~jaxseq.Stack.rollout` decides (``wavefront=None``).

    Currently never: no measured shape trains faster as a wavefront. On CPU, XLA
    already runs each step's small matmul on both cores (``[32, 256] x [256, 1024]``
    at about 167 GFLOP/s of the ~204 a large matmul reaches on 2 cores), so two
    layers' matmuls side by side only share the same cores; what the wavefront can
    hide is each step's serial gate math, and it pays for that with the
    inter-layer projections (``x W_ih`` forward, ``dG W_ih^T`` backward) done as
    per-step matmuls instead of one large matmul, with dropout masks drawn before
    its loop (layer by layer, a mask is drawn while the layer below runs), and with
    more work per loop iteration for XLA's executor.

    Measured on 2 cores (AMD EPYC), interleaved medians in one process, input
    size 128, dropout 0.2 drawn from a key, ``Stack.rollout(..., wavefront=False)``
    (the fused kernel layer by layer) against ``wavefront=True``; training = value
    and gradient w.r.t. params and inputs; ms:

    ===============================  =============  =========  ===========  =========
    stack, (B, H, T)                 train: layers  wavefront  fwd: layers  wavefront
    ===============================  =============  =========  ===========  =========
    2 LSTM, (32, 256, 64) (char-LM)  84.6           83.4       24.6         29.9
    2 LSTM, (64, 512, 100)           816            900        251          271
    2 LSTM, (1, 128, 1000)           22.0           33.3       8.2          8.3
    2 GRU, (32, 256, 64)             67.7           71.1       22.7         23.1
    2 RNN tanh, (32, 256, 64)        28.6           28.5       10.3         11.2
    3 LSTM, (32, 256, 64)            128            155        38.5         45.6
    ===============================  =============  =========  ===========  =========

    The char-LM's whole training step (embedding 128, 2 LSTM 256, head, loss and
    update; B=32, K=64, dropout 0.2) took 85.3 ms layer by layer and 87.9 ms with
    the wavefront (GRU: 73.6 and 77.1): the stack's 1% gain is lost in the step.
    Other backends are unmeasured; re-measure on other hardware by timing
    ``stack.rollout(..., wavefront=True)`` against ``wavefront=False``.

    >>> import jaxseq as js
    >>> wavefront_wins(js.LSTM(256), 2, (32,), 64, "cpu")
    False
    """
    return False


def step_work(cell, batch_shape) -> int:
    """Multiply-adds of one step's recurrent matmul, ``N * H * G * H``, ``N = prod(*B)``.

    For cells with ``hidden_size`` and ``num_gates`` (the built-ins).

    >>> import jaxseq as js
    >>> js.step_work(js.LSTM(8), (2, 3))  # 6 * 8 * 4 * 8
    1536
    """
    n = int(np.prod(batch_shape, dtype=np.int64))
    g = int(getattr(cell, "num_gates", 1))
    return n * cell.hidden_size * g * cell.hidden_size
