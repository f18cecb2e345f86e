"""Layers built from cells: bidirectional, stacked (with residuals and dropout),
plus the small pieces every sequence model needs (embedding, dense, dropout).

Time-major like the rollouts: ``xs: [T, *B, D]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.nn.dropout import dropout
from jaxseq.recurrent.rollouts import rollout

__all__ = [
    "Bidirectional",
    "BidirectionalCarry",
    "BidirectionalParams",
    "Stack",
    "bidirectional_rollout",
    "stacked_rollout",
]


class BidirectionalParams(NamedTuple):
    forward: Any
    backward: Any


class BidirectionalCarry(NamedTuple):
    forward: Any
    backward: Any


@dataclasses.dataclass(frozen=True)
class Bidirectional:
    """A forward and a backward cell whose outputs are concatenated: ``[T, *B, Hf + Hb]``.

    ``backward`` defaults to a cell of the same config as ``forward`` (separate
    parameters). Under ``lengths`` the backward cell runs over each sequence's
    valid part only, starting at its last valid step.
    """

    forward: Any
    backward: Any = None

    def __post_init__(self):
        if self.backward is None:
            object.__setattr__(self, "backward", self.forward)

    @property
    def output_size(self) -> int:
        return self.forward.output_size + self.backward.output_size

    def init(self, key, input_size: int, dtype=jnp.float32) -> BidirectionalParams:
        _checks.check_key("key", key)
        kf, kb = jax.random.split(key)
        return BidirectionalParams(
            self.forward.init(kf, input_size, dtype), self.backward.init(kb, input_size, dtype)
        )

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> BidirectionalCarry:
        return BidirectionalCarry(
            self.forward.initial_carry(batch_shape, dtype),
            self.backward.initial_carry(batch_shape, dtype),
        )


def bidirectional_rollout(
    layer: Bidirectional, params, xs, carry=None, *, lengths=None, reset=None, unroll=1
):
    """Forward and reverse rollouts of a :class:`Bidirectional` layer.

    Returns ``(BidirectionalCarry(forward, backward), ys: [T, *B, Hf + Hb])``; the
    backward carry is the one after time step 0 (its last step).
    """
    if not isinstance(layer, Bidirectional):
        raise TypeError(f"layer: expected js.Bidirectional, got {type(layer).__name__}")
    if not isinstance(params, BidirectionalParams):
        raise TypeError(f"params: expected BidirectionalParams, got {type(params).__name__}")
    if carry is None:
        carry = BidirectionalCarry(None, None)
    elif not isinstance(carry, BidirectionalCarry):
        raise TypeError(f"carry: expected BidirectionalCarry, got {type(carry).__name__}")
    kw = dict(lengths=lengths, reset=reset, unroll=unroll)
    cf, yf = rollout(layer.forward, params.forward, xs, carry.forward, **kw)
    cb, yb = rollout(layer.backward, params.backward, xs, carry.backward, reverse=True, **kw)
    return BidirectionalCarry(cf, cb), jnp.concatenate([yf, yb], axis=-1)


def _layer_rollout(layer, params, xs, carry, **kw):
    if isinstance(layer, Bidirectional):
        return bidirectional_rollout(layer, params, xs, carry, **kw)
    return rollout(layer, params, xs, carry, **kw)


@dataclasses.dataclass(frozen=True)
class Stack:
    """Layers run one after another over the whole sequence (a deep RNN).

    Args:
      layers: cells and/or :class:`Bidirectional` layers, bottom first.
      residual: add each layer's input to its output from the second layer on
        (sizes must agree there).
      dropout_rate: dropout on the outputs of every layer but the last, applied
        only when :func:`stacked_rollout` gets a ``key``.
      variational_dropout: one dropout mask per sequence, shared by all time steps
        (Gal and Ghahramani 2016), instead of a fresh mask at every step.
    """

    layers: tuple
    residual: bool = False
    dropout_rate: float = 0.0
    variational_dropout: bool = False

    def __post_init__(self):
        layers = tuple(self.layers) if isinstance(self.layers, Sequence) else None
        if not layers:
            raise ValueError(f"layers: expected a non-empty sequence of cells, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        _checks.check_rate("dropout_rate", self.dropout_rate)
        if self.residual:
            sizes = [lay.output_size for lay in layers]
            for i in range(1, len(layers)):
                if sizes[i] != sizes[i - 1]:
                    raise ValueError(
                        f"layers: residual connections need equal sizes between layers, "
                        f"layer {i - 1} outputs {sizes[i - 1]} but layer {i} outputs {sizes[i]}"
                    )

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def init(self, key, input_size: int, dtype=jnp.float32) -> tuple:
        _checks.check_key("key", key)
        params, d = [], input_size
        for layer, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            params.append(layer.init(k, d, dtype))
            d = layer.output_size
        return tuple(params)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> tuple:
        return tuple(layer.initial_carry(batch_shape, dtype) for layer in self.layers)


def stacked_rollout(
    stack: Stack, params, xs, carry=None, *, lengths=None, reset=None, key=None, unroll=1
):
    """Runs a :class:`Stack` over ``xs: [T, *B, D]``.

    Returns ``(carries, ys)``: a tuple with each layer's final carry, and the
    last layer's outputs ``[T, *B, H_last]``. ``lengths``/``reset`` apply to every
    layer. Dropout between layers is on only when ``key`` is given.
    """
    if not isinstance(stack, Stack):
        raise TypeError(f"stack: expected js.Stack, got {type(stack).__name__}")
    n = len(stack.layers)
    if not isinstance(params, tuple | list) or len(params) != n:
        raise ValueError(
            f"params: expected a tuple of {n} layer params, got {type(params).__name__}"
        )
    if carry is None:
        carry = (None,) * n
    elif not isinstance(carry, tuple | list) or len(carry) != n:
        raise ValueError(
            f"carry: expected a tuple of {n} layer carries, got {type(carry).__name__}"
        )
    use_dropout = key is not None and stack.dropout_rate > 0.0
    if use_dropout:
        _checks.check_key("key", key)
        keys = jax.random.split(key, max(n - 1, 1))
    carries, h = [], xs
    for i, (layer, p, c) in enumerate(zip(stack.layers, params, carry)):
        c, y = _layer_rollout(layer, p, h, c, lengths=lengths, reset=reset, unroll=unroll)
        if stack.residual and i > 0:
            y = y + h.astype(y.dtype)
        if use_dropout and i < n - 1:
            y = dropout(keys[i], y, stack.dropout_rate, shared_axes=_time_axes(stack))
        carries.append(c)
        h = y
    return tuple(carries), h


def _time_axes(module) -> tuple:
    """The axes a dropout mask is shared along: time (axis 0) for variational dropout."""
    return (0,) if module.variational_dropout else ()
