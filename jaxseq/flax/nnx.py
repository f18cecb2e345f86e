"""Flax NNX modules over the jaxseq kernels: ``RNN``, ``Bidirectional`` and :func:`from_flax`.

``RNN(cell, in_features, rngs=...)`` has the call signature of
``flax.nnx.RNN`` and returns what it returns (the semantics are those of
:class:`jaxseq.flax.linen.RNN`, which are Flax's), but runs
:func:`jaxseq.rollout` (the fused kernels) instead of a per-step scan. Its
parameters are the jaxseq parameter pytree of the cell (or layer), with an
``nnx.Param`` at each leaf, under the attribute ``params``: the module works
under ``nnx.jit``, ``nnx.grad``/``nnx.value_and_grad``, ``nnx.split``/``merge``
and with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``::

    nnx.RNN(nnx.OptimizedLSTMCell(d, 256, rngs=rngs))  ->  RNN(js.LSTM(256), d, rngs=rngs)

:func:`from_flax` converts an existing ``nnx.RNN`` (or ``nnx.Bidirectional``)
with its trained weights. Shapes: ``inputs [*B, T, D] -> outputs [*B, T, H]``
(``time_major=True``: ``[T, *B, D] -> [T, *B, H]``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseq import _checks
from jaxseq.interop.flax import from_flax as _params_from_flax_dict
from jaxseq.interop.modules import check_layer, merge_directions, run_rnn, split_carry
from jaxseq.recurrent.cells import GRU, LSTM
from jaxseq.recurrent.cells import RNN as _RNNCell

__all__ = ["RNN", "Bidirectional", "from_flax"]


def _is_variable(v) -> bool:
    return isinstance(v, nnx.Variable)


class RNN(nnx.Module):
    """``flax.nnx.RNN`` over a jaxseq cell or layer, run by :func:`jaxseq.rollout`.

    Args:
      cell: a jaxseq cell (``js.LSTM(256)``, ``js.GRU``, ``js.RNN``, a custom
        cell) or layer (``js.Stack``, ``js.Bidirectional``).
      in_features: ``D``, the size of the inputs' last axis.
      rngs: ``nnx.Rngs``; its ``params`` stream initialises the parameters
        (with ``cell.init``).
      time_major, return_carry, reverse, keep_order: as in ``flax.nnx.RNN``
        (defaults for ``__call__``).
      unroll, kernel: passed to :func:`jaxseq.rollout` (``"auto"``: its choice).
      param_dtype: dtype of the parameters (float32).

    Attributes: ``cell`` (the jaxseq cell, static) and ``params`` (its
    parameter pytree, an ``nnx.Param`` at each leaf).

    Call: ``rnn(inputs, initial_carry=None, *, seq_lengths, return_carry,
    time_major, reverse, keep_order, rngs)`` returns ``outputs [*B, T, H]`` or
    ``(carry, outputs)``; ``rngs`` is accepted for the signature and unused
    (carries start at zeros). The semantics under ``seq_lengths`` and
    ``reverse`` are Flax's, as described in :class:`jaxseq.flax.linen.RNN`
    (padded outputs continue over the padding, a length-0 carry is the one
    after all ``T`` steps, an LSTM carry is ``(c, h)``).

    >>> import jax, jax.numpy as jnp, optax, jaxseq as js, jaxseq.flax
    >>> from flax import nnx
    >>> rnn = jaxseq.flax.nnx.RNN(js.GRU(4), 3, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 5, 3))  # [B, T, D]
    >>> rnn(x, seq_lengths=jnp.array([5, 2])).shape, rnn.params.w_ih.shape
    ((2, 5, 4), (3, 12))
    >>> optimizer = nnx.Optimizer(rnn, optax.sgd(0.1), wrt=nnx.Param)
    >>> loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(rnn)
    >>> _ = optimizer.update(rnn, grads)
    """

    def __init__(
        self,
        cell,
        in_features: int,
        *,
        rngs: nnx.Rngs,
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll="auto",
        kernel: str = "auto",
        param_dtype=jnp.float32,
    ):
        check_layer(cell)
        in_features = _checks.check_positive_int("in_features", in_features)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs: expected nnx.Rngs, got {type(rngs).__name__}")
        self.cell = cell
        self.in_features = in_features
        self.time_major = time_major
        self.return_carry = return_carry
        self.reverse = reverse
        self.keep_order = keep_order
        self.unroll = unroll
        self.kernel = kernel
        params = cell.init(rngs.params(), in_features, param_dtype)
        self.params = nnx.data(jax.tree_util.tree_map(nnx.Param, params))

    def param_values(self):
        """The jaxseq parameter pytree as arrays (``params`` without the ``nnx.Param`` boxes).

        >>> import jaxseq as js, jaxseq.flax
        >>> from flax import nnx
        >>> rnn = jaxseq.flax.nnx.RNN(js.LSTM(2), 3, rngs=nnx.Rngs(0))
        >>> type(rnn.param_values()).__name__, rnn.param_values().w_ih.shape
        ('LSTMParams', (3, 8))
        """
        return jax.tree_util.tree_map(lambda v: v[...], self.params, is_leaf=_is_variable)

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
        rngs=None,
    ):
        del rngs  # carries start at zeros
        pick = lambda v, d: d if v is None else v
        carry, ys = run_rnn(
            self.cell,
            self.param_values(),
            inputs,
            initial_carry,
            seq_lengths=seq_lengths,
            time_major=pick(time_major, self.time_major),
            reverse=pick(reverse, self.reverse),
            keep_order=pick(keep_order, self.keep_order),
            return_carry=pick(return_carry, self.return_carry),
            unroll=self.unroll,
            kernel=self.kernel,
        )
        return ys if carry is None else (carry, ys)


def _concatenate(a, b):
    return jnp.concatenate([a, b], axis=-1)


class Bidirectional(nnx.Module):
    """``flax.nnx.Bidirectional``: a forward and a backward RNN, outputs merged.

    ``forward_rnn`` runs with ``reverse=False``, ``backward_rnn`` with
    ``reverse=True, keep_order=True`` on the same ``seq_lengths``; outputs are
    merged by ``merge_fn`` (feature concatenation by default), the carry is
    ``(forward carry, backward carry)``. The halves are :class:`RNN` s or any
    modules with ``flax.nnx.RNN``'s call signature. ``rngs`` is accepted for
    the signature and unused.

    >>> import jax.numpy as jnp, jaxseq as js, jaxseq.flax
    >>> from flax import nnx
    >>> from jaxseq.flax.nnx import RNN, Bidirectional
    >>> rngs = nnx.Rngs(0)
    >>> layer = Bidirectional(RNN(js.LSTM(3), 4, rngs=rngs), RNN(js.LSTM(3), 4, rngs=rngs))
    >>> layer(jnp.ones((2, 5, 4)), seq_lengths=jnp.array([5, 1])).shape
    (2, 5, 6)
    """

    def __init__(
        self,
        forward_rnn,
        backward_rnn,
        *,
        merge_fn: Callable = _concatenate,
        time_major: bool = False,
        return_carry: bool = False,
        rngs=None,
    ):
        del rngs
        for name, half in (("forward_rnn", forward_rnn), ("backward_rnn", backward_rnn)):
            if not callable(half):
                raise TypeError(f"{name}: expected an RNN module, got {type(half).__name__}")
        self.forward_rnn = forward_rnn
        self.backward_rnn = backward_rnn
        self.merge_fn = merge_fn
        self.time_major = time_major
        self.return_carry = return_carry

    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        rngs=None,
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
        common = dict(seq_lengths=seq_lengths, return_carry=return_carry, time_major=time_major)
        out_f = self.forward_rnn(inputs, initial_carry=carry_f, rngs=rngs, reverse=False, **common)
        out_b = self.backward_rnn(
            inputs, initial_carry=carry_b, rngs=rngs, reverse=True, keep_order=True, **common
        )
        return merge_directions(self.merge_fn, out_f, out_b, return_carry)


# -- weights from flax.nnx cells ------------------------------------------------------------


def _value(module, name: str, attr: str, where: str):
    sub = getattr(module, name, None)
    var = getattr(sub, attr, None)
    if var is None:
        raise ValueError(f"{where}.{name}.{attr}: missing (got {type(sub).__name__})")
    return var[...]


def _check_fn(where: str, fn, allowed: dict):
    for label, ref in allowed.items():
        if fn is ref:
            return label
    raise ValueError(
        f"{where}: expected one of {sorted(allowed)} (the jaxseq cells' nonlinearities), got {fn!r}"
    )


def cell_from_flax(cell):
    """An ``nnx`` cell -> ``(jaxseq cell, its params)`` with the same function and weights.

    ``nnx.LSTMCell``/``OptimizedLSTMCell`` -> ``js.LSTM``, ``nnx.GRUCell`` ->
    ``js.GRU`` (its recurrent side has no bias: ``b_hn = 0``),
    ``nnx.SimpleCell`` -> ``js.RNN`` (tanh or relu; ``residual=True`` folded
    into ``w_hh``). The weights go through :func:`jaxseq.interop.from_flax`.

    >>> import jaxseq.flax
    >>> from flax import nnx
    >>> cell, params = cell_from_flax(nnx.GRUCell(3, 2, rngs=nnx.Rngs(0)))
    >>> cell, params.w_ih.shape, params.b_hn.tolist()
    (GRU(hidden_size=2, ...), (3, 6), [0.0, 0.0])
    """
    where = "cell"
    sigmoid, tanh, relu = jax.nn.sigmoid, jnp.tanh, jax.nn.relu
    h = getattr(cell, "hidden_features", None)
    if isinstance(cell, nnx.LSTMCell | nnx.OptimizedLSTMCell | nnx.GRUCell):
        _check_fn(f"{where}.gate_fn", cell.gate_fn, {"sigmoid": sigmoid})
        _check_fn(f"{where}.activation_fn", cell.activation_fn, {"tanh": tanh})
    if isinstance(cell, nnx.LSTMCell):
        names = {"ii": "ii", "if": "if_", "ig": "ig", "io": "io"}
        d = {k: {"kernel": _value(cell, v, "kernel", where)} for k, v in names.items()}
        for g in "ifgo":
            d[f"h{g}"] = {
                "kernel": _value(cell, f"h{g}", "kernel", where),
                "bias": _value(cell, f"h{g}", "bias", where),
            }
        js_cell = LSTM(h)
    elif isinstance(cell, nnx.OptimizedLSTMCell):
        wi = jnp.split(_value(cell, "dense_i", "kernel", where), 4, axis=-1)
        wh = jnp.split(_value(cell, "dense_h", "kernel", where), 4, axis=-1)
        bh = jnp.split(_value(cell, "dense_h", "bias", where), 4, axis=-1)
        d = {f"i{g}": {"kernel": wi[j]} for j, g in enumerate("ifgo")}
        d.update({f"h{g}": {"kernel": wh[j], "bias": bh[j]} for j, g in enumerate("ifgo")})
        js_cell = LSTM(h)
    elif isinstance(cell, nnx.GRUCell):
        wi = jnp.split(_value(cell, "dense_i", "kernel", where), 3, axis=-1)
        bi = jnp.split(_value(cell, "dense_i", "bias", where), 3, axis=-1)
        wh = jnp.split(_value(cell, "dense_h", "kernel", where), 3, axis=-1)
        d = {f"i{g}": {"kernel": wi[j], "bias": bi[j]} for j, g in enumerate("rzn")}
        d.update({f"h{g}": {"kernel": wh[j]} for j, g in enumerate("rz")})
        d["hn"] = {"kernel": wh[2], "bias": jnp.zeros_like(bi[2])}
        js_cell = GRU(h)
    elif isinstance(cell, nnx.SimpleCell):
        act = _check_fn(f"{where}.activation_fn", cell.activation_fn, {"tanh": tanh, "relu": relu})
        d = {
            "i": {
                "kernel": _value(cell, "dense_i", "kernel", where),
                "bias": _value(cell, "dense_i", "bias", where),
            },
            "h": {"kernel": _value(cell, "dense_h", "kernel", where)},
        }
        js_cell = _RNNCell(h, activation=act)
        return js_cell, _params_from_flax_dict(js_cell, d, residual=bool(cell.residual))
    else:
        raise TypeError(
            f"{where}: expected nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell or "
            f"nnx.SimpleCell, got {type(cell).__name__}"
        )
    return js_cell, _params_from_flax_dict(js_cell, d)


def from_flax(rnn, *, rngs: nnx.Rngs | None = None, unroll="auto", kernel: str = "auto"):
    """An ``nnx.RNN`` (or ``nnx.Bidirectional`` of two) -> the same module here, weights included.

    The cell becomes the jaxseq cell of its kind (see :func:`cell_from_flax`);
    ``time_major``, ``return_carry``, ``reverse`` and ``keep_order`` are kept.
    ``rngs`` only seeds the initialisation that the converted weights then
    replace (default ``nnx.Rngs(0)``).

    >>> import jax, jax.numpy as jnp, jaxseq.flax
    >>> from flax import nnx
    >>> old = nnx.RNN(nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0)))
    >>> new = jaxseq.flax.nnx.from_flax(old)
    >>> x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    >>> bool(jnp.allclose(new(x), old(x), atol=1e-6)), new.cell
    (True, LSTM(hidden_size=4, ...))
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if isinstance(rnn, nnx.Bidirectional):
        return Bidirectional(
            from_flax(rnn.forward_rnn, rngs=rngs, unroll=unroll, kernel=kernel),
            from_flax(rnn.backward_rnn, rngs=rngs, unroll=unroll, kernel=kernel),
            merge_fn=rnn.merge_fn,
            time_major=rnn.time_major,
            return_carry=rnn.return_carry,
        )
    if not isinstance(rnn, nnx.RNN):
        raise TypeError(f"rnn: expected nnx.RNN or nnx.Bidirectional, got {type(rnn).__name__}")
    js_cell, params = cell_from_flax(rnn.cell)
    new = RNN(
        js_cell,
        int(rnn.cell.in_features),
        rngs=rngs,
        time_major=rnn.time_major,
        return_carry=rnn.return_carry,
        reverse=rnn.reverse,
        keep_order=rnn.keep_order,
        unroll=unroll,
        kernel=kernel,
        param_dtype=params.w_ih.dtype,
    )
    new.params = nnx.data(jax.tree_util.tree_map(nnx.Param, params))
    return new
