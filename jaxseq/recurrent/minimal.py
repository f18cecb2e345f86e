"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates from the input only.

Both cells compute, from ``x_t`` alone, a coefficient ``a_t`` and an input
``b_t`` and update ``h_t = a_t * h_{t-1} + b_t``: a diagonal linear
recurrence, so a whole sequence is solved by :func:`jaxseq.linear_recurrence`
(sequentially or in parallel over time) after ONE input projection
``[T*B, D] x [D, G*H]``, while ``step`` still runs one token at a time for
generation, with the same parameters and results::

    minGRU:   z = sigmoid(x W_z + b_z),  h~ = cand(x W_h + b_h)
              h_t = (1 - z) * h_{t-1} + z * h~
    minLSTM:  f = sigmoid(x W_f + b_f),  i = sigmoid(x W_i + b_i),  h~ = cand(x W_h + b_h)
              h_t = f / (f + i) * h_{t-1} + i / (f + i) * h~

``cand`` is the paper's ``g(x) = x + 0.5`` for ``x >= 0``, ``sigmoid(x)``
otherwise (the default, ``candidate="g"``: positive candidates, as the
paper's parallel models), ``"identity"`` (the paper's sequential form) or
``"tanh"``.

**Numerics** (linear space, not the paper's log space): the gates are formed
stably, ``1 - z = sigmoid(-k)`` rather than a subtraction, and minLSTM's
normalised gates as ``f / (f + i) = sigmoid(softplus(-i) - softplus(-f))``
(the log-space ratio, without ever forming ``f + i``). The recurrence is
solved by composition only (see :mod:`jaxseq.recurrent.linear`): a product of
many gates near 0 underflows to 0, its exact limit, and nothing divides by
it, so long sequences stay finite without the log-space scan, and ``h`` may
take any sign. All arithmetic runs in float32 (float64 for float64 params).

Params: ``w_ih [D, G*H]`` (gate blocks concatenated, ``[in, out]`` as the
other cells) and ``b [G*H]``; there is no ``w_hh``. Carry: ``RNNCarry(h)``.

Rollouts: ``js.rollout(cell, ...)`` calls the cell's own :meth:`rollout`:
``kernel="auto"`` (and ``"fused"``) runs :func:`jaxseq.linear_recurrence`
with the cell's ``mode``/``chunk``; ``kernel="scan"`` (and ``"auto"`` under
``jax.jvp``) steps the cell through ``lax.scan`` exactly as any other cell.
Both have the semantics of :func:`jaxseq.rollout` (lengths, resets, reverse).
With ``mesh`` and ``sequence_axis`` (sequence parallelism) the solve is split
along ``T`` over the mesh axis (:func:`jaxseq.linear_recurrence` with the same
arguments); the projections, pointwise in time, need no change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq.recurrent.cells import RNNCarry, _CellBase
from jaxseq.recurrent.dispatch import under_forward_mode
from jaxseq.recurrent.linear import LINEAR_MODES, linear_recurrence, solve
from jaxseq.recurrent.rollouts import RolloutOptions, run
from jaxseq.recurrent.sequence import Sequence, compute_dtype

__all__ = [
    "MinGRU",
    "MinGRUParams",
    "MinLSTM",
    "MinLSTMParams",
]

CANDIDATES = ("g", "identity", "tanh")


class MinGRUParams(NamedTuple):
    """minGRU weights, gate blocks z, h~: ``w_ih [D, 2H]``, ``b [2H]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.MinGRU(4).init(jax.random.key(0), 3)]
    [(3, 8), (8,)]
    """

    w_ih: jax.Array  # [D, 2H], blocks z, h~
    b: jax.Array  # [2H]


class MinLSTMParams(NamedTuple):
    """minLSTM weights, gate blocks f, i, h~: ``w_ih [D, 3H]``, ``b [3H]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.MinLSTM(4).init(jax.random.key(0), 3)]
    [(3, 12), (12,)]
    """

    w_ih: jax.Array  # [D, 3H], blocks f, i, h~
    b: jax.Array  # [3H]


