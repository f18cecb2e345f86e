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
from jaxseq.interop.flax import from_flax, to_flax
from jaxseq.interop.modules import check_layer, merge_directions, run_rnn, split_carry
from jaxseq.recurrent.layers import Bidirectional as _JsBidirectional

__all__ = ["RNN", "Bidirectional", "variables_from_flax", "variables_to_flax"]

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
        return merge_directions(self.merge_fn, out_f, out_b, return_carry)


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
