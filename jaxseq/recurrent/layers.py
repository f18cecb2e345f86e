"""Sequence layers built from cells: bidirectional, and stacked (residuals, dropout).

Both are :class:`~jaxseq.protocols.SequenceLayer` s: ``js.rollout(layer, params,
xs, ...)`` runs them through their ``rollout`` method, with the same arguments
and defaults as for a cell; their halves/layers may be cells or any sequence
layer. Time-major like the rollouts: ``xs: [T, *B, D] -> ys: [T, *B, H]``, or
batch-major with ``js.rollout(..., time_major=False)``: ``xs: [*B, T, D] -> ys:
[*B, T, H]`` (one transpose in and one out, in ``js.rollout``: the layers inside
run time-major). Their ``rollout`` methods are the inside of the route: they get
the inputs already checked, as a :class:`~jaxseq.recurrent.Sequence`, and the
settings as a :class:`~jaxseq.recurrent.RolloutOptions`, and run their parts
through :func:`jaxseq.recurrent.run` without checking again.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.nn.dropout import dropout
from jaxseq.recurrent.rollouts import RolloutOptions, run
from jaxseq.recurrent.sequence import Sequence

__all__ = [
    "Bidirectional",
    "BidirectionalCarry",
    "BidirectionalParams",
    "Stack",
    "StackNormParams",
]

NORMS = ("rms", "layer")


class StackNormParams(NamedTuple):
    """The learnt scales of a normalised :class:`Stack` (``norm="rms"`` or ``"layer"``).

    ``inputs``: one scale ``[D_i]`` per layer, for the input of layer ``i``
    (``D_0`` the stack's input size, ``D_i`` the output size of layer ``i - 1``);
    ``output``: the scale ``[H]`` of the final norm on the last layer's outputs.
    """

    inputs: tuple  # one [D_i] per layer
    output: jax.Array  # [H]


def _check_layer_carry(layer, carry, batch_shape, name: str) -> None:
    """``layer.check_carry`` under the path ``name`` (``carry[1].backward``), when the
    layer has one; a ``None`` carry (zeros) is always fine."""
    if carry is None or batch_shape is None:
        return
    check = getattr(layer, "check_carry", None)
    if callable(check):
        check(carry, batch_shape, name=name)


class BidirectionalParams(NamedTuple):
    """Params of a :class:`Bidirectional`: those of its ``forward`` and ``backward`` halves.

    >>> import jax, jaxseq as js
    >>> params = js.Bidirectional(js.GRU(3)).init(jax.random.key(0), 2)
    >>> params.forward.w_ih.shape, params.backward.w_ih.shape
    ((2, 9), (2, 9))
    """

    forward: Any
    backward: Any


class BidirectionalCarry(NamedTuple):
    """Carry of a :class:`Bidirectional`: the ``forward`` and ``backward`` halves' carries.

    >>> import jaxseq as js
    >>> carry = js.Bidirectional(js.LSTM(3), js.GRU(2)).initial_carry((4,))
    >>> carry.forward.c.shape, carry.backward.h.shape
    ((4, 3), (4, 2))
    """

    forward: Any
    backward: Any


@dataclasses.dataclass(frozen=True)
class Bidirectional:
    """A forward and a backward layer whose outputs are concatenated: ``[T, *B, Hf + Hb]``.

    ``backward`` defaults to a layer of the same config as ``forward`` (separate
    parameters). Under ``lengths`` the backward layer runs over each sequence's
    valid part only, starting at its last valid step. Either half may be a cell
    or any sequence layer. Params: ``BidirectionalParams(forward, backward)``;
    carry: ``BidirectionalCarry(forward, backward)``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> layer = js.Bidirectional(js.LSTM(4), js.GRU(3))
    >>> params = layer.init(jax.random.key(0), input_size=2)
    >>> carry, ys = js.rollout(layer, params, jnp.ones((5, 2, 2)), lengths=jnp.array([5, 3]))
    >>> ys.shape, layer.output_size, carry.backward.h.shape
    ((5, 2, 7), 7, (2, 3))
    """

    # hands RolloutOptions.mesh / sequence_axis to its layers (run refuses those that cannot)
    sequence_parallel: ClassVar[bool] = True
    forward: Any
    backward: Any = None

    def __post_init__(self):
        if self.backward is None:
            object.__setattr__(self, "backward", self.forward)
        _check_output_size(self.forward, "forward")
        _check_output_size(self.backward, "backward")

    @property
    def output_size(self) -> int:
        """``Hf + Hb``, the last dim of the outputs."""
        return self.forward.output_size + self.backward.output_size

    def init(self, key, input_size: int, dtype=jnp.float32) -> BidirectionalParams:
        """Params of both halves for inputs ``[..., D]``, ``D = input_size``."""
        _checks.check_key("key", key)
        kf, kb = jax.random.split(key)
        return BidirectionalParams(
            self.forward.init(kf, input_size, dtype), self.backward.init(kb, input_size, dtype)
        )

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> BidirectionalCarry:
        """Zero carries of both halves for batch ``*B = batch_shape``."""
        return BidirectionalCarry(
            self.forward.initial_carry(batch_shape, dtype),
            self.backward.initial_carry(batch_shape, dtype),
        )

    def check_carry(self, carry, batch_shape, name: str = "carry") -> None:
        """Checks a :class:`BidirectionalCarry` for batch ``*B = batch_shape``.

        Each half's carry (``None``: zeros) is checked by that half when it has
        a ``check_carry``, under the names ``{name}.forward``/``{name}.backward``.

        >>> import jaxseq as js
        >>> layer = js.Bidirectional(js.GRU(3))
        >>> layer.check_carry(layer.initial_carry((2,)), (2,))
        >>> layer.check_carry(js.GRU(3).initial_carry((2,)), (2,))
        Traceback (most recent call last):
        ...
        TypeError: carry: expected BidirectionalCarry(forward, backward) (one carry per direction), got RNNCarry...
        """
        if not isinstance(carry, BidirectionalCarry):
            raise TypeError(
                f"{name}: expected BidirectionalCarry(forward, backward) (one carry per "
                f"direction), got {type(carry).__name__}; layer.initial_carry(batch_shape) "
                f"makes the zero carry of both"
            )
        _check_layer_carry(self.forward, carry.forward, batch_shape, f"{name}.forward")
        _check_layer_carry(self.backward, carry.backward, batch_shape, f"{name}.backward")

    def check_params(self, params) -> None:
        """Checks that ``params`` is a :class:`BidirectionalParams` (and each half's
        params, with that half's ``check_params`` when it has one).

        >>> import jax, jaxseq as js
        >>> layer = js.Bidirectional(js.GRU(3))
        >>> layer.check_params(layer.init(jax.random.key(0), 2))
        >>> layer.check_params(js.GRU(3).init(jax.random.key(0), 2))
        Traceback (most recent call last):
        ...
        TypeError: params: expected BidirectionalParams(forward, backward) (the params of both directions, from layer.init), got GRUParams
        """
        if not isinstance(params, BidirectionalParams):
            raise TypeError(
                f"params: expected BidirectionalParams(forward, backward) (the params of both "
                f"directions, from layer.init), got {type(params).__name__}"
            )
        for half, p in ((self.forward, params.forward), (self.backward, params.backward)):
            if callable(getattr(half, "check_params", None)):
                half.check_params(p)

    def check_input(self, params, x, name: str = "x", min_ndim: int = 1) -> None:
        """Checks the inputs ``x: [..., D]`` against both halves' params (those of
        the halves that have a ``check_input``), at trace time.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> layer = js.Bidirectional(js.GRU(3))
        >>> params = layer.init(jax.random.key(0), 2)
        >>> layer.check_input(params, jnp.ones((4, 5, 3)), name="xs")
        Traceback (most recent call last):
        ...
        ValueError: xs: expected last dim D=2 (the input_size of params), got float32[4, 5, 3]
        """
        for half, p in ((self.forward, params.forward), (self.backward, params.backward)):
            if callable(getattr(half, "check_input", None)):
                half.check_input(p, x, name=name, min_ndim=min_ndim)

    def rollout(self, params, seq: Sequence, carry, options: RolloutOptions, key=None):
        """Both directions over ``seq.xs: [T, *B, D]`` (run by :func:`jaxseq.rollout`).

        ``options.reverse`` swaps the directions: ``forward`` runs from the end
        of each sequence's valid part, ``backward`` from its start; the output
        layout stays ``[forward's outputs, backward's outputs]``. So for
        full-length sequences without resets, ``reverse=True`` on the
        time-flipped input gives the time-flipped output. The other options go
        to both halves; ``key`` (when given) is split between them (cells ignore it).

        Returns ``(BidirectionalCarry(forward, backward), ys: [T, *B, Hf + Hb])``;
        each carry is the one after that half's last processed step (for the
        backward half without ``reverse``, after time step 0).

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> layer = js.Bidirectional(js.RNN(3))
        >>> params = layer.init(jax.random.key(0), 2)
        >>> js.rollout(layer, params, jnp.ones((4, 2)))[1].shape
        (4, 6)
        """
        cf, cb = (None, None) if carry is None else carry
        kf = kb = None
        if key is not None:
            kf, kb = jax.random.split(key)
        backward = dataclasses.replace(options, reverse=not options.reverse)
        cf, yf = run(self.forward, params.forward, seq, cf, options, kf)
        cb, yb = run(self.backward, params.backward, seq, cb, backward, kb)
        return BidirectionalCarry(cf, cb), jnp.concatenate([yf, yb], axis=-1)


@dataclasses.dataclass(frozen=True)
class Stack:
    """Layers run one after another over the whole sequence (a deep RNN).

    Args:
      layers: cells and/or sequence layers (:class:`Bidirectional`, user
        layers), bottom first.
      residual: add each layer's input to its output from the second layer on
        (sizes must agree there).
      dropout_rate: dropout on the outputs of every layer but the last, applied
        only when the rollout gets a ``key``.
      variational_dropout: one dropout mask per sequence, shared by all time steps
        (Gal and Ghahramani 2016), instead of a fresh mask at every step.
      norm: ``None`` (default: no normalisation), ``"rms"`` or ``"layer"``: a
        pre-norm stack, as in Transformers and Griffin's residual blocks (De et
        al. 2024). Each layer gets its input normalised over the last axis,
        ``x / sqrt(mean(x^2) + eps) * scale`` (``"rms"``) or ``(x - mean(x)) /
        sqrt(var(x) + eps) * scale`` (``"layer"``, no bias), with a learnt
        ``scale`` per feature (initialised to 1), while the residual adds the
        un-normalised input; the last layer's outputs get a final norm of the
        same kind. Statistics in float32 (float64 for float64 inputs), results in
        the input's dtype; zero (padded) steps stay zero.
      norm_eps: the ``eps`` of the norms (positive).
      weight_dropout: DropConnect on the recurrent weights, the weight drop of
        AWD-LSTM (Merity et al. 2018): every ``w_hh`` in the layers' params (RNN,
        LSTM, GRU, sLSTM cells, both directions of a :class:`Bidirectional`) has
        each entry zeroed with this probability and the rest scaled by
        ``1 / (1 - rate)``, one mask per rollout shared by all steps and sequences;
        applied only when the rollout gets a ``key``. A rate above 0 needs a layer
        with recurrent weights.

    Params: a tuple of the layers' params, followed, with ``norm``, by a
    :class:`StackNormParams` (the scales); carry: a tuple of the layers' carries.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> stack = js.Stack([js.LSTM(4), js.Bidirectional(js.GRU(2))], dropout_rate=0.1)
    >>> params = stack.init(jax.random.key(0), input_size=3)
    >>> carries, ys = js.rollout(stack, params, jnp.ones((5, 2, 3)), key=jax.random.key(1))
    >>> ys.shape, len(carries), stack.output_size
    ((5, 2, 4), 2, 4)
    >>> normed = js.Stack([js.recurrent.RGLRU(4), js.recurrent.RGLRU(4)], residual=True, norm="rms")
    >>> params = normed.init(jax.random.key(0), input_size=3)
    >>> [s.shape for s in params[-1].inputs], params[-1].output.shape
    ([(3,), (4,)], (4,))
    >>> ys = js.rollout(normed, params, jnp.ones((5, 2, 3)))[1]
    >>> ys.shape, bool(jnp.allclose(jnp.mean(ys**2, axis=-1), 1.0, atol=1e-3))
    ((5, 2, 4), True)
    """

    # hands RolloutOptions.mesh / sequence_axis to its layers (run refuses those that cannot)
    sequence_parallel: ClassVar[bool] = True
    layers: tuple
    residual: bool = False
    dropout_rate: float = 0.0
    variational_dropout: bool = False
    norm: str | None = None
    norm_eps: float = 1e-6
    weight_dropout: float = 0.0  # last: the earlier fields keep their positions

    def __post_init__(self):
        layers = tuple(self.layers) if isinstance(self.layers, collections.abc.Sequence) else None
        if not layers:
            raise ValueError(f"layers: expected a non-empty sequence of cells, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        _checks.check_rate("dropout_rate", self.dropout_rate)
        _checks.check_rate("weight_dropout", self.weight_dropout)
        if self.norm is not None and (not isinstance(self.norm, str) or self.norm not in NORMS):
            raise ValueError(
                f"norm: expected None (no normalisation), 'rms' or 'layer', got {self.norm!r}"
            )
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"norm_eps: expected a positive number, got {eps!r}")
        sizes = [_check_output_size(layer, f"layers[{i}]") for i, layer in enumerate(layers)]
        if self.residual:
            for i in range(1, len(layers)):
                if sizes[i] != sizes[i - 1]:
                    raise ValueError(
                        f"layers: residual connections need equal sizes between layers, "
                        f"layer {i - 1} outputs {sizes[i - 1]} but layer {i} outputs {sizes[i]}"
                    )

    @property
    def output_size(self) -> int:
        """The last layer's output size."""
        return self.layers[-1].output_size

    def init(self, key, input_size: int, dtype=jnp.float32) -> tuple:
        """Params of every layer, bottom first, for inputs ``[..., D]``, ``D = input_size``,
        then (with ``norm``) a :class:`StackNormParams` of unit scales."""
        _checks.check_key("key", key)
        params, sizes, d = [], [], input_size
        for layer, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            params.append(layer.init(k, d, dtype))
            sizes.append(d)
            d = layer.output_size
        if self.norm is not None:
            scales = tuple(
                jnp.ones((_checks.check_positive_int("input_size", s),), dtype) for s in sizes
            )
            params.append(StackNormParams(scales, jnp.ones((d,), dtype)))
        return tuple(params)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> tuple:
        """Zero carries of every layer for batch ``*B = batch_shape``."""
        return tuple(layer.initial_carry(batch_shape, dtype) for layer in self.layers)

    def check_carry(self, carry, batch_shape, name: str = "carry") -> None:
        """Checks a Stack's carry, a tuple (or list) of one carry per layer, for batch
        ``*B = batch_shape``.

        A single cell's carry is rejected even when its number of fields happens
        to equal the number of layers. Each layer's carry (``None``: zeros) is
        checked by that layer when it has a ``check_carry``, as ``{name}[i]``.

        >>> import jaxseq as js
        >>> stack = js.Stack([js.LSTM(3), js.LSTM(3)])
        >>> stack.check_carry(stack.initial_carry((2,)), (2,))
        >>> stack.check_carry(js.LSTM(3).initial_carry((2,)), (2,))
        Traceback (most recent call last):
        ...
        TypeError: carry: expected a tuple of 2 layer carries (one per layer of the Stack), got LSTMCarry...
        """
        n = len(self.layers)
        what = f"{name}: expected a tuple of {n} layer carries (one per layer of the Stack)"
        hint = "stack.initial_carry(batch_shape) makes the zero carry of every layer"
        if _is_record(carry) or not isinstance(carry, tuple | list):
            raise TypeError(
                f"{what}, got {type(carry).__name__}"
                + (" (a single carry)" if _is_record(carry) else "")
                + f"; {hint}"
            )
        if len(carry) != n:
            raise ValueError(f"{what}, got a {type(carry).__name__} of {len(carry)}; {hint}")
        for i, (layer, c) in enumerate(zip(self.layers, carry)):
            _check_layer_carry(layer, c, batch_shape, f"{name}[{i}]")

    def check_params(self, params) -> None:
        """Checks that ``params`` is a tuple (or list) of one params per layer
        (then, with ``norm``, a :class:`StackNormParams` of the right sizes).

        A single layer's params are rejected even when their number of fields
        happens to equal the number of layers. The layers' own params are
        checked by their rollouts.

        >>> import jax, jaxseq as js
        >>> stack = js.Stack([js.GRU(3), js.GRU(3)])
        >>> stack.check_params(stack.init(jax.random.key(0), 2))
        >>> stack.check_params(stack.init(jax.random.key(0), 2)[:1])
        Traceback (most recent call last):
        ...
        ValueError: params: expected a tuple of 2 layer params (one per layer of the Stack), got a tuple of 1
        """
        n = len(self.layers)
        what = f"params: expected a tuple of {n} layer params (one per layer of the Stack)"
        if self.norm is not None:
            what += f" and a StackNormParams (norm={self.norm!r})"
        if _is_record(params):
            raise TypeError(
                f"{what}, got {type(params).__name__} (the params of a single layer); "
                f"stack.init makes those of every layer"
            )
        if not isinstance(params, tuple | list):
            raise TypeError(f"{what}, got {type(params).__name__}")
        if len(params) != n + (self.norm is not None):
            raise ValueError(f"{what}, got a {type(params).__name__} of {len(params)}")
        if self.norm is not None:
            self._check_norm_params(params[n])

    def _check_norm_params(self, norms) -> None:
        """The scales of a normalised stack: ``inputs[i]: [D_i]`` (``D_i`` the output
        size of layer ``i - 1`` from the second layer on), ``output: [H]``."""
        n = len(self.layers)
        if not isinstance(norms, StackNormParams):
            raise TypeError(
                f"params[{n}]: expected StackNormParams (the scales of norm={self.norm!r}), "
                f"got {type(norms).__name__}; stack.init makes them"
            )
        if not isinstance(norms.inputs, tuple | list) or len(norms.inputs) != n:
            raise ValueError(
                f"params[{n}].inputs: expected a tuple of {n} scales (one per layer), "
                f"got {norms.inputs!r:.80}"
            )
        sizes = [None] + [layer.output_size for layer in self.layers[:-1]]
        for i, (scale, d) in enumerate(zip(norms.inputs, sizes)):
            _checks.check_shape(
                f"params[{n}].inputs[{i}]", _checks.as_array("scale", scale), (d,), ("D",)
            )
        out = _checks.as_array(f"params[{n}].output", norms.output)
        _checks.check_shape(f"params[{n}].output", out, (self.output_size,), ("H",))

    def check_input(self, params, x, name: str = "x", min_ndim: int = 1) -> None:
        """Checks the inputs ``x: [..., D]`` against the first layer's params (when
        that layer has a ``check_input``), at trace time.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> stack = js.Stack([js.GRU(3), js.GRU(3)])
        >>> params = stack.init(jax.random.key(0), 2)
        >>> stack.check_input(params, jnp.ones((4, 5, 3)), name="xs")
        Traceback (most recent call last):
        ...
        ValueError: xs: expected last dim D=2 (the input_size of params), got float32[4, 5, 3]
        """
        self.check_params(params)
        first = self.layers[0]
        if callable(getattr(first, "check_input", None)):
            if callable(getattr(first, "check_params", None)):
                first.check_params(params[0])
            first.check_input(params[0], x, name=name, min_ndim=min_ndim)

    def rollout(self, params, seq: Sequence, carry, options: RolloutOptions, key=None):
        """Every layer in turn over ``seq.xs: [T, *B, D]`` (run by :func:`jaxseq.rollout`).

        The padding, resets and options apply to every layer; ``reverse=True``
        reverses every layer (a :class:`Bidirectional` swaps its directions).
        Dropout between layers and on the recurrent weights (``weight_dropout``)
        is on only when ``key`` is given; each layer also
        gets a key of its own, ``jax.random.fold_in(key, i)`` (cells ignore it).
        The outputs of each layer are zero at padded steps, so they enter the
        next layer as its inputs with nothing to mask again.

        With ``norm``, each layer runs on its normalised input and the outputs get
        the final norm (see the class docstring).

        Returns ``(carries, ys)``: a tuple with each layer's final carry, and the
        last layer's outputs ``[T, *B, H_last]``.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> stack = js.Stack([js.GRU(3), js.GRU(3)], residual=True)
        >>> params = stack.init(jax.random.key(0), 2)
        >>> carries, ys = js.rollout(stack, params, jnp.ones((4, 2, 2)))
        >>> ys.shape, carries[1].h.shape
        ((4, 2, 3), (2, 3))
        """
        n = len(self.layers)
        carry = (None,) * n if carry is None else carry
        use_dropout = key is not None and self.dropout_rate > 0.0
        keys: Any = jax.random.split(key, max(n - 1, 1)) if use_dropout else None
        norms = None if self.norm is None else params[n]
        if key is not None and self.weight_dropout > 0.0:
            params = _drop_recurrent_weights(key, self.layers, params[:n], self.weight_dropout)
        carries, h = [], seq.xs
        for i, (layer, p, c) in enumerate(zip(self.layers, params, carry)):
            k_layer = None if key is None else jax.random.fold_in(key, i)
            x = h if norms is None else self._normalise(norms.inputs[i], h, f"inputs[{i}]")
            c, y = run(layer, p, seq._replace(xs=x), c, options, k_layer)
            _check_output(layer, i, y)
            if self.residual and i > 0:
                y = y + h.astype(y.dtype)
            if use_dropout and i < n - 1:
                y = dropout(keys[i], y, self.dropout_rate, shared_axes=_time_axes(self))
            carries.append(c)
            h = y
        if norms is not None:
            h = self._normalise(norms.output, h, "output")
        return tuple(carries), h

    def _normalise(self, scale, x, name: str):
        """``x: [..., D]`` normalised over its last axis (``self.norm``), times ``scale [D]``."""
        if scale.shape != x.shape[-1:]:
            raise ValueError(
                f"params[{len(self.layers)}].{name}: expected a scale of shape "
                f"[{x.shape[-1]}] (the last dim of what it normalises), got {_checks.describe(scale)}"
            )
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32 at least
        if self.norm == "layer":
            xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.norm_eps)
        scale = scale.astype(xf.dtype).reshape((1,) * (x.ndim - 1) + scale.shape)
        return (y * scale).astype(x.dtype)