def _g(x):
    """The paper's positive candidate: ``x + 0.5`` for ``x >= 0``, ``sigmoid(x)`` below."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def _candidate(name: str, x):
    if name == "g":
        return _g(x)
    if name == "tanh":
        return jnp.tanh(x)
    return x


class _StepView:
    """The cell seen as a plain cell (no ``rollout`` method): ``js.rollout`` scans its step."""

    def __init__(self, cell):
        self._cell = cell

    def __getattr__(self, name):
        if name == "rollout":
            raise AttributeError(name)
        return getattr(self._cell, name)


class _MinimalBase(_CellBase):
    """Shared machinery of :class:`MinGRU` and :class:`MinLSTM`."""

    hidden_size: int
    candidate: str
    mode: str
    chunk: Any
    kernel_init: Any
    bias_init: Any
    recurrent_init: ClassVar[Any] = None  # type: ignore[misc]  # no recurrent weights
    # honours RolloutOptions.mesh / sequence_axis: the projections are pointwise in
    # time, so only the solve is split along T (see jaxseq.rollout)
    sequence_parallel: ClassVar[bool] = True

    def __post_init__(self):
        self._validate_config()
        _checks.check_choice("candidate", self.candidate, CANDIDATES)
        _checks.check_choice("mode", self.mode, LINEAR_MODES)
        if self.chunk is not None:
            _checks.check_positive_int("chunk", self.chunk)

    def init(self, key, input_size: int, dtype=jnp.float32):
        """Fresh params for inputs of size ``D = input_size``: ``w_ih [D, G*H]`` (LeCun
        normal per gate block unless ``kernel_init``), ``b [G*H]`` (zeros unless ``bias_init``)."""
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        h, g = self.hidden_size, self.num_gates
        k_init = self.kernel_init or inits.lecun_normal()
        b_init = self.bias_init or inits.zeros()
        kx, kb = jax.random.split(key)
        w = jnp.concatenate([k_init(k, (d, h), dtype) for k in jax.random.split(kx, g)], axis=1)
        b = jnp.concatenate([b_init(k, (h,), dtype) for k in jax.random.split(kb, g)], axis=0)
        return self.params_type(w, b)

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are this cell's NamedTuple with ``w_ih [D, G*H]``, ``b [G*H]``."""
        if not isinstance(params, self.params_type):
            raise TypeError(
                f"{name}: expected {self.params_type.__name__} for {type(self).__name__}, "
                f"got {type(params).__name__}"
            )
        h, g = self.hidden_size, self.num_gates
        if params.w_ih.ndim != 2 or params.w_ih.shape[1] != g * h:
            raise ValueError(
                f"{name}.w_ih: expected shape [D, {g * h}] (G*H with G={g}, H={h}), "
                f"got {_checks.describe(params.w_ih)}"
            )
        _checks.check_shape(f"{name}.b", params.b, (g * h,))
        for field in params._fields:
            _checks.check_floating(f"{name}.{field}", getattr(params, field))

    def coefficients(self, params, xp):
        """``(a, b)``, each ``[..., H]`` in float32, of ``h_t = a * h_{t-1} + b`` from ``xp = project(x)``."""
        raise NotImplementedError

    def recur(self, params, carry: RNNCarry, xp: jax.Array):
        """One step given ``xp = project(params, x)``: ``h = a * h_prev + b``."""
        a, b = self.coefficients(params, xp)
        h = (a * carry.h.astype(a.dtype) + b).astype(carry.h.dtype)
        return RNNCarry(h), h

    def rollout(self, params, seq: Sequence, carry, options: RolloutOptions, key=None):
        """The cell over ``seq.xs: [T, *B, D] -> ys: [T, *B, H]`` (run by :func:`jaxseq.rollout`).

        ``kernel="auto"`` or ``"fused"``: one input projection, then the solver of
        :func:`jaxseq.linear_recurrence` with the cell's ``mode`` and ``chunk``
        (``unroll`` and ``checkpoint_every`` are not used: that path saves only
        the coefficients and the states for the backward). ``kernel="scan"``, or
        ``"auto"`` under ``jax.jvp``: the cell's ``step`` scanned like any other
        cell's. ``key`` is not used. Returns ``(RNNCarry(h), ys)``, zeros at
        padded steps. Both paths agree to float32 rounding; with a bfloat16 carry
        the step path rounds ``h`` to bfloat16 after every step, the parallel
        path once at the end.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> cell = js.MinGRU(4)
        >>> params = cell.init(jax.random.key(0), 3)
        >>> carry, ys = js.rollout(cell, params, jnp.ones((6, 2, 3)), lengths=jnp.array([6, 2]))
        >>> ys.shape, bool(jnp.all(ys[2:, 1] == 0))
        ((6, 2, 4), True)
        """
        kernel = options.kernel
        forward_mode = kernel == "auto" and under_forward_mode(params, seq.xs, carry)
        split = options.sequence_axis is not None  # kernel="scan" refused by run()
        if not split and (kernel == "scan" or forward_mode):
            scan = dataclasses.replace(options, kernel="scan")
            return run(_StepView(self), params, seq, carry, scan)
        if carry is None:
            carry = self.initial_carry(seq.batch_shape, compute_dtype(params, seq.xs))
        a, b = self.coefficients(params, self.project(params, seq.xs))
        h0 = carry.h.astype(a.dtype)
        if split:  # the solve on the mesh ("associative" under jax.jvp: the others are
            # custom_vjps); the projection and coefficients are pointwise in time
            h_last, ys = linear_recurrence(
                a, b, h0, reset=seq.reset, lengths=seq.lengths, reverse=options.reverse,
                mode="associative" if forward_mode else self.mode, chunk=self.chunk,
                mesh=options.mesh, sequence_axis=options.sequence_axis,
            )  # fmt: skip
        else:
            h_last, ys = solve(
                a, b, h0, valid=seq.valid, reset=seq.reset, reverse=options.reverse,
                mode=self.mode, chunk=self.chunk,
            )  # fmt: skip
        dtype = carry.h.dtype
        return RNNCarry(h_last.astype(dtype)), ys.astype(dtype)


