"""Flax linen modules over the jaxseq kernels: ``RNN``, ``Bidirectional`` and the weight converters.

``RNN(cell)`` has the attributes and the call signature of ``flax.linen.RNN``
and returns what it returns, but runs :func:`jaxseq.rollout` (the fused
kernels) instead of a per-step ``nn.scan``. The module's only variable is
``params['cell']``, the cell's (or layer's) jaxseq parameter pytree made by its
``init``: a model switches by one line, and keeps its weights through
:func:`variables_from_flax`::

    nn.RNN(nn.OptimizedLSTMCell(256))  ->  jaxseq.flax.linen.RNN(js.LSTM(256))

Shapes: ``inputs [*B, T, D] -> outputs [*B, T, H]`` (batch-major, Flax's
default; ``time_major=True``: ``[T, *B, D] -> [T, *B, H]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.interop.flax import carry_from_flax, carry_to_flax, from_flax, to_flax
from jaxseq.recurrent.cells import GRU, LSTM, RNNCarry
from jaxseq.recurrent.cells import RNN as _RNNCell
from jaxseq.recurrent.layers import Bidirectional as _JsBidirectional
from jaxseq.recurrent.rollouts import rollout

__all__ = ["RNN", "Bidirectional", "variables_from_flax", "variables_to_flax"]

_BUILTIN = (_RNNCell, LSTM, GRU)


# -- the rollout with Flax's semantics (shared with jaxseq.flax.nnx) ------------------------


def _is_layer(layer) -> bool:
    return callable(getattr(layer, "rollout", None))


def check_layer(layer, name: str = "cell") -> None:
    """A jaxseq cell (``init``/``initial_carry``/``step``) or sequence layer (``rollout``).

    >>> import jaxseq as js
    >>> check_layer(js.LSTM(2))
    >>> check_layer("LSTM")
    Traceback (most recent call last):
    ...
    TypeError: cell: expected a jaxseq cell (js.LSTM(256), js.GRU, js.RNN) or layer ...
    """
    ok = _is_layer(layer) or all(
        callable(getattr(layer, m, None)) for m in ("init", "initial_carry", "step")
    )
    if not ok or not hasattr(layer, "output_size"):
        hint = (
            " (a Flax cell: pass the jaxseq cell of its kind)"
            if isinstance(layer, nn.Module)
            else ""
        )
        raise TypeError(
            f"{name}: expected a jaxseq cell (js.LSTM(256), js.GRU, js.RNN) or layer "
            f"(js.Stack, js.Bidirectional) with an output_size, got {type(layer).__name__}{hint}"
        )


def flip_sequences(xs, lengths):
    """Flax's flip of time-major ``xs: [T, *B, ...]``: each valid part reversed, padding kept after it.

    Position ``t`` takes ``(lengths - 1 - t) mod T`` (the padded part is
    reversed among itself), so the flip is its own inverse. ``lengths`` None:
    the whole time axis is reversed.

    >>> import jax.numpy as jnp
    >>> flip_sequences(jnp.array([[1, 4], [2, 5], [3, 6]]), jnp.array([2, 3])).T.tolist()
    [[2, 1, 3], [6, 5, 4]]
    """
    t = xs.shape[0]
    if lengths is None or t == 0:
        return jnp.flip(xs, axis=0)
    steps = jnp.arange(t - 1, -1, -1, dtype=jnp.int32).reshape((t,) + (1,) * lengths.ndim)
    idx = (steps + lengths[None]) % t
    idx = idx.reshape(idx.shape + (1,) * (xs.ndim - idx.ndim))
    return jnp.take_along_axis(xs, idx, axis=0)


def _last_valid(ys, lengths):
    """``ys[lengths - 1]`` per sequence (``ys[T - 1]`` where the length is 0, as Flax indexes)."""
    t = ys.shape[0]
    idx = jnp.where(lengths > 0, lengths - 1, t - 1)
    idx = idx.reshape((1,) + idx.shape + (1,) * (ys.ndim - 1 - idx.ndim))
    return jnp.take_along_axis(ys, idx, axis=0)[0]


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a Python bool, got {type(value).__name__} {value!r}")
    return value


def run_rnn(
    layer,
    params,
    inputs,
    initial_carry=None,
    *,
    seq_lengths=None,
    time_major: bool = False,
    reverse: bool = False,
    keep_order: bool = False,
    return_carry: bool = False,
    unroll="auto",
    kernel="auto",
):
    """``flax.linen.RNN``'s computation on a jaxseq cell or layer: ``(carry or None, outputs)``.

    Batch-major ``inputs [*B, T, D]`` (``time_major``: ``[T, *B, D]``), outputs
    laid out the same way. For a built-in cell the carries are Flax's (an
    LSTM's is ``(c, h)``), for anything else jaxseq's. See :class:`RNN` for the
    semantics.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.GRU(3)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> carry, ys = run_rnn(cell, params, jnp.ones((4, 5, 2)), return_carry=True)
    >>> ys.shape, carry.shape
    ((4, 5, 3), (4, 3))
    """
    time_major = _check_flag("time_major", time_major)
    reverse = _check_flag("reverse", reverse)
    keep_order = _check_flag("keep_order", keep_order)
    return_carry = _check_flag("return_carry", return_carry)
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        raise TypeError(f"inputs: expected an array, got {type(inputs).__name__}")
    layout = "[T, *B, D]" if time_major else "[*B, T, D]"
    _checks.check_min_ndim("inputs", inputs, 2, f"{layout} (time_major={time_major})")
    _checks.check_floating("inputs", inputs)
    xs = inputs if time_major else jnp.moveaxis(inputs, -2, 0)
    t, batch_shape = xs.shape[0], tuple(xs.shape[1:-1])
    flax_carry = isinstance(layer, _BUILTIN)
    carry = initial_carry
    if carry is not None and flax_carry:
        carry = carry_from_flax(layer, carry)
    lengths = seq_lengths
    if lengths is not None:
        lengths = _checks.as_array("seq_lengths", lengths)
        _checks.check_integer("seq_lengths", lengths)
        if tuple(lengths.shape) != batch_shape:
            raise ValueError(
                f"seq_lengths: expected shape {list(batch_shape)} (the batch dims of inputs "
                f"{_checks.describe(inputs)}, {layout}), got {_checks.describe(lengths)}"
            )
        _checks.check_in_range("seq_lengths", lengths, 0, t, f" (T={t})")
        lengths = lengths.astype(jnp.int32)
    kw = dict(unroll=unroll, kernel=kernel)

    if _is_layer(layer):
        # A layer (js.Stack, js.Bidirectional) gets the lengths: its backward
        # halves then run over each valid part, and padded outputs are zeros.
        out_carry, ys = rollout(layer, params, xs, carry, lengths=lengths, reverse=reverse, **kw)
        if reverse and not keep_order:
            ys = flip_sequences(ys, lengths)
    elif lengths is None:
        out_carry, ys = rollout(layer, params, xs, carry, reverse=reverse, **kw)
        if reverse and not keep_order:
            ys = jnp.flip(ys, axis=0)
    else:
        # Flax's semantics: every step runs, padding included (its outputs are
        # the cell continuing over the padding), on the flipped sequence when
        # reversed; the carry is the one after the last valid step.
        xs_p = flip_sequences(xs, lengths) if reverse else xs
        full_carry, ys = rollout(layer, params, xs_p, carry, **kw)
        out_carry = full_carry
        if return_carry and t > 0:
            if type(layer) in (_RNNCell, GRU):  # carry == output: read it off the outputs
                out_carry = RNNCarry(_last_valid(ys, lengths))
            else:
                last, _ = rollout(layer, params, xs_p, carry, lengths=lengths, **kw)
                out_carry = jax.tree_util.tree_map(
                    lambda a, b: jnp.where(
                        (lengths > 0).reshape(lengths.shape + (1,) * (a.ndim - lengths.ndim)),
                        a,
                        b,
                    ),
                    last,
                    full_carry,
                )
        if reverse and keep_order:
            ys = flip_sequences(ys, lengths)
    if not time_major:
        ys = jnp.moveaxis(ys, 0, -2)
    if not return_carry:
        return None, ys
    return (carry_to_flax(layer, out_carry) if flax_carry else out_carry), ys


# -- linen modules --------------------------------------------------------------------------


class RNN(nn.Module):
    """``flax.linen.RNN`` over a jaxseq cell or layer, run by :func:`jaxseq.rollout`.

    Attributes:
      cell: a jaxseq cell (``js.LSTM(256)``, ``js.GRU``, ``js.RNN``, or any
        object with ``init``/``initial_carry``/``step``/``output_size``) or
        layer (``js.Stack``, ``js.Bidirectional``). Its ``init`` makes the
        module's one parameter, ``params['cell']``.
      time_major, return_carry, reverse, keep_order: as in ``flax.linen.RNN``
        (defaults for ``__call__``).
      unroll, kernel: passed to :func:`jaxseq.rollout` (``"auto"``: its choice).
      param_dtype: dtype of the parameters (float32).

    Call: ``rnn(inputs, initial_carry=None, *, init_key, seq_lengths,
    return_carry, time_major, reverse, keep_order)`` with ``inputs [*B, T, D]``
    (``time_major``: ``[T, *B, D]``) returns ``outputs [*B, T, H]`` or
    ``(carry, outputs)``.

    Semantics are Flax's, which differ from :func:`jaxseq.rollout`'s under
    ``seq_lengths``, for a built-in or other cell:

    * every step runs, padding included: padded outputs are not zeros but the
      cell continuing over the padded inputs (so they depend on them);
    * ``reverse=True`` reverses each valid part and keeps the padding after it
      (the padded part is reversed among itself), and returns the outputs in
      that processed order unless ``keep_order=True`` flips them back;
    * the returned carry is the one after the last valid step, except for a
      length-0 sequence, whose carry is the one after all ``T`` steps over its
      padding (Flax reads index ``-1``), not the initial carry;
    * carries are Flax's: an LSTM's is ``(c, h)``, a GRU's/RNN's is ``h``;
      ``init_key`` is accepted and only checked (carries start at zeros).

    With ``seq_lengths`` and ``return_carry`` an LSTM (or a custom cell) runs a
    second rollout that stops at the lengths, for the carry; GRU/RNN carries
    are read off the outputs. A *layer* (``js.Stack``, ``js.Bidirectional``)
    follows jaxseq under ``seq_lengths`` instead: its outputs equal Flax's
    stacked/bidirectional modules at valid steps, its padded outputs are zeros,
    its carries are jaxseq's (after the last valid step; the initial carry at
    length 0), and its backward halves run over each valid part.

    >>> import jax, jax.numpy as jnp, jaxseq as js, jaxseq.flax
    >>> rnn = jaxseq.flax.linen.RNN(js.LSTM(4), return_carry=True)
    >>> x = jnp.ones((2, 5, 3))  # [B, T, D]
    >>> variables = rnn.init(jax.random.key(0), x)
    >>> (c, h), ys = rnn.apply(variables, x, seq_lengths=jnp.array([5, 2]))
    >>> ys.shape, c.shape, variables["params"]["cell"].w_hh.shape
    ((2, 5, 4), (2, 4), (4, 16))
    """

    cell: Any
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    unroll: Any = "auto"
    kernel: str = "auto"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        init_key=None,
        seq_lengths=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ):
        check_layer(self.cell)
        if init_key is not None:
            _checks.check_key("init_key", init_key)
        pick = lambda v, d: d if v is None else v
        time_major = pick(time_major, self.time_major)
        if not hasattr(inputs, "shape"):
            raise TypeError(f"inputs: expected an array, got {type(inputs).__name__}")
        _checks.check_min_ndim("inputs", inputs, 2, "[*B, T, D] or [T, *B, D]")
        d = inputs.shape[-1]
        params = self.param("cell", lambda key: self.cell.init(key, d, self.param_dtype))
        carry, ys = run_rnn(
            self.cell,
            params,
            inputs,
            initial_carry,
            seq_lengths=seq_lengths,
            time_major=time_major,
            reverse=pick(reverse, self.reverse),
            keep_order=pick(keep_order, self.keep_order),
            return_carry=pick(return_carry, self.return_carry),
            unroll=self.unroll,
            kernel=self.kernel,
        )
        return ys if carry is None else (carry, ys)


def _concatenate(a, b):
    return jnp.concatenate([a, b], axis=-1)


def split_carry(initial_carry):
    """``(forward carry, backward carry)`` of a bidirectional layer's ``initial_carry``.

    None gives ``(None, None)``; anything but a pair is a ``TypeError``.

    >>> split_carry(None)
    (None, None)
    >>> split_carry((1, 2))
    (1, 2)
    """
    if initial_carry is None:
        return None, None
    if not isinstance(initial_carry, tuple | list) or len(initial_carry) != 2:
        raise TypeError(
            f"initial_carry: expected (forward carry, backward carry), got "
            f"{type(initial_carry).__name__}"
        )
    return tuple(initial_carry)


def _merge(merge_fn, out_f, out_b, return_carry: bool):
    """Both directions' results -> ``outputs`` or ``((carry_f, carry_b), outputs)``.

    The halves are asked for their carries only when they are returned, so
    under ``seq_lengths`` no carry is computed for nothing.
    """
    if not return_carry:
        return jax.tree_util.tree_map(merge_fn, out_f, out_b)
    (cf, yf), (cb, yb) = out_f, out_b
    return (cf, cb), jax.tree_util.tree_map(merge_fn, yf, yb)


class Bidirectional(nn.Module):
    """``flax.linen.Bidirectional``: a forward and a backward RNN, outputs merged.

    ``forward_rnn`` runs with ``reverse=False``, ``backward_rnn`` with
    ``reverse=True, keep_order=True`` (Flax's semantics, see :class:`RNN`), both
    on the same ``seq_lengths`` (asked for their carries only when
    ``return_carry``; Flax always asks); the outputs are merged by ``merge_fn``
    (concatenation along the features by default) and the carry is
    ``(forward carry, backward carry)``. The halves are any modules with
    ``flax.linen.RNN``'s call signature, :class:`RNN` in particular; the
    variables are ``params['forward_rnn']`` and ``params['backward_rnn']``, as
    in Flax.

    >>> import jax, jax.numpy as jnp, jaxseq as js, jaxseq.flax
    >>> from jaxseq.flax.linen import RNN, Bidirectional
    >>> layer = Bidirectional(RNN(js.GRU(3)), RNN(js.GRU(2)))
    >>> x = jnp.ones((2, 5, 4))  # [B, T, D]
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x, seq_lengths=jnp.array([5, 3])).shape
    (2, 5, 5)
    """

    forward_rnn: nn.Module
    backward_rnn: nn.Module
    merge_fn: Callable = _concatenate
    time_major: bool = False
    return_carry: bool = False

    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        init_key=None,
        seq_lengths=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ):
        del reverse, keep_order  # fixed per direction, as in Flax
        time_major = self.time_major if time_major is None else time_major
        return_carry = self.return_carry if return_carry is None else return_carry
        carry_f, carry_b = split_carry(initial_carry)
        key_f = key_b = None
        if init_key is not None:
            _checks.check_key("init_key", init_key)
            key_f, key_b = jax.random.split(init_key)
        common = dict(seq_lengths=seq_lengths, return_carry=return_carry, time_major=time_major)
        out_f = self.forward_rnn(
            inputs, initial_carry=carry_f, init_key=key_f, reverse=False, **common
        )
        out_b = self.backward_rnn(
            inputs, initial_carry=carry_b, init_key=key_b, reverse=True, keep_order=True, **common
        )
        return _merge(self.merge_fn, out_f, out_b, return_carry)


# -- weights from and to flax.linen.RNN -----------------------------------------------------


def _params_of(variables, where: str = "variables"):
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"{where}: expected a mapping ({{'params': ...}} or the params dict), "
            f"got {type(variables).__name__}"
        )
    return variables["params"] if "params" in variables else variables


def variables_from_flax(cell, variables, *, residual: bool = False) -> dict:
    """Variables of a ``flax.linen.RNN`` -> those of :class:`RNN` (a trained model switches).

    Args:
      cell: the jaxseq cell of the new module, the kind of the Flax cell:
        ``js.LSTM`` for ``LSTMCell``/``OptimizedLSTMCell``, ``js.GRU`` for
        ``GRUCell``, ``js.RNN`` for ``SimpleCell`` (same ``hidden_size``, and
        the activation of the Flax cell). For a ``flax.linen.Bidirectional`` of
        two ``nn.RNN``: ``js.Bidirectional(forward cell, backward cell)``,
        which maps ``forward_rnn``/``backward_rnn`` for :class:`Bidirectional`.
      variables: ``{'params': {'cell': {...}}}`` of the ``nn.RNN`` (or the
        params dict inside it).
      residual: ``SimpleCell(residual=True)`` (folded into ``w_hh``).

    Returns:
      ``{'params': {'cell': <jaxseq params>}}`` (Bidirectional:
      ``{'params': {'forward_rnn': {'cell': ...}, 'backward_rnn': {'cell': ...}}}``).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxseq as js, jaxseq.flax
    >>> x = jnp.ones((2, 5, 3))
    >>> old = nn.RNN(nn.OptimizedLSTMCell(4))
    >>> new = jaxseq.flax.linen.RNN(js.LSTM(4))
    >>> old_variables = old.init(jax.random.key(0), x)
    >>> variables = jaxseq.flax.linen.variables_from_flax(js.LSTM(4), old_variables)
    >>> bool(jnp.allclose(new.apply(variables, x), old.apply(old_variables, x), atol=1e-6))
    True
    """
    params = _params_of(variables)
    if isinstance(cell, _JsBidirectional):
        out = {}
        for half, sub in (("forward_rnn", cell.forward), ("backward_rnn", cell.backward)):
            if not isinstance(params, Mapping) or half not in params:
                got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
                raise ValueError(
                    f"variables: expected flax.linen.Bidirectional params with "
                    f"'forward_rnn' and 'backward_rnn', got {got}"
                )
            out[half] = variables_from_flax(sub, params[half], residual=residual)["params"]
        return {"params": out}
    if isinstance(params, Mapping) and "cell" in params:
        params = params["cell"]
    return {"params": {"cell": from_flax(cell, params, residual=residual)}}


def variables_to_flax(cell, variables, *, residual: bool = False) -> dict:
    """Inverse of :func:`variables_from_flax`: :class:`RNN` variables -> ``flax.linen.RNN``'s.

    >>> import jax, jax.numpy as jnp, jaxseq as js, jaxseq.flax
    >>> rnn = jaxseq.flax.linen.RNN(js.GRU(2))
    >>> variables = rnn.init(jax.random.key(0), jnp.ones((1, 4, 3)))
    >>> back = jaxseq.flax.linen.variables_to_flax(js.GRU(2), variables)
    >>> sorted(back["params"]["cell"])
    ['hn', 'hr', 'hz', 'in', 'ir', 'iz']
    """
    params = _params_of(variables)
    if isinstance(cell, _JsBidirectional):
        return {
            "params": {
                half: variables_to_flax(sub, params[half], residual=residual)["params"]
                for half, sub in (("forward_rnn", cell.forward), ("backward_rnn", cell.backward))
            }
        }
    if isinstance(params, Mapping) and "cell" in params:
        params = params["cell"]
    return {"params": {"cell": to_flax(cell, params, residual=residual)["params"]}}
