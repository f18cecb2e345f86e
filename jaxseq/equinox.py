"""Equinox modules over the jaxseq kernels: ``RNN``, ``Bidirectional``, ``Stack`` and weight converters.

``RNN(cell, input_size=D, key=key)`` is an ``equinox.Module`` whose one array
field, ``params``, is the jaxseq parameter pytree of the cell (or layer), made
by its ``init``; the cell itself is a static field. Calling it runs
:func:`jaxseq.rollout` (the fused kernels) with the call signature and the
semantics of :class:`jaxseq.flax.linen.RNN` (which are ``flax.linen.RNN``'s), so
the Flax and Equinox modules read alike::

    jaxseq.flax.linen.RNN(js.LSTM(256))
    jaxseq.flax.nnx.RNN(js.LSTM(256), d, rngs=rngs)
    jaxseq.equinox.RNN(js.LSTM(256), input_size=d, key=key)

The modules train like any Equinox model: ``eqx.filter_jit``,
``eqx.filter_grad``/``eqx.filter_value_and_grad`` and optax over
``eqx.filter(model, eqx.is_array)``. :func:`from_equinox` turns an
``eqx.nn.LSTMCell``/``eqx.nn.GRUCell`` into an :class:`RNN` with its weights
(and :func:`to_equinox` back); Equinox's cells compute exactly jaxseq's
functions, so the conversion is a transpose.

Shapes: ``inputs [*B, T, D] -> outputs [*B, T, H]`` (batch-major by default;
``time_major=True``: ``[T, *B, D] -> [T, *B, H]``), ``B`` the batch dims (none
for one sequence, as Equinox layers usually take, and ``jax.vmap`` works), ``T``
the time steps, ``D`` the input features, ``H`` the output features. Carries
are Equinox's for a built-in cell (an LSTM's ``(h, c)``, a GRU's or RNN's
``h``, each ``[*B, H]``) and jaxseq's for a layer (``js.Stack``,
``js.Bidirectional``). Equinox is optional: ``import jaxseq`` never imports it,
and importing this module without it raises an ``ImportError`` that says how to
install it.

>>> import jax, jax.numpy as jnp, jaxseq as js, jaxseq.equinox as jeqx
>>> rnn = jeqx.RNN(js.GRU(4), input_size=3, key=jax.random.key(0))
>>> rnn(jnp.ones((2, 5, 3))).shape  # [B, T, D] -> [B, T, H]
(2, 5, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

try:
    import equinox as eqx
except ImportError:
    raise ImportError(
        "jaxseq.equinox needs Equinox (equinox.Module wrappers of the jaxseq kernels): "
        "pip install equinox  (or pip install -e '.[dev]')"
    ) from None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxseq import _checks  # noqa: E402
from jaxseq.interop.modules import (  # noqa: E402
    check_layer,
    merge_directions,
    run_rnn,
    split_carry,
)
from jaxseq.recurrent.cells import GRU, LSTM, GRUParams, LSTMParams  # noqa: E402

__all__ = [
    "RNN",
    "Bidirectional",
    "Stack",
    "cell_from_equinox",
    "cell_to_equinox",
    "from_equinox",
    "to_equinox",
]


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a Python bool, got {type(value).__name__} {value!r}")
    return value


def _pick(value, default):
    return default if value is None else value


def _concatenate(a, b):
    return jnp.concatenate([a, b], axis=-1)


class RNN(eqx.Module):
    """An ``equinox.Module`` running a jaxseq cell or layer over sequences with :func:`jaxseq.rollout`.

    Args:
      cell: a jaxseq cell (``js.LSTM(256)``, ``js.GRU``, ``js.RNN``, or any
        object with ``init``/``initial_carry``/``step``/``output_size``) or
        layer (``js.Stack``, ``js.Bidirectional``: run as one fused rollout).
      input_size: ``D``, the size of the inputs' last axis.
      key: the ``jax.random`` key that ``cell.init`` makes the parameters with.
      time_major, return_carry, reverse, keep_order: defaults for the call, as
        in ``flax.linen.RNN`` (see below).
      unroll, kernel: passed to :func:`jaxseq.rollout` (``"auto"``: its choice).
      dtype: dtype of the parameters (float32).
      params: the parameters to use instead of making them (then ``key`` may be
        None); checked against the cell.

    Fields: ``params`` (the jaxseq parameter pytree, the module's only arrays);
    ``cell``, ``input_size`` and the defaults are static.

    Call: ``rnn(inputs, initial_carry=None, *, seq_lengths, return_carry,
    time_major, reverse, keep_order, key)`` with ``inputs [*B, T, D]``
    (``time_major``: ``[T, *B, D]``) and ``seq_lengths int[*B]`` returns
    ``outputs [*B, T, H]``, or ``(carry, outputs)`` with ``return_carry``;
    ``key`` is accepted, as Equinox layers take one, and unused. The semantics
    are those of :class:`jaxseq.flax.linen.RNN` (Flax's): with ``seq_lengths``
    a cell runs every step, its padded outputs continuing over the padding;
    ``reverse`` reverses each valid part (padding kept after it) and returns
    the outputs in that processed order unless ``keep_order``; the carry is the
    one after the last valid step (after all ``T`` steps at length 0). A layer
    follows jaxseq under ``seq_lengths``: padded outputs are zeros, its backward
    halves run over each valid part, its carry at length 0 is the initial one.
    Carries: an LSTM's is ``(h, c)`` (a ``LSTMCarry``, as Equinox orders them),
    a GRU's/RNN's ``h [*B, H]``, a layer's is jaxseq's.

    >>> import jax, jax.numpy as jnp, optax, equinox as eqx, jaxseq as js, jaxseq.equinox as jeqx
    >>> rnn = jeqx.RNN(js.LSTM(4), input_size=3, key=jax.random.key(0))
    >>> x = jnp.ones((2, 5, 3))  # [B, T, D]
    >>> (h, c), ys = rnn(x, seq_lengths=jnp.array([5, 2]), return_carry=True)
    >>> ys.shape, h.shape, rnn.params.w_hh.shape
    ((2, 5, 4), (2, 4), (4, 16))
    >>> loss = lambda m: jnp.mean(m(x) ** 2)
    >>> opt = optax.sgd(0.1)
    >>> state = opt.init(eqx.filter(rnn, eqx.is_array))
    >>> grads = eqx.filter_jit(eqx.filter_grad(loss))(rnn)
    >>> updates, state = opt.update(grads, state)
    >>> rnn = eqx.apply_updates(rnn, updates)
    """

    params: Any
    cell: Any = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    time_major: bool = eqx.field(static=True)
    return_carry: bool = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    keep_order: bool = eqx.field(static=True)
    unroll: Any = eqx.field(static=True)
    kernel: str = eqx.field(static=True)

    def __init__(
        self,
        cell,
        *,
        input_size: int,
        key=None,
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll="auto",
        kernel: str = "auto",
        dtype=jnp.float32,
        params=None,
    ):
        check_layer(cell)
        self.cell = cell
        self.input_size = _checks.check_positive_int("input_size", input_size)
        self.time_major = _flag("time_major", time_major)
        self.return_carry = _flag("return_carry", return_carry)
        self.reverse = _flag("reverse", reverse)
        self.keep_order = _flag("keep_order", keep_order)
        self.unroll = unroll
        self.kernel = kernel
        if params is None:
            if key is None:
                raise TypeError("key: expected a jax.random key (or params=...), got None")
            _checks.check_key("key", key)
            params = cell.init(key, self.input_size, dtype)
        elif callable(getattr(cell, "check_params", None)):
            cell.check_params(params)
        self.params = params

    @property
    def output_size(self) -> int:
        """``H``, the last dim of the outputs (the cell's ``output_size``)."""
        return self.cell.output_size

    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        seq_lengths=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        key=None,
    ):
        del key  # carries start at zeros; cells take no randomness
        if hasattr(inputs, "shape") and inputs.ndim >= 1 and inputs.shape[-1] != self.input_size:
            raise ValueError(
                f"inputs: expected last dim D={self.input_size} (the input_size of the "
                f"module), got {_checks.describe(inputs)}"
            )
        carry, ys = run_rnn(
            self.cell,
            self.params,
            inputs,
            initial_carry,
            seq_lengths=seq_lengths,
            time_major=_pick(time_major, self.time_major),
            reverse=_pick(reverse, self.reverse),
            keep_order=_pick(keep_order, self.keep_order),
            return_carry=_pick(return_carry, self.return_carry),
            unroll=self.unroll,
            kernel=self.kernel,
            carries="equinox",
        )
        return ys if carry is None else (carry, ys)


def _check_module(name: str, module) -> None:
    if not callable(module) or not isinstance(module, eqx.Module):
        raise TypeError(
            f"{name}: expected an Equinox RNN module (jaxseq.equinox.RNN, Bidirectional, Stack), "
            f"got {type(module).__name__}"
            + (
                " (a jaxseq cell or layer: wrap it in jaxseq.equinox.RNN)"
                if hasattr(module, "init")
                else ""
            )
        )


class Bidirectional(eqx.Module):
    """A forward and a backward RNN over the same sequences, their outputs merged (``flax.linen.Bidirectional``).

    ``forward_rnn`` runs with ``reverse=False``, ``backward_rnn`` with
    ``reverse=True, keep_order=True`` (so its outputs line up with the
    inputs), both on the same ``seq_lengths``; ``merge_fn`` merges the outputs
    (concatenation of the features by default: ``[*B, T, Hf + Hb]``), the carry
    is ``(forward carry, backward carry)``, and ``initial_carry`` one of that
    form. The halves are :class:`RNN` s or any Equinox modules with its call
    signature. ``reverse``/``keep_order`` are accepted by the call and ignored
    (fixed per direction, as in Flax); ``key`` is accepted and unused.

    For one fused rollout of both directions use ``RNN(js.Bidirectional(...))``
    instead (jaxseq's semantics under ``seq_lengths``: padded outputs zero).

    >>> import jax, jax.numpy as jnp, jaxseq as js, jaxseq.equinox as jeqx
    >>> kf, kb = jax.random.split(jax.random.key(0))
    >>> layer = jeqx.Bidirectional(
    ...     jeqx.RNN(js.LSTM(3), input_size=4, key=kf), jeqx.RNN(js.GRU(2), input_size=4, key=kb)
    ... )
    >>> x = jnp.ones((2, 5, 4))  # [B, T, D]
    >>> (carry_f, h_b), ys = layer(x, seq_lengths=jnp.array([5, 3]), return_carry=True)
    >>> ys.shape, h_b.shape, layer.output_size
    ((2, 5, 5), (2, 2), 5)
    """

    forward_rnn: Any
    backward_rnn: Any
    merge_fn: Callable = eqx.field(static=True)
    time_major: bool = eqx.field(static=True)
    return_carry: bool = eqx.field(static=True)

    def __init__(
        self,
        forward_rnn,
        backward_rnn,
        *,
        merge_fn: Callable = _concatenate,
        time_major: bool = False,
        return_carry: bool = False,
    ):
        _check_module("forward_rnn", forward_rnn)
        _check_module("backward_rnn", backward_rnn)
        if not callable(merge_fn):
            raise TypeError(f"merge_fn: expected a function (a, b) -> merged, got {merge_fn!r}")
        self.forward_rnn = forward_rnn
        self.backward_rnn = backward_rnn
        self.merge_fn = merge_fn
        self.time_major = _flag("time_major", time_major)
        self.return_carry = _flag("return_carry", return_carry)

    @property
    def output_size(self) -> int | None:
        """``Hf + Hb`` with the default ``merge_fn`` (None for another merge)."""
        hf, hb = (getattr(m, "output_size", None) for m in (self.forward_rnn, self.backward_rnn))
        if self.merge_fn is not _concatenate or hf is None or hb is None:
            return None
        return hf + hb

    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        seq_lengths=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        key=None,
    ):
        del reverse, keep_order, key  # fixed per direction, as in Flax
        return_carry = _pick(return_carry, self.return_carry)
        carry_f, carry_b = split_carry(initial_carry)
        common = dict(
            seq_lengths=seq_lengths,
            return_carry=return_carry,
            time_major=_pick(time_major, self.time_major),
        )
        out_f = self.forward_rnn(inputs, carry_f, reverse=False, **common)
        out_b = self.backward_rnn(inputs, carry_b, reverse=True, keep_order=True, **common)
        return merge_directions(self.merge_fn, out_f, out_b, return_carry)


def _build_layers(layers, input_size, key) -> tuple:
    """Modules kept, jaxseq cells/layers wrapped in :class:`RNN` (each ``D`` the last output size)."""
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: expected a non-empty sequence of layers, got {layers!r:.80}")
    wanted = [not isinstance(layer, eqx.Module) for layer in layers]
    keys = [None] * len(layers)
    if any(wanted):
        if key is None:
            raise TypeError("key: expected a jax.random key (to make the layers' params), got None")
        _checks.check_key("key", key)
        keys = list(jax.random.split(key, len(layers)))
    out, d = [], input_size
    for i, (layer, k) in enumerate(zip(layers, keys)):
        if isinstance(layer, eqx.Module):
            _check_module(f"layers[{i}]", layer)
        else:
            check_layer(layer, f"layers[{i}]")
            if d is None:
                raise TypeError(
                    f"input_size: expected the input size of layers[{i}] (a positive int: "
                    f"give input_size, or put an RNN module with an output_size before it), got None"
                )
            layer = RNN(layer, input_size=d, key=k)
        out.append(layer)
        d = getattr(layer, "output_size", None)
    return tuple(out)


class Stack(eqx.Module):
    """RNN modules run one after another over the whole sequence (a deep RNN).

    Args:
      layers: :class:`RNN`, :class:`Bidirectional` or other modules with
        :class:`RNN`'s call signature, bottom first, or jaxseq cells/layers
        (``js.LSTM(64)``, ``js.Bidirectional(js.GRU(32))``), which become
        :class:`RNN` s with default options (then ``input_size`` and ``key`` are
        needed: each takes the previous one's ``output_size`` as its input size).
      input_size: ``D``, the size of the inputs' last axis (for jaxseq cells/layers).
      key: the ``jax.random`` key their parameters are made with.
      time_major, return_carry: defaults for the call.

    Call: ``stack(inputs, initial_carry=None, *, seq_lengths, return_carry,
    time_major, key)``: each layer gets the previous one's outputs and the same
    ``seq_lengths``; returns the last layer's ``outputs [*B, T, H]``, or
    ``(carries, outputs)`` with ``carries`` a tuple of each layer's carry;
    ``initial_carry`` is None or such a tuple (entries may be None: zeros). For
    one fused rollout of the whole stack use ``RNN(js.Stack([...]))`` instead.

    >>> import jax, jax.numpy as jnp, jaxseq as js, jaxseq.equinox as jeqx
    >>> stack = jeqx.Stack([js.LSTM(4), js.GRU(2)], input_size=3, key=jax.random.key(0))
    >>> carries, ys = stack(jnp.ones((2, 5, 3)), return_carry=True)  # [B, T, D]
    >>> ys.shape, [type(layer).__name__ for layer in stack.layers], carries[1].shape
    ((2, 5, 2), ['RNN', 'RNN'], (2, 2))
    """

    layers: tuple
    time_major: bool = eqx.field(static=True)
    return_carry: bool = eqx.field(static=True)

    def __init__(
        self,
        layers,
        *,
        input_size: int | None = None,
        key=None,
        time_major: bool = False,
        return_carry: bool = False,
    ):
        if input_size is not None:
            input_size = _checks.check_positive_int("input_size", input_size)
        self.layers = _build_layers(layers, input_size, key)
        self.time_major = _flag("time_major", time_major)
        self.return_carry = _flag("return_carry", return_carry)

    @property
    def output_size(self) -> int | None:
        """The last layer's ``output_size`` (None when it has none)."""
        return getattr(self.layers[-1], "output_size", None)

    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        seq_lengths=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        key=None,
    ):
        del key  # the layers take no randomness
        n = len(self.layers)
        return_carry = _flag("return_carry", _pick(return_carry, self.return_carry))
        if initial_carry is None:
            initial_carry = (None,) * n
        elif not isinstance(initial_carry, tuple | list) or len(initial_carry) != n:
            got = type(initial_carry).__name__
            if isinstance(initial_carry, tuple | list):
                got += f" of {len(initial_carry)}"
            raise TypeError(
                f"initial_carry: expected a tuple of {n} carries (one per layer, None for "
                f"zeros), got {got}"
            )
        time_major = _pick(time_major, self.time_major)
        carries, h = [], inputs
        for layer, c in zip(self.layers, initial_carry):
            out = layer(
                h, c, seq_lengths=seq_lengths, return_carry=return_carry, time_major=time_major
            )
            c, h = out if return_carry else (None, out)
            carries.append(c)
        return (tuple(carries), h) if return_carry else h


