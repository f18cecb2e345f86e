"""Rollouts: run a cell over a sequence with ``jax.lax.scan`` (or a Python loop).

Time-major by default: ``xs: [T, *B, D] -> ys: [T, *B, H]``; ``*B`` is any
number of batch dims, none for per-example use under ``jax.vmap``. With
``time_major=False`` (as in Flax, Keras and PyTorch's ``batch_first``) the
inputs are ``xs: [*B, T, D]``, the outputs ``ys: [*B, T, H]`` and ``reset``,
``mask: bool[*B, T]``; ``lengths`` and carries are the same in both layouts.
The batch-major layout costs one transpose of the inputs and one of the
outputs, done once, in :func:`rollout` only.

**The route.** :func:`rollout` is the boundary: it checks every argument once
(:func:`~jaxseq.recurrent.prepare` returns the inputs as a time-major
:class:`~jaxseq.recurrent.Sequence` with the padding mask built once, and the
settings become one :class:`RolloutOptions`), then :func:`run` hands them down
without checking again: a sequence layer's ``rollout`` method gets them as they
are (a :class:`~jaxseq.Stack` runs each of its layers through :func:`run`), and
a cell gets one :class:`~jaxseq.recurrent.dispatch.Plan` from
:func:`~jaxseq.recurrent.dispatch.plan` and runs the kernel it names
(:mod:`jaxseq.recurrent.kernels`).

Semantics shared by :func:`rollout` and :func:`rollout_unrolled`:

* ``lengths: int[*B]`` (right padding; or the equivalent ``mask: bool[T, *B]``,
  ``mask[t, b] = t < lengths[b]``): steps ``t >= lengths[b]`` leave that
  sequence's carry unchanged and output zeros, so the returned carry is the one
  after its last valid step (PyTorch packed-sequence semantics). A length of 0
  is valid: the initial carry comes back with all-zero outputs. The inputs at
  padded steps are never used: whatever they hold (NaN, inf) is selected away
  before any arithmetic, so it changes no output, carry or gradient, and the
  gradient with respect to them is exactly 0.
* ``reset: bool[T, *B]``: ``reset[t, b]`` marks step ``t`` as the first step of
  a new episode/document: the carry of sequence ``b`` is set back to zeros
  (the cell's ``initial_carry``) before step ``t``. Flags at padded steps are
  ignored.
* ``reverse=True`` runs each sequence backwards over its valid part only
  (from ``lengths[b] - 1`` down to 0) and returns outputs in the original time
  order, so a bidirectional layer is correct under padding. Episode boundaries
  keep their forward-time meaning: the backward carry is reset when it crosses
  from step ``t`` to ``t - 1`` where ``reset[t]`` is set.

:func:`rollout` runs cells and every sequence layer (an object with a
``rollout`` method, see :class:`jaxseq.protocols.SequenceLayer`) with the same
arguments and defaults; :func:`rollout_unrolled` is the cell-only reference.
Masks from ``lengths`` come from :func:`jaxseq.masks.lengths_to_mask`.

**Dtypes.** A rollout computes in the result type of ``xs`` and the floating
params (:func:`~jaxseq.recurrent.sequence.compute_dtype`): all-bfloat16 params
and inputs give bfloat16 outputs and carries, float32 params with bfloat16
inputs give float32. ``carry=None`` starts from zeros in that dtype; a given
carry must have it too (a ``TypeError`` names the leaf otherwise), so a carry
never changes the dtype of a model's outputs behind its back.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.recurrent import _sequence_parallel as seqpar
from jaxseq.recurrent import dispatch, kernels
from jaxseq.recurrent.sequence import Sequence, compute_dtype, prepare, processing_resets

__all__ = [
    "RolloutOptions",
    "rollout",
    "rollout_unrolled",
    "run",
]


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
    """The settings of a rollout, checked once and handed down the route unchanged.

    Fields (their meaning is documented once, in :func:`rollout`): ``reverse``,
    ``unroll``, ``kernel``, ``checkpoint_every``, ``mesh`` and ``sequence_axis``
    (sequence parallelism: both or neither). A :class:`~jaxseq.Bidirectional`
    runs its backward half with ``dataclasses.replace(options, reverse=...)``.
    The options are hashable (an eager :func:`rollout` compiles once per options).

    A layer honours ``mesh``/``sequence_axis`` only when it says so with a class
    attribute ``sequence_parallel = True`` (MinGRU, MinLSTM, RG-LRU, mLSTM, and
    :class:`~jaxseq.Stack` and :class:`~jaxseq.Bidirectional`, which hand the
    options to their layers); :func:`run` refuses every other layer and cell.

    >>> import jaxseq as js
    >>> js.recurrent.RolloutOptions(kernel="scan").unroll
    'auto'
    >>> js.recurrent.RolloutOptions(unroll=0)
    Traceback (most recent call last):
    ...
    ValueError: unroll: expected a positive int, True or 'auto', got 0
    >>> js.recurrent.RolloutOptions(sequence_axis="seq")
    Traceback (most recent call last):
    ...
    ValueError: mesh, sequence_axis: expected both (sequence parallelism) or neither, got mesh=None, sequence_axis='seq'
    """

    reverse: bool = False
    unroll: Any = "auto"
    kernel: str = "auto"
    checkpoint_every: int | None = None
    mesh: Any = None
    sequence_axis: Any = None

    def __post_init__(self):
        if not isinstance(self.reverse, bool | np.bool_):
            raise TypeError(
                f"reverse: expected a Python bool, got {type(self.reverse).__name__} {self.reverse!r}"
            )
        object.__setattr__(self, "reverse", bool(self.reverse))
        dispatch.resolve_unroll(self.unroll, 1)
        _checks.check_choice("kernel", self.kernel, dispatch.KERNELS)
        if self.checkpoint_every is not None:
            k = _checks.check_positive_int("checkpoint_every", self.checkpoint_every)
            object.__setattr__(self, "checkpoint_every", k)
        seqpar.check_mesh(self.mesh, self.sequence_axis, 0)  # T is checked by rollout


_NOT_LINEAR = (
    "its carry update is not a linear recurrence with coefficients from the inputs "
    "alone (a cell's gates read its carry), so a slice of steps cannot start before "
    "the slice ahead of it has ended"
)


def check_sequence_parallel(layer, options: RolloutOptions) -> None:
    """Raises a ``ValueError`` naming ``sequence_axis`` when ``options`` split ``T`` over a
    mesh axis and ``layer`` cannot run so: it has no ``sequence_parallel = True``, or
    ``kernel="scan"`` asks for its step path, which cannot be split (only the
    whole-sequence solves can).

    >>> import jax, jaxseq as js
    >>> opts = js.recurrent.RolloutOptions(mesh=jax.make_mesh((1,), ("seq",)), sequence_axis="seq")
    >>> check_sequence_parallel(js.MinGRU(4), opts)  # a linear recurrence: fine
    >>> check_sequence_parallel(js.LSTM(4), opts)
    Traceback (most recent call last):
    ...
    ValueError: sequence_axis: LSTM cannot split T over the mesh axis 'seq': its carry update ...
    """
    if options.sequence_axis is None:
        return
    name = type(layer).__name__
    if getattr(layer, "sequence_parallel", False) is True:
        if options.kernel == "scan":
            raise ValueError(
                f"sequence_axis: {name} splits T over a mesh axis only in its whole-sequence "
                f"solve, not step by step; got kernel='scan' with "
                f"sequence_axis={options.sequence_axis!r} (use kernel='auto' or 'fused')"
            )
        return
    raise ValueError(
        f"sequence_axis: {name} cannot split T over the mesh axis "
        f"{options.sequence_axis!r}: {_NOT_LINEAR}. Layers that can: js.MinGRU, js.MinLSTM, "
        f"js.recurrent.RGLRU, js.recurrent.MLSTM, and js.Stack / js.Bidirectional of them "
        f"(a layer of your own "
        f"that honours options.mesh and options.sequence_axis sets sequence_parallel = True); "
        f"run this one without mesh and sequence_axis"
    )


def _is_layer(layer) -> bool:
    """A :class:`~jaxseq.protocols.SequenceLayer`: runs itself through ``rollout``."""
    return callable(getattr(layer, "rollout", None))


def _check_cell(cell, name: str, layers_too: bool) -> None:
    for method in ("init", "initial_carry", "step"):
        if not callable(getattr(cell, method, None)):
            if layers_too:
                raise TypeError(
                    f"{name}: expected a cell (init/initial_carry/step methods) or a sequence "
                    f"layer (a rollout method), got {type(cell).__name__} without "
                    f"'{method}' or 'rollout'"
                )
            raise TypeError(
                f"{name}: expected a cell with init/initial_carry/step methods, "
                f"got {type(cell).__name__} without '{method}'"
            )


def _takes_dtype(initial_carry) -> bool:
    try:
        params = inspect.signature(initial_carry).parameters.values()
    except (TypeError, ValueError):
        return True
    kinds = {p.kind for p in params}
    return inspect.Parameter.VAR_KEYWORD in kinds or any(p.name == "dtype" for p in params)


def zero_carry(layer, batch_shape, dtype):
    """``layer.initial_carry(batch_shape, dtype)`` (without ``dtype`` for a user cell
    whose ``initial_carry`` takes none).

    >>> import jax.numpy as jnp, jaxseq as js
    >>> zero_carry(js.LSTM(3), (2,), jnp.bfloat16).c.dtype
    dtype(bfloat16)
    """
    if _takes_dtype(layer.initial_carry):
        return layer.initial_carry(batch_shape, dtype=dtype)
    return layer.initial_carry(batch_shape)


def _check_carry_dtype(carry, dtype) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(carry):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            if leaf.dtype != dtype:
                where = "carry" + jax.tree_util.keystr(path)
                raise TypeError(
                    f"{where}: expected dtype {dtype} (the dtype the rollout computes in: the "
                    f"result type of params and xs), got {_checks.describe(leaf)}; pass "
                    f"carry=None for zeros, or cast the carry (or the params) to one dtype"
                )


def _check_carry(layer, params, seq: Sequence, carry) -> None:
    """The boundary's carry check: structure, shapes and dtype (None: zeros, always fine)."""
    if carry is None:
        return
    dtype = compute_dtype(params, seq.xs)
    if callable(getattr(layer, "check_carry", None)):
        layer.check_carry(carry, seq.batch_shape)
    _check_carry_dtype(carry, dtype)
    if not _is_layer(layer) and not callable(getattr(layer, "check_carry", None)):
        ref = jax.eval_shape(lambda: zero_carry(layer, seq.batch_shape, dtype))
        _checks.check_tree_matches("carry", carry, ref, "the cell's carry")


