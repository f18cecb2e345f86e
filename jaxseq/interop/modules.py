"""The framework-free core of the framework modules (:mod:`jaxseq.flax`, :mod:`jaxseq.equinox`).

``flax.linen.RNN``'s computation on a jaxseq cell or layer (:func:`run_rnn`),
the sequence flip it uses (:func:`flip_sequences`) and the pieces of a
bidirectional module (:func:`split_carry`, :func:`merge_directions`), written
once so the linen, NNX and Equinox modules share one code path and read alike.
Nothing here imports Flax or Equinox.

Shapes: ``inputs [*B, T, D] -> outputs [*B, T, H]`` (batch-major;
``time_major=True``: ``[T, *B, D] -> [T, *B, H]``), ``B`` the batch dims, ``T``
the time steps, ``D`` the input and ``H`` the output features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.interop.flax import carry_from_flax, carry_to_flax
from jaxseq.recurrent.cells import GRU, LSTM, LSTMCarry, RNNCarry
from jaxseq.recurrent.cells import RNN as _RNNCell
from jaxseq.recurrent.rollouts import rollout

__all__ = [
    "carry_from_equinox",
    "carry_to_equinox",
    "check_layer",
    "flip_sequences",
    "merge_directions",
    "run_rnn",
    "split_carry",
]

_BUILTIN = (_RNNCell, LSTM, GRU)


def _is_layer(layer) -> bool:
    return callable(getattr(layer, "rollout", None))


def check_layer(layer, name: str = "cell") -> None:
    """A jaxseq cell (``init``/``initial_carry``/``step``) or sequence layer (``rollout``).

    A Flax or Equinox cell is refused with a hint: the modules take the jaxseq
    cell of its kind.

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
        framework = type(layer).__module__.split(".")[0]
        hint = {
            "flax": " (a Flax cell: pass the jaxseq cell of its kind)",
            "equinox": (
                " (an Equinox cell: pass the jaxseq cell of its kind, or convert it "
                "with jaxseq.equinox.from_equinox)"
            ),
        }.get(framework, "")
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


def carry_from_equinox(cell, carry):
    """An Equinox cell's state -> the jaxseq carry: LSTM ``(h, c)`` -> ``LSTMCarry(h, c)``, GRU/RNN ``h`` -> ``RNNCarry(h)``.

    Leaves are ``[*B, H]``. jaxseq's own carries pass through unchanged.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> carry = carry_from_equinox(js.LSTM(2), (jnp.ones(2), jnp.zeros(2)))
    >>> type(carry).__name__, carry.h.tolist()
    ('LSTMCarry', [1.0, 1.0])
    """
    if isinstance(cell, LSTM):
        if not isinstance(carry, tuple | list) or len(carry) != 2:
            raise TypeError(
                f"initial_carry: expected an LSTM state (h, c) for js.LSTM(hidden_size="
                f"{cell.hidden_size}), got {type(carry).__name__}"
            )
        return LSTMCarry(*carry)
    if isinstance(carry, RNNCarry):
        return carry
    if not hasattr(carry, "shape"):
        raise TypeError(
            f"initial_carry: expected the hidden state h [*B, H] for {type(cell).__name__}"
            f"(hidden_size={cell.hidden_size}), got {type(carry).__name__}"
        )
    return RNNCarry(carry)


def carry_to_equinox(cell, carry):
    """Inverse of :func:`carry_from_equinox`: ``LSTMCarry(h, c)`` stays (it is Equinox's ``(h, c)``), ``RNNCarry(h)`` -> ``h``.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> carry_to_equinox(js.GRU(2), js.recurrent.RNNCarry(jnp.ones(2))).tolist()
    [1.0, 1.0]
    """
    return carry if isinstance(cell, LSTM) else carry.h


_CARRIES = {
    "flax": (carry_from_flax, carry_to_flax),
    "equinox": (carry_from_equinox, carry_to_equinox),
}


def _check_lengths(seq_lengths, inputs, batch_shape, t: int, layout: str):
    if seq_lengths is None:
        return None
    lengths = _checks.as_array("seq_lengths", seq_lengths)
    _checks.check_integer("seq_lengths", lengths)
    if tuple(lengths.shape) != batch_shape:
        raise ValueError(
            f"seq_lengths: expected shape {list(batch_shape)} (the batch dims of inputs "
            f"{_checks.describe(inputs)}, {layout}), got {_checks.describe(lengths)}"
        )
    _checks.check_in_range("seq_lengths", lengths, 0, t, f" (T={t})")
    return lengths.astype(jnp.int32)