# -- weights from and to eqx.nn.LSTMCell / eqx.nn.GRUCell -------------------------------------


def _kind(cell) -> tuple[int, str]:
    if isinstance(cell, eqx.nn.LSTMCell):
        return 4, "LSTMCell"
    if isinstance(cell, eqx.nn.GRUCell):
        return 3, "GRUCell"
    raise TypeError(f"cell: expected eqx.nn.LSTMCell or eqx.nn.GRUCell, got {type(cell).__name__}")


def cell_from_equinox(cell):
    """An ``eqx.nn.LSTMCell``/``GRUCell`` -> ``(jaxseq cell, its params)``, the same function.

    Equinox keeps ``weight_ih [G*H, D]``, ``weight_hh [G*H, H]`` and ``bias
    [G*H]`` with the gates in jaxseq's (PyTorch's) order, LSTM i, f, g, o and
    GRU r, z, n, and its GRU's ``bias_n [H]`` sits inside the reset, ``tanh(x
    W_in + b_n + r * (h W_hn + bias_n))``, exactly as jaxseq's ``b_hn``. So
    ``w_ih = weight_ih.T``, ``w_hh = weight_hh.T``, ``b = bias`` and ``b_hn =
    bias_n`` (zeros for ``use_bias=False``): the outputs are equal, not close.

    >>> import jax, equinox as eqx, jaxseq.equinox as jeqx
    >>> cell, params = jeqx.cell_from_equinox(eqx.nn.GRUCell(3, 2, key=jax.random.key(0)))
    >>> cell, params.w_ih.shape, params.b_hn.shape  # D=3, H=2
    (GRU(hidden_size=2, ...), (3, 6), (2,))
    """
    g, label = _kind(cell)
    h, d = int(cell.hidden_size), int(cell.input_size)
    w_ih, w_hh = cell.weight_ih, cell.weight_hh
    _checks.check_shape(f"{label}.weight_ih", w_ih, (g * h, d), ("G*H", "D"))
    _checks.check_shape(f"{label}.weight_hh", w_hh, (g * h, h), ("G*H", "H"))
    dtype = w_ih.dtype
    bias = cell.bias if cell.bias is not None else jnp.zeros((g * h,), dtype)
    _checks.check_shape(f"{label}.bias", bias, (g * h,), ("G*H",))
    if g == 4:
        return LSTM(h), LSTMParams(w_ih.T, w_hh.T, bias)
    bias_n = cell.bias_n if cell.bias_n is not None else jnp.zeros((h,), dtype)
    _checks.check_shape(f"{label}.bias_n", bias_n, (h,), ("H",))
    return GRU(h), GRUParams(w_ih.T, w_hh.T, bias, bias_n)