def run(layer, params, seq: Sequence, carry, options: RolloutOptions, key=None):
    """Runs a cell or sequence layer over an already validated :class:`~jaxseq.recurrent.Sequence`.

    The inside of the route (:func:`rollout` checks, then calls this): a
    sequence layer's ``rollout(params, seq, carry, options, key)`` method runs as
    it is; a cell gets its plan and kernel. Nothing is checked again, so a layer
    made of other layers (as :class:`~jaxseq.Stack` is) calls this for each of
    them. ``carry=None`` starts a cell from zeros in the rollout's dtype. With
    ``options.sequence_axis`` set, a layer without ``sequence_parallel = True``
    is refused (:func:`check_sequence_parallel`).

    Returns ``(final_carry, ys: [T, *B, H])``, time-major.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.GRU(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> seq = js.recurrent.prepare(cell, params, jnp.ones((5, 2, 3)))
    >>> carry, ys = js.recurrent.run(cell, params, seq, None, js.recurrent.RolloutOptions())
    >>> ys.shape
    (5, 2, 4)
    """
    check_sequence_parallel(layer, options)
    if _is_layer(layer):
        return layer.rollout(params, seq, carry, options, key)
    if carry is None:
        carry = zero_carry(layer, seq.batch_shape, compute_dtype(params, seq.xs))
    plan = dispatch.plan(layer, params, seq, carry, options)
    kernel = kernels.scan_rollout if plan.rule is None else kernels.fused_rollout
    return kernel(layer, params, seq, carry, plan)