def _drop_recurrent_weights(key, layers: tuple, params: tuple, rate: float) -> tuple:
    """The layers' params with DropConnect on every ``w_hh`` leaf (one mask per leaf).

    A nested :class:`Stack` keeps its params: its own ``weight_dropout`` decides."""
    dropped = []

    def drop(path, leaf):
        last = path[-1] if path else None
        if not (isinstance(last, jax.tree_util.GetAttrKey) and last.name == "w_hh"):
            return leaf
        dropped.append(path)
        return dropout(jax.random.fold_in(key, len(params) + len(dropped)), leaf, rate)

    out = tuple(
        p if isinstance(layer, Stack) else jax.tree_util.tree_map_with_path(drop, p)
        for layer, p in zip(layers, params)
    )
    if not dropped:
        raise ValueError(
            f"weight_dropout: expected a layer with recurrent weights (a w_hh: RNN, LSTM, "
            f"GRU, sLSTM) to drop, got weight_dropout={rate} for a stack of "
            f"{[type(layer).__name__ for layer in layers]} layers, whose params have none"
        )
    return out


def _check_output(layer, i: int, y) -> None:
    """A layer's outputs must have the ``output_size`` it declares (trace time)."""
    if y.shape[-1] != layer.output_size:
        raise ValueError(
            f"layers[{i}]: {type(layer).__name__} declares output_size={layer.output_size} "
            f"but its rollout returned outputs {_checks.describe(y)}; fix its output_size"
        )


def _check_output_size(layer, name: str) -> int:
    """``layer.output_size``, a positive int, checked where the layer is declared."""
    size = getattr(layer, "output_size", None)
    if size is None:
        raise TypeError(
            f"{name}: expected a cell or layer with an 'output_size' (the last dim of "
            f"its outputs, which sizes what comes after it), {type(layer).__name__} has none"
        )
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size <= 0:
        raise TypeError(
            f"{name}: expected output_size to be a positive int, "
            f"{type(layer).__name__} has output_size={size!r}"
        )
    return int(size)


def _is_record(x) -> bool:
    """A NamedTuple (a cell's params or carry), not a plain tuple of per-layer items."""
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _time_axes(module) -> tuple:
    """The axes a dropout mask is shared along: time (axis 0) for variational dropout."""
    return (0,) if module.variational_dropout else ()
