"""Rollouts: run a cell over a sequence with ``jax.lax.scan`` (or a Python loop).

Time-major by default: ``xs: [T, *B, D] -> ys: [T, *B, H]``; ``*B`` is any
number of batch dims, none for per-example use under ``jax.vmap``. With
``time_major=False`` (as in Flax, Keras and PyTorch's ``batch_first``) the
inputs are ``xs: [*B, T, D]``, the outputs ``ys: [*B, T, H]`` and ``reset:
bool[*B, T]``; ``lengths`` and carries are the same in both layouts. The
batch-major layout costs one transpose of the inputs and one of the outputs
(:func:`to_time_major`, :func:`from_time_major`), done once at the outermost call.

Semantics shared by :func:`rollout` and :func:`rollout_unrolled`:

* ``lengths: int[*B]`` (right padding): steps ``t >= lengths[b]`` leave that
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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.masks import lengths_to_mask
from jaxseq.recurrent import dispatch, kernels

__all__ = [
    "rollout",
    "rollout_unrolled",
]


def _check_time_major(time_major) -> bool:
    if not isinstance(time_major, bool | np.bool_):
        raise TypeError(
            f"time_major: expected a Python bool (True: xs [T, *B, D], False: xs [*B, T, D]), "
            f"got {type(time_major).__name__} {time_major!r}"
        )
    return bool(time_major)


def to_time_major(layer, params, xs, lengths=None, reset=None):
    """Validates batch-major arguments and returns ``(xs, reset)`` time-major.

    ``xs: [*B, T, D] -> [T, *B, D]`` and ``reset: bool[*B, T] -> bool[T, *B]``
    (None stays None). Every check that names a shape runs here, on the arrays
    as they were given, so errors describe the batch-major shapes: ``xs`` (a
    floating array of at least 2 dims), its last dim against ``layer``'s
    ``check_input`` when it has one (after its ``check_params``), the shape of
    ``lengths`` (``[*B]``) and of ``reset``. Values (``lengths`` in ``[0, T]``)
    are checked by the rollout itself.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> from jaxseq.recurrent.rollouts import to_time_major
    >>> cell = js.GRU(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> xs, reset = to_time_major(cell, params, jnp.ones((2, 5, 3)), reset=jnp.zeros((2, 5), bool))
    >>> xs.shape, reset.shape
    ((5, 2, 3), (5, 2))
    >>> to_time_major(cell, params, jnp.ones((2, 5, 3)), reset=jnp.zeros((5, 2), bool))
    Traceback (most recent call last):
    ...
    ValueError: reset: expected shape [2, 5] ([*B, T] of xs float32[2, 5, 3], batch-major), got bool[5, 2]
    """
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(
            f"xs: expected an array [*B, T, D] (time_major=False), got {type(xs).__name__}"
        )
    _checks.check_floating("xs", xs)
    _checks.check_min_ndim("xs", xs, 2, "[*B, T, D] (time_major=False)")
    if callable(getattr(layer, "check_input", None)):
        if callable(getattr(layer, "check_params", None)):
            layer.check_params(params)
        layer.check_input(params, xs, name="xs", min_ndim=2)
    t = xs.shape[-2]
    batch_shape = tuple(xs.shape[:-2])
    if lengths is not None:
        _checks.check_lengths(lengths, batch_shape, xs)
    if reset is not None:
        reset = _checks.as_array("reset", reset)
        _checks.check_bool("reset", reset)
        if tuple(reset.shape) != (*batch_shape, t):
            raise ValueError(
                f"reset: expected shape {[*batch_shape, t]} ([*B, T] of xs "
                f"{_checks.describe(xs)}, batch-major), got {_checks.describe(reset)}"
            )
        reset = jnp.moveaxis(reset, -1, 0)
    return jnp.moveaxis(xs, -2, 0), reset


def from_time_major(ys):
    """``ys: [T, *B, H] -> [*B, T, H]`` (the inverse of :func:`to_time_major` on ``xs``).

    >>> import jax.numpy as jnp
    >>> from jaxseq.recurrent.rollouts import from_time_major
    >>> from_time_major(jnp.zeros((5, 2, 4))).shape
    (2, 5, 4)
    """
    return jnp.moveaxis(ys, 0, -2)


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


def _prepare(cell, params, xs, carry, lengths, reset):
    """Validates the rollout arguments; returns (xs, batch_shape, T, carry, lengths, reset)."""
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs: expected an array [T, *B, D], got {type(xs).__name__}")
    _checks.check_floating("xs", xs)
    _checks.check_min_ndim("xs", xs, 2, "[T, *B, D]")
    if hasattr(cell, "check_params"):
        cell.check_params(params)
        cell.check_input(params, xs, name="xs", min_ndim=2)
    t = xs.shape[0]
    batch_shape = tuple(xs.shape[1:-1])

    if carry is None:
        carry = cell.initial_carry(batch_shape)
    elif hasattr(cell, "check_carry"):
        cell.check_carry(carry, batch_shape)
    else:
        ref = jax.eval_shape(lambda: cell.initial_carry(batch_shape))
        _checks.check_tree_matches("carry", carry, ref, "the cell's carry")

    if lengths is not None:
        lengths = _checks.check_lengths(lengths, batch_shape, xs)
        _checks.check_in_range("lengths", lengths, 0, t, f" (T={t})")
        lengths = lengths.astype(jnp.int32)
        # Padded steps must not reach any arithmetic: whatever they hold (NaN,
        # inf) would enter the hoisted projection xs @ w_ih and the weight
        # gradient xs^T dG (NaN * 0 is NaN) although their outputs are masked.
        # Selected away here, once for every path (fused, scan, unrolled); the
        # select also makes the gradient w.r.t. xs exactly 0 at padded steps.
        valid = valid_steps(lengths, t)[..., None]
        xs = jnp.where(valid, xs, jnp.zeros((), xs.dtype))

    if reset is not None:
        reset = _checks.as_array("reset", reset)
        _checks.check_bool("reset", reset)
        if tuple(reset.shape) != (t, *batch_shape):
            raise ValueError(
                f"reset: expected shape {[t, *batch_shape]} ([T, *B] of xs "
                f"{_checks.describe(xs)}), got {_checks.describe(reset)}"
            )
    return xs, batch_shape, t, carry, lengths, reset


def _expand(mask, leaf):
    """``mask: [*B]`` -> broadcastable against ``leaf: [*B, H]``."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def _select(mask, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(_expand(mask, n), n, o), new, old)


def valid_steps(lengths, t: int):
    """``bool[T, *B]``: ``mask[t, b] = t < lengths[b]`` (time-major; ``T`` may be 0).

    >>> import jax.numpy as jnp
    >>> valid_steps(jnp.array([1, 3]), 3).astype(int)
    Array([[1, 1],
           [0, 1],
           [0, 1]], dtype=int32)
    """
    if t == 0:
        return jnp.zeros((0, *jnp.shape(lengths)), bool)
    return lengths_to_mask(lengths, t)


def processing_resets(reset, lengths, reverse: bool):
    """Reset flags in processing order: ``out[t]`` resets the carry before step ``t``.

    Flags at padded steps are dropped; in reverse, the flag of step ``t`` resets
    the carry before step ``t - 1`` (the episode boundary keeps its forward meaning).
    ``reset: bool[T, *B]``, ``lengths: int[*B]`` or None.

    >>> import jax.numpy as jnp
    >>> reset = jnp.array([[False], [True], [True]])
    >>> processing_resets(reset, jnp.array([2]), reverse=False)[:, 0].tolist()
    [False, True, False]
    >>> processing_resets(reset, None, reverse=True)[:, 0].tolist()
    [True, True, False]
    """
    if reset is None:
        return None
    if lengths is not None:
        reset = reset & valid_steps(lengths, reset.shape[0])
    if reverse:
        reset = jnp.concatenate([reset[1:], jnp.zeros_like(reset[:1])], axis=0)
    return reset


def resolve_unroll(unroll, t: int, work: int | None = None) -> int:
    """Turns the ``unroll`` argument into a positive int for ``lax.scan``.

    ``"auto"`` asks :func:`~jaxseq.recurrent.dispatch.auto_unroll` (``work``: multiply-adds
    of one step's recurrent matmul, when known); ``True`` unrolls all ``T`` steps.

    >>> resolve_unroll(True, 7), resolve_unroll(2, 7)
    (7, 2)
    """
    if unroll is True:
        return max(t, 1)
    if isinstance(unroll, str) and unroll == "auto":
        return dispatch.auto_unroll(t, work)
    if isinstance(unroll, bool) or not isinstance(unroll, int | np.integer) or unroll < 1:
        raise ValueError(f"unroll: expected a positive int, True or 'auto', got {unroll!r}")
    return int(unroll)


def _check_checkpoint_every(checkpoint_every):
    if checkpoint_every is None:
        return None
    return _checks.check_positive_int("checkpoint_every", checkpoint_every)


def _make_step(cell, params, lengths, hoisted: bool):
    """Body of one time step with lengths/reset handling; ``inp = (x_or_xp, t, reset_t)``."""

    def body(carry, inp):
        x_t, t, r_t, zero_carry = inp
        prev = carry
        if r_t is not None:
            carry = _select(r_t, zero_carry, carry)
        if hoisted:
            new, y = cell.recur(params, carry, x_t)
        else:
            new, y = cell.step(params, carry, x_t)
        if lengths is not None:
            valid = t < lengths
            new = _select(valid, new, prev)
            y = jnp.where(_expand(valid, y), y, jnp.zeros_like(y))
        return new, y

    return body


def rollout(
    layer,
    params,
    xs,
    carry=None,
    *,
    lengths=None,
    reset=None,
    reverse=False,
    unroll="auto",
    kernel="auto",
    checkpoint_every=None,
    time_major=True,
    key=None,
):
    """Runs any sequence layer over ``xs: [T, *B, D] -> ys: [T, *B, H]`` (time-major).

    ``layer`` is either

    * a :class:`~jaxseq.protocols.SequenceLayer` (an object with a ``rollout``
      method: ``js.Bidirectional``, ``js.Stack``, a user layer): this calls
      ``layer.rollout(params, xs, carry, lengths=..., reset=..., reverse=...,
      unroll=..., kernel=..., checkpoint_every=..., key=...)`` with the defaults
      below, so every layer runs with the same defaults (always time-major:
      ``time_major`` is handled here and never passed on); or
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
      carry: initial carry for batch ``*B``; zeros when None.
      lengths: optional ``int[*B]`` valid lengths (see module docstring).
      reset: optional ``bool[T, *B]`` episode starts (see module docstring).
      reverse: run backwards over each sequence's valid part; outputs stay in
        original time order. For ``js.Bidirectional`` it swaps the directions,
        for ``js.Stack`` every layer is reversed (see their ``rollout``).
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
        ``reset: [T, *B]``. False: batch-major, ``xs: [*B, T, D]``,
        ``ys: [*B, T, H]``, ``reset: [*B, T]``; ``lengths``, ``carry`` and the
        final carry are unchanged. The inputs are transposed once on the way in
        and the outputs once on the way out, around the same time-major
        rollout, so results (values, carries, gradients) are exactly those of
        the time-major call on transposed arrays, and the compiled scan loops
        are the same. Measured on 2 CPU cores (``python -m benchmarks.batch_major``),
        an LSTM training step (value and grad) at ``(B, H, T) = (32, 256, 100)``
        took 1.003x the time of the time-major one (interleaved medians); the
        four transposes (inputs, outputs and their cotangents) alone take 1-2%
        of that step.
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
    """
    if not _check_time_major(time_major):
        xs, reset = to_time_major(layer, params, xs, lengths, reset)
        carry, ys = rollout(
            layer,
            params,
            xs,
            carry,
            lengths=lengths,
            reset=reset,
            reverse=reverse,
            unroll=unroll,
            kernel=kernel,
            checkpoint_every=checkpoint_every,
            key=key,
        )
        return carry, from_time_major(ys)
    if _is_layer(layer):
        return layer.rollout(
            params,
            xs,
            carry,
            lengths=lengths,
            reset=reset,
            reverse=reverse,
            unroll=unroll,
            kernel=kernel,
            checkpoint_every=checkpoint_every,
            key=key,
        )
    cell = layer
    _check_cell(cell, "layer", layers_too=True)
    if key is not None:
        _checks.check_key("key", key)
    xs, batch_shape, t, carry, lengths, reset = _prepare(cell, params, xs, carry, lengths, reset)
    _checks.check_choice("kernel", kernel, dispatch.KERNELS)
    k = _check_checkpoint_every(checkpoint_every)
    use_fused = dispatch.choose_fused(kernel, cell, params, xs, carry)
    work = dispatch.step_work(cell, batch_shape) if dispatch.supports_fused(cell) else None
    n_unroll = resolve_unroll(unroll, t, work)
    reset_p = processing_resets(reset, lengths, reverse)

    if use_fused:
        n_inference = None
        if isinstance(unroll, str) and unroll == "auto":
            gates = int(getattr(cell, "num_gates", 1))
            n_inference = dispatch.auto_unroll(t, work, inference=True, gates=gates)
        return kernels.fused_rollout(
            cell,
            params,
            xs,
            carry,
            valid=None if lengths is None else valid_steps(lengths, t),
            reset=reset_p,
            reverse=reverse,
            unroll=n_unroll,
            checkpoint_every=k,
            inference_unroll=n_inference,
        )

    hoisted = callable(getattr(cell, "project", None)) and callable(getattr(cell, "recur", None))
    inputs = cell.project(params, xs) if hoisted else xs
    steps = jnp.arange(t, dtype=jnp.int32)
    if k is not None and k < t:
        # Pad to whole segments with steps that count as padding (t >= lengths).
        n_seg = -(-t // k)
        pad = n_seg * k - t
        if pad:
            if lengths is None:
                lengths = jnp.full(batch_shape, t, jnp.int32)
            inputs = jnp.concatenate(
                [inputs, jnp.zeros((pad,) + inputs.shape[1:], inputs.dtype)], axis=0
            )
            steps = jnp.arange(t + pad, dtype=jnp.int32)
            if reset_p is not None:
                reset_p = jnp.concatenate(
                    [reset_p, jnp.zeros((pad,) + reset_p.shape[1:], bool)], axis=0
                )
    zero_carry = jax.tree_util.tree_map(jnp.zeros_like, carry)
    body = _make_step(cell, params, lengths, hoisted)

    def scan_body(c, inp):
        x_t, step_idx, r_t = inp
        return body(c, (x_t, step_idx, r_t, zero_carry))

    def run(c, seq):
        n = seq[1].shape[0]
        return jax.lax.scan(scan_body, c, seq, reverse=reverse, unroll=min(n_unroll, max(n, 1)))

    if k is None or k >= t:
        return run(carry, (inputs, steps, reset_p))

    def seg(a):
        return None if a is None else a.reshape((-1, k) + a.shape[1:])

    carry, ys = jax.lax.scan(
        jax.checkpoint(run), carry, (seg(inputs), seg(steps), seg(reset_p)), reverse=reverse
    )
    return carry, ys.reshape((-1,) + ys.shape[2:])[:t]


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
    if not _check_time_major(time_major):
        xs, reset = to_time_major(cell, params, xs, lengths, reset)
        carry, ys = rollout_unrolled(
            cell, params, xs, carry, lengths=lengths, reset=reset, reverse=reverse
        )
        return carry, from_time_major(ys)
    xs, batch_shape, t, carry, lengths, reset = _prepare(cell, params, xs, carry, lengths, reset)
    reset_p = processing_resets(reset, lengths, reverse)
    zero_carry = jax.tree_util.tree_map(jnp.zeros_like, carry)
    body = _make_step(cell, params, lengths, hoisted=False)
    ys = [None] * t
    order = range(t - 1, -1, -1) if reverse else range(t)
    for i in order:
        r_t = None if reset_p is None else reset_p[i]
        carry, ys[i] = body(carry, (xs[i], jnp.int32(i), r_t, zero_carry))
    if t == 0:
        probe = jnp.zeros(xs.shape[1:], xs.dtype)
        y_shape = jax.eval_shape(lambda: cell.step(params, carry, probe))[1]
        return carry, jnp.zeros((0, *y_shape.shape), y_shape.dtype)
    return carry, jnp.stack(ys)