def _library_layer(layer) -> bool:
    """The layer and every cell or layer inside it (a dataclass field, or a tuple of
    them) are the library's own, which are pure functions of their arguments. A user's
    layer may rely on concrete values or side effects, so it keeps running as called."""
    if not type(layer).__module__.startswith("jaxseq."):
        return False
    if dataclasses.is_dataclass(layer):
        for field in dataclasses.fields(layer):
            value = getattr(layer, field.name)
            for item in value if isinstance(value, tuple | list) else (value,):
                inner = any(callable(getattr(item, m, None)) for m in ("step", "rollout"))
                if inner and not _library_layer(item):
                    return False
    return True


def _compilable(layer, trees) -> bool:
    """True when a call can run as one compiled program: every leaf a concrete array
    (none is a tracer, so no transformation sees inside) and the layer the library's
    own and hashable."""
    for leaf in jax.tree_util.tree_leaves(trees):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array | np.ndarray):
            return False
    try:
        hash(layer)
    except TypeError:
        return False
    return _library_layer(layer)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _run_compiled(layer, params, seq: Sequence, carry, options: RolloutOptions, key, rules):
    del rules  # in the cache key only: a rule registered later makes a new program
    return run(layer, params, seq, carry, options, key)


def rollout(
    layer,
    params,
    xs,
    carry=None,
    *,
    lengths=None,
    mask=None,
    reset=None,
    reverse=False,
    unroll="auto",
    kernel="auto",
    checkpoint_every=None,
    time_major=True,
    mesh=None,
    sequence_axis=None,
    key=None,
):
    """Runs any sequence layer over ``xs: [T, *B, D] -> ys: [T, *B, H]`` (time-major).

    ``layer`` is either

    * a :class:`~jaxseq.protocols.SequenceLayer` (an object with a ``rollout``
      method: ``js.Bidirectional``, ``js.Stack``, ``js.MinGRU``, a user layer):
      after the checks below it gets ``layer.rollout(params, seq, carry, options,
      key)``, the inputs as a :class:`~jaxseq.recurrent.Sequence` and the settings
      as a :class:`RolloutOptions` (see :func:`run`); or
    * a :class:`~jaxseq.protocols.Cell` (``init``/``initial_carry``/``step``):
      a fused kernel for cells whose exact type registered one (``RNN``,
      ``LSTM``, ``GRU``; see :mod:`jaxseq.recurrent.dispatch`), ``lax.scan``
      otherwise. Cells that also have ``project``/``recur``
      (:class:`~jaxseq.protocols.HoistableCell`) get their input projection
      hoisted out of the loop: one ``[T*B, D] x [D, G*H]`` matmul before the scan.

    Args:
      layer: the cell or sequence layer.
      params: its parameters.
      xs: ``[T, *B, D]`` floating inputs, time-major.
      carry: initial carry for batch ``*B``; zeros when None (see "Dtypes" in
        :mod:`jaxseq.recurrent.rollouts`).
      lengths: optional ``int[*B]`` valid lengths (see module docstring).
      mask: optional ``bool[T, *B]`` right-padding mask, instead of ``lengths``
        (for a caller that has the mask: it is used as it is, not rebuilt).
      reset: optional ``bool[T, *B]`` episode starts (see module docstring).
      reverse: run backwards over each sequence's valid part; outputs stay in
        original time order. For ``js.Bidirectional`` it swaps the directions,
        for ``js.Stack`` every layer is reversed.
      unroll: ``lax.scan`` unroll factor: a positive int, ``True`` (fully), or
        ``"auto"`` (default; chosen from the shape and backend by
        :func:`~jaxseq.recurrent.dispatch.auto_unroll`).
      kernel: ``"auto"`` (default): the fused kernel of :mod:`jaxseq.recurrent.kernels`
        (hoisted projection, custom VJP with one-matmul weight gradients) for
        cells whose exact type has a registered rule, except under
        forward-mode autodiff (``jax.jvp``), which gets the scan path. The
        dtype does not change the choice: float64 operands take the fused
        kernel too, which then accumulates in float64;
        ``"fused"``: require the fused kernel (``ValueError`` for other cells);
        ``"scan"``: always the plain ``lax.scan`` path with ordinary autodiff
        (use it for ``jax.jvp`` of an already-jitted function).
      checkpoint_every: None, or ``k``: rematerialise the forward in segments
        of ``k`` steps during the backward (the carry is stored every ``k``
        steps), so the memory saved for the backward drops about ``k``-fold
        (the outputs and inputs themselves stay) for about one more forward
        pass of compute. ``T`` need not be a multiple of ``k``.
      time_major: True (default): ``xs: [T, *B, D]``, ``ys: [T, *B, H]``,
        ``reset``/``mask: [T, *B]``. False: batch-major, ``xs: [*B, T, D]``,
        ``ys: [*B, T, H]``, ``reset``/``mask: [*B, T]``; ``lengths``, ``carry``
        and the final carry are unchanged. The inputs are transposed once on
        the way in and the outputs once on the way out, around the same
        time-major rollout, so results (values, carries, gradients) are exactly
        those of the time-major call on transposed arrays (its cost is in
        ``benchmarks/README.md``).
      mesh: optional ``jax.sharding.Mesh`` for sequence parallelism, with
        ``sequence_axis``, the name of one of its axes: ``T`` is split over that
        axis's ``n`` devices (``T`` a multiple of ``n``: pad it and pass
        ``lengths``), each solving its ``T / n`` steps and exchanging one
        ``[*B, H]`` summary per layer (see :func:`jaxseq.linear_recurrence`);
        same values and gradients as without, up to rounding, with ``lengths``,
        ``reset`` and ``reverse`` as usual. For layers whose recurrence is
        linear with coefficients from the inputs alone (``js.MinGRU``,
        ``js.MinLSTM``, ``js.recurrent.RGLRU``, ``js.recurrent.MLSTM`` (whose
        max-stabiliser combines exactly across slices), and ``js.Stack`` /
        ``js.Bidirectional`` of them; their projections are pointwise in time,
        only the solve is split), with ``kernel`` ``"auto"`` or ``"fused"``.
        Any other layer or cell (``LSTM``, ``GRU``, ``RNN``, sLSTM) is refused
        with a ``ValueError`` naming ``sequence_axis``. Both or neither.
      sequence_axis: the mesh axis ``T`` is split over (see ``mesh``).
      key: optional PRNG key, keyword-only and last, for layers with randomness
        (``js.Stack``'s dropout). A cell is deterministic and ignores it (it is
        still checked to be a key), so generic code may pass a key to any layer.

    Returns:
      ``(final_carry, ys)`` with ``ys: [T, *B, H]`` (``[*B, T, H]`` when
      ``time_major=False``); zeros at padded steps.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.GRU(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> carry, ys = js.rollout(cell, params, jnp.ones((5, 2, 3)), lengths=jnp.array([5, 2]))
    >>> ys.shape, carry.h.shape, bool(jnp.all(ys[2:, 1] == 0))
    ((5, 2, 4), (2, 4), True)
    >>> carry, ys = js.rollout(cell, params, jnp.ones((2, 5, 3)), time_major=False)
    >>> ys.shape  # batch-major: [B, T, H]
    (2, 5, 4)

    Split along ``T`` over a mesh axis (here one device):

    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> layer = js.MinGRU(4)
    >>> params = layer.init(jax.random.key(0), 3)
    >>> xs = jnp.ones((6, 2, 3))
    >>> _, ys = js.rollout(layer, params, xs, mesh=mesh, sequence_axis="seq")
    >>> bool(jnp.allclose(ys, js.rollout(layer, params, xs)[1], atol=1e-6))
    True
    """
    if not _is_layer(layer):
        _check_cell(layer, "layer", layers_too=True)
    options = RolloutOptions(
        reverse, unroll, kernel, checkpoint_every, mesh=mesh, sequence_axis=sequence_axis
    )
    if key is not None:
        _checks.check_key("key", key)
    seq = prepare(layer, params, xs, lengths=lengths, mask=mask, reset=reset, time_major=time_major)
    seqpar.check_mesh(mesh, sequence_axis, seq.t)
    check_sequence_parallel(layer, options)
    _check_carry(layer, params, seq, carry)
    # Called eagerly (concrete arrays, after the checks above, which need them), the
    # route runs as one compiled program instead of op by op: the same operations, one
    # compilation per layer and shapes (cached), and calls as fast as under jit.
    if _compilable(layer, (params, seq, carry, key)):
        rules = tuple((t, id(r)) for t, r in dispatch._RULES.items())
        carry, ys = _run_compiled(layer, params, seq, carry, options, key, rules)
    else:
        carry, ys = run(layer, params, seq, carry, options, key)
    return carry, ys if time_major else jnp.moveaxis(ys, 0, -2)