def _carry_at_lengths(layer, params, xs_p, carry, lengths, full_carry, ys, kw):
    """The carry after each sequence's last valid step (after all ``T`` at length 0)."""
    if type(layer) in (_RNNCell, GRU):  # carry == output: read it off the outputs
        return RNNCarry(_last_valid(ys, lengths))
    last, _ = rollout(layer, params, xs_p, carry, lengths=lengths, **kw)
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(
            (lengths > 0).reshape(lengths.shape + (1,) * (a.ndim - lengths.ndim)), a, b
        ),
        last,
        full_carry,
    )


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
    carries: str = "flax",
):
    """``flax.linen.RNN``'s computation on a jaxseq cell or layer: ``(carry or None, outputs)``.

    Batch-major ``inputs [*B, T, D]`` (``time_major``: ``[T, *B, D]``), outputs
    ``[*B, T, H]`` laid out the same way. For a built-in cell the carries are
    the framework's (``carries="flax"``: an LSTM's is ``(c, h)``, a GRU's/RNN's
    ``h``; ``carries="equinox"``: ``LSTMCarry(h, c)``, which is Equinox's
    ``(h, c)``, and ``h``), for anything else jaxseq's. See
    :class:`jaxseq.flax.linen.RNN` for the semantics.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.GRU(3)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> carry, ys = run_rnn(cell, params, jnp.ones((4, 5, 2)), return_carry=True)  # [B, T, D]
    >>> ys.shape, carry.shape
    ((4, 5, 3), (4, 3))
    """
    time_major = _check_flag("time_major", time_major)
    reverse = _check_flag("reverse", reverse)
    keep_order = _check_flag("keep_order", keep_order)
    return_carry = _check_flag("return_carry", return_carry)
    _checks.check_choice("carries", carries, tuple(_CARRIES))
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        raise TypeError(f"inputs: expected an array, got {type(inputs).__name__}")
    layout = "[T, *B, D]" if time_major else "[*B, T, D]"
    _checks.check_min_ndim("inputs", inputs, 2, f"{layout} (time_major={time_major})")
    _checks.check_floating("inputs", inputs)
    xs = inputs if time_major else jnp.moveaxis(inputs, -2, 0)
    t, batch_shape = xs.shape[0], tuple(xs.shape[1:-1])
    framework_carry = isinstance(layer, _BUILTIN)
    carry_in, carry_out = _CARRIES[carries]
    carry = initial_carry
    if carry is not None and framework_carry:
        carry = carry_in(layer, carry)
    lengths = _check_lengths(seq_lengths, inputs, batch_shape, t, layout)
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
        out_carry, ys = rollout(layer, params, xs_p, carry, **kw)
        if return_carry and t > 0:
            out_carry = _carry_at_lengths(layer, params, xs_p, carry, lengths, out_carry, ys, kw)
        if reverse and keep_order:
            ys = flip_sequences(ys, lengths)
    if not time_major:
        ys = jnp.moveaxis(ys, 0, -2)
    if not return_carry:
        return None, ys
    return (carry_out(layer, out_carry) if framework_carry else out_carry), ys


def split_carry(initial_carry):
    """``(forward carry, backward carry)`` of a bidirectional module's ``initial_carry``.

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


def merge_directions(merge_fn, out_f, out_b, return_carry: bool):
    """Both directions' results -> ``outputs`` or ``((carry_f, carry_b), outputs)``.

    ``out_f``/``out_b`` are what each direction returned: ``outputs [*B, T, H]``
    or, with ``return_carry``, ``(carry, outputs)``; ``merge_fn`` merges the
    outputs (e.g. concatenates their features).

    >>> import jax.numpy as jnp
    >>> cat = lambda a, b: jnp.concatenate([a, b], axis=-1)
    >>> merge_directions(cat, jnp.ones((2, 5, 3)), jnp.ones((2, 5, 4)), False).shape
    (2, 5, 7)
    >>> (carries, ys) = merge_directions(cat, ("cf", jnp.ones((5, 1))), ("cb", jnp.ones((5, 1))), True)
    >>> carries, ys.shape
    (('cf', 'cb'), (5, 2))
    """
    if not return_carry:
        return jax.tree_util.tree_map(merge_fn, out_f, out_b)
    (cf, yf), (cb, yb) = out_f, out_b
    return (cf, cb), jax.tree_util.tree_map(merge_fn, yf, yb)