def cell_to_equinox(cell, params):
    """Inverse of :func:`cell_from_equinox`: ``js.LSTM``/``js.GRU`` and params -> the Equinox cell.

    The cell is ``eqx.nn.LSTMCell``/``GRUCell(D, H, use_bias=True)`` in the
    params' dtype, with ``weight_ih = w_ih.T``, ``weight_hh = w_hh.T``, ``bias
    = b`` (and ``bias_n = b_hn``). ``js.RNN`` has no Equinox cell (TypeError).

    >>> import jax, jaxseq as js, jaxseq.equinox as jeqx
    >>> params = js.LSTM(2).init(jax.random.key(0), 3)
    >>> eqx_cell = jeqx.cell_to_equinox(js.LSTM(2), params)
    >>> type(eqx_cell).__name__, eqx_cell.weight_ih.shape  # [4H, D]
    ('LSTMCell', (8, 3))
    """
    if type(cell) not in (LSTM, GRU):
        raise TypeError(
            f"cell: expected js.LSTM or js.GRU (Equinox has LSTMCell and GRUCell), "
            f"got {type(cell).__name__}"
        )
    cell.check_params(params)
    d, h = int(params.w_ih.shape[0]), cell.hidden_size
    dtype = params.w_ih.dtype
    if isinstance(cell, LSTM):
        new = eqx.nn.LSTMCell(d, h, dtype=dtype, key=jax.random.key(0))
        where = lambda c: (c.weight_ih, c.weight_hh, c.bias)
        return eqx.tree_at(where, new, (params.w_ih.T, params.w_hh.T, params.b))
    new = eqx.nn.GRUCell(d, h, dtype=dtype, key=jax.random.key(0))
    where = lambda c: (c.weight_ih, c.weight_hh, c.bias, c.bias_n)
    return eqx.tree_at(where, new, (params.w_ih.T, params.w_hh.T, params.b, params.b_hn))