@dataclasses.dataclass(frozen=True)
class MinGRU(_MinimalBase):
    r"""minGRU: ``h_t = (1 - z_t) h_{t-1} + z_t h~_t``, gates from ``x_t`` only (see the module).

    Args:
      hidden_size: H.
      candidate: ``"g"`` (default, the paper's positive ``g``), ``"identity"`` or ``"tanh"``.
      mode: how rollouts solve the recurrence, a mode of :func:`jaxseq.linear_recurrence`
        (default ``"auto"``).
      chunk: the chunk length of ``mode="chunked"`` (default: chosen from T).
      kernel_init: initialiser of the ``w_ih`` blocks (default LeCun normal).
      bias_init: initialiser of ``b`` (default zeros).

    Carry: ``RNNCarry(h)``. Params: ``MinGRUParams(w_ih [D, 2H], b [2H])``, blocks z, h~.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.MinGRU(4)
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> xs = jax.random.normal(jax.random.key(1), (6, 2, 3))
    >>> carry, ys = js.rollout(cell, params, xs)  # parallel over time
    >>> _, ys_steps = js.rollout(cell, params, xs, kernel="scan")  # one step at a time
    >>> ys.shape, bool(jnp.allclose(ys, ys_steps, atol=1e-6))
    ((6, 2, 4), True)
    """

    hidden_size: int
    candidate: str = "g"
    mode: str = "auto"
    chunk: Any = None
    kernel_init: Any = None
    bias_init: Any = None

    num_gates: ClassVar[int] = 2
    carry_type: ClassVar[type] = RNNCarry
    params_type: ClassVar[type] = MinGRUParams

    def coefficients(self, params, xp):
        """``a = 1 - z = sigmoid(-k)``, ``b = z * cand(h~)`` from ``xp [..., 2H]``."""
        k, hh = jnp.split(xp, 2, axis=-1)
        return jax.nn.sigmoid(-k), jax.nn.sigmoid(k) * _candidate(self.candidate, hh)


@dataclasses.dataclass(frozen=True)
class MinLSTM(_MinimalBase):
    r"""minLSTM: ``h_t = f'_t h_{t-1} + i'_t h~_t`` with ``f' = f / (f + i)``, ``i' = i / (f + i)``.

    Gates from ``x_t`` only (see the module). Args as :class:`MinGRU`. Carry:
    ``RNNCarry(h)`` (no cell state). Params: ``MinLSTMParams(w_ih [D, 3H], b [3H])``,
    blocks f, i, h~.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.MinLSTM(4, candidate="tanh")
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> carry, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
    >>> y.shape, bool(jnp.all(jnp.abs(y) < 1))
    ((2, 4), True)
    """

    hidden_size: int
    candidate: str = "g"
    mode: str = "auto"
    chunk: Any = None
    kernel_init: Any = None
    bias_init: Any = None

    num_gates: ClassVar[int] = 3
    carry_type: ClassVar[type] = RNNCarry
    params_type: ClassVar[type] = MinLSTMParams

    def coefficients(self, params, xp):
        """``a = f / (f + i)``, ``b = i / (f + i) * cand(h~)`` from ``xp [..., 3H]``, in log-ratio form."""
        f, i, hh = jnp.split(xp, 3, axis=-1)
        sf, si = jax.nn.softplus(-f), jax.nn.softplus(-i)  # -log sigmoid
        return jax.nn.sigmoid(si - sf), jax.nn.sigmoid(sf - si) * _candidate(self.candidate, hh)