def rollout_unrolled(
    cell, params, xs, carry=None, *, lengths=None, reset=None, reverse=False, time_major=True
):
    """Same semantics as :func:`rollout`, as a Python loop calling ``cell.step``.

    The reference implementation (and the "unrolled" contender in the
    benchmarks): under ``jit`` it traces ``T`` copies of the step, so compile
    time grows with ``T``. Cells only: ``xs: [T, *B, D] -> ys: [T, *B, H]``,
    or ``xs: [*B, T, D] -> ys: [*B, T, H]`` with ``time_major=False``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.RNN(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> xs = jax.random.normal(jax.random.key(1), (5, 2, 3))
    >>> _, ys = js.rollout_unrolled(cell, params, xs, reverse=True)
    >>> _, want = js.rollout(cell, params, xs, reverse=True)
    >>> ys.shape, bool(jnp.allclose(ys, want, atol=1e-6))
    ((5, 2, 4), True)
    """
    _check_cell(cell, "cell", layers_too=False)
    reverse = RolloutOptions(reverse).reverse
    seq = prepare(cell, params, xs, lengths=lengths, reset=reset, time_major=time_major)
    _check_carry(cell, params, seq, carry)
    if carry is None:
        carry = zero_carry(cell, seq.batch_shape, compute_dtype(params, seq.xs))
    reset_p = processing_resets(seq.reset, seq.valid, reverse)
    body = kernels.step_fn(cell, params, jax.tree_util.tree_map(jnp.zeros_like, carry), False)
    ys = [None] * seq.t
    for i in range(seq.t - 1, -1, -1) if reverse else range(seq.t):
        flags = [None if a is None else a[i] for a in (seq.valid, reset_p)]
        carry, ys[i] = body(carry, (seq.xs[i], *flags))
    if seq.t == 0:
        probe = jnp.zeros(seq.xs.shape[1:], seq.xs.dtype)
        y_shape = jax.eval_shape(lambda: cell.step(params, carry, probe))[1]
        return carry, jnp.zeros((0, *y_shape.shape), y_shape.dtype)
    ys = jnp.stack(ys)
    return carry, ys if time_major else jnp.moveaxis(ys, 0, -2)