def from_equinox(cell, **options) -> RNN:
    """An ``eqx.nn.LSTMCell``/``GRUCell`` -> an :class:`RNN` over its weights (see :func:`cell_from_equinox`).

    ``options`` are :class:`RNN`'s (``time_major``, ``return_carry``,
    ``reverse``, ``keep_order``, ``unroll``, ``kernel``). The module computes
    what ``jax.lax.scan`` of the cell computes over ``[T, D]``, for any batch
    dims and with the fused kernels.

    >>> import jax, jax.numpy as jnp, equinox as eqx, jaxseq.equinox as jeqx
    >>> cell = eqx.nn.LSTMCell(3, 4, key=jax.random.key(0))
    >>> xs = jax.random.normal(jax.random.key(1), (5, 3))  # [T, D]
    >>> step = lambda state, x: (cell(x, state), cell(x, state)[0])
    >>> _, want = jax.lax.scan(step, (jnp.zeros(4), jnp.zeros(4)), xs)
    >>> bool(jnp.allclose(jeqx.from_equinox(cell)(xs), want, atol=1e-6))
    True
    """
    js_cell, params = cell_from_equinox(cell)
    for name in ("input_size", "key", "params", "dtype"):
        if name in options:
            raise TypeError(f"{name}: set by the Equinox cell, got {name}={options[name]!r:.40}")
    return RNN(js_cell, input_size=int(cell.input_size), params=params, **options)


def to_equinox(rnn):
    """Inverse of :func:`from_equinox`: an :class:`RNN` of ``js.LSTM``/``js.GRU`` -> the Equinox cell.

    >>> import jax, jaxseq as js, jaxseq.equinox as jeqx
    >>> rnn = jeqx.RNN(js.GRU(2), input_size=3, key=jax.random.key(0))
    >>> eqx_cell = jeqx.to_equinox(rnn)
    >>> type(eqx_cell).__name__, eqx_cell.bias_n.shape  # [H]
    ('GRUCell', (2,))
    """
    if not isinstance(rnn, RNN):
        raise TypeError(f"rnn: expected jaxseq.equinox.RNN, got {type(rnn).__name__}")
    return cell_to_equinox(rnn.cell, rnn.params)
