"""Pure-function recurrent cells: Elman RNN (tanh/ReLU), LSTM, GRU.

A cell is a small frozen config object; its methods are pure functions of
``(params, carry, x)``::

    cell = js.LSTM(hidden_size=256)
    params = cell.init(key, input_size=128)          # LSTMParams of arrays
    carry = cell.initial_carry(batch_shape=(32,))    # LSTMCarry(h, c), zeros
    carry, y = cell.step(params, carry, x)           # x: [*B, D] -> y: [*B, H]

Shapes: ``D`` input size, ``H`` hidden size, ``G`` gates (RNN 1, LSTM 4,
GRU 3), ``*B`` any number of leading batch dims (none for per-example use
under ``jax.vmap``).

Weights are stored ``[in, out]`` with the gates concatenated along ``out`` in
PyTorch's order, so ``x @ w_ih`` gives all gate pre-activations at once:
``w_ih: [D, G*H]``, ``w_hh: [H, G*H]``, ``b: [G*H]``.

The step is split in two so rollouts can hoist the input projection out of
the time loop: ``xp = cell.project(params, xs)`` works on any leading shape
(``[T, *B, D] -> [T, *B, G*H]``, one matmul for all steps), and
``cell.recur(params, carry, xp_t)`` does the recurrent part;
``cell.step = recur(project(x))``.

Numerics: matmuls accumulate in float32 and the gate math runs in float32 for
any input dtype (bfloat16 included); the new carry keeps the carry's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq._numerics import add_bias, matmul_f32

__all__ = [
    "GRU",
    "GRUParams",
    "LSTM",
    "LSTMCarry",
    "LSTMParams",
    "RNN",
    "RNNCarry",
    "RNNParams",
]


class RNNParams(NamedTuple):
    """Elman RNN weights: ``w_ih [D, H]``, ``w_hh [H, H]``, ``b [H]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.RNN(4).init(jax.random.key(0), 3)]
    [(3, 4), (4, 4), (4,)]
    """

    w_ih: jax.Array  # [D, H]
    w_hh: jax.Array  # [H, H]
    b: jax.Array  # [H]


class LSTMParams(NamedTuple):
    """LSTM weights, gates i, f, g, o: ``w_ih [D, 4H]``, ``w_hh [H, 4H]``, ``b [4H]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.LSTM(4).init(jax.random.key(0), 3)]
    [(3, 16), (4, 16), (16,)]
    """

    w_ih: jax.Array  # [D, 4H], gates i, f, g, o
    w_hh: jax.Array  # [H, 4H]
    b: jax.Array  # [4H]


class GRUParams(NamedTuple):
    """GRU weights, gates r, z, n: ``w_ih [D, 3H]``, ``w_hh [H, 3H]``, ``b [3H]``, ``b_hn [H]``.

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.GRU(4).init(jax.random.key(0), 3)]
    [(3, 12), (4, 12), (12,), (4,)]
    """

    w_ih: jax.Array  # [D, 3H], gates r, z, n
    w_hh: jax.Array  # [H, 3H]
    b: jax.Array  # [3H]  input-side bias (for r and z it also holds the recurrent bias)
    b_hn: jax.Array  # [H]  recurrent bias of n, applied inside the reset: r * (h W_hn + b_hn)


class RNNCarry(NamedTuple):
    """Carry of the RNN and the GRU: ``h [*B, H]``.

    >>> import jaxseq as js
    >>> js.GRU(4).initial_carry((2,)).h.shape
    (2, 4)
    """

    h: jax.Array  # [*B, H]


class LSTMCarry(NamedTuple):
    """Carry of the LSTM: hidden state ``h [*B, H]`` and cell state ``c [*B, H]``.

    >>> import jaxseq as js
    >>> carry = js.LSTM(4).initial_carry((2, 3))
    >>> carry.h.shape, carry.c.shape
    ((2, 3, 4), (2, 3, 4))
    """

    h: jax.Array  # [*B, H]
    c: jax.Array  # [*B, H]


GRUCarry = RNNCarry


class _CellBase:
    """Shared machinery: init by gate blocks, carry construction, validation."""

    num_gates: ClassVar[int]
    carry_type: ClassVar[type[Any]]
    params_type: ClassVar[type[Any]]

    hidden_size: int
    kernel_init: Any
    recurrent_init: Any
    bias_init: Any

    def _validate_config(self):
        _checks.check_positive_int("hidden_size", self.hidden_size)
        for name in ("kernel_init", "recurrent_init", "bias_init"):
            f = getattr(self, name)
            if f is not None and not callable(f):
                raise TypeError(f"{name}: expected an initializer (key, shape, dtype) -> array")

    @property
    def output_size(self) -> int:
        return self.hidden_size

    # -- parameters -----------------------------------------------------------------
    def _inits(self):
        return (
            self.kernel_init or inits.lecun_normal(),
            self.recurrent_init or inits.orthogonal(),
            self.bias_init or inits.zeros(),
        )

    def _init_common(self, key, input_size: int, dtype):
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        h, g = self.hidden_size, self.num_gates
        k_init, r_init, b_init = self._inits()
        kx, kh, kb = jax.random.split(key, 3)
        w_ih = jnp.concatenate([k_init(k, (d, h), dtype) for k in jax.random.split(kx, g)], axis=1)
        w_hh = jnp.concatenate([r_init(k, (h, h), dtype) for k in jax.random.split(kh, g)], axis=1)
        b = jnp.concatenate([b_init(k, (h,), dtype) for k in jax.random.split(kb, g)], axis=0)
        return w_ih, w_hh, b

    def input_size(self, params) -> int:
        """The input size ``D`` the parameters were made for."""
        self.check_params(params)
        return int(params.w_ih.shape[0])

    def check_params(self, params, name: str = "params") -> None:
        if not isinstance(params, self.params_type):
            raise TypeError(
                f"{name}: expected {self.params_type.__name__} for {type(self).__name__}, "
                f"got {type(params).__name__}"
            )
        h, g = self.hidden_size, self.num_gates
        w_ih = params.w_ih
        if w_ih.ndim != 2 or w_ih.shape[1] != g * h:
            raise ValueError(
                f"{name}.w_ih: expected shape [D, {g * h}] (G*H with G={g}, H={h}), "
                f"got {_checks.describe(w_ih)}"
            )
        _checks.check_shape(f"{name}.w_hh", params.w_hh, (h, g * h))
        _checks.check_shape(f"{name}.b", params.b, (g * h,))
        for field in params._fields:
            _checks.check_floating(f"{name}.{field}", getattr(params, field))

    # -- carry ----------------------------------------------------------------------
    @staticmethod
    def _carry_spec(batch_shape, dtype) -> tuple:
        """``batch_shape`` as a tuple of ints, after checking it and ``dtype`` (floating)."""
        try:
            batch_shape = tuple(int(d) for d in batch_shape)
        except TypeError:
            raise TypeError(f"batch_shape: expected a tuple of ints, got {batch_shape!r}") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype: expected a floating dtype, got {jnp.dtype(dtype).name}")
        return batch_shape

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        """Zeros of shape ``[*batch_shape, H]`` for every carry field."""
        batch_shape = self._carry_spec(batch_shape, dtype)
        z = jnp.zeros(batch_shape + (self.hidden_size,), dtype)
        return self.carry_type(*([z] * len(self.carry_type._fields)))

    def check_carry(self, carry, batch_shape, name: str = "carry") -> None:
        if not isinstance(carry, self.carry_type):
            raise TypeError(
                f"{name}: expected {self.carry_type.__name__}{self.carry_type._fields} for "
                f"{type(self).__name__}, got {type(carry).__name__}"
            )
        want = tuple(batch_shape) + (self.hidden_size,)
        for field in carry._fields:
            leaf = getattr(carry, field)
            if not hasattr(leaf, "shape") or tuple(leaf.shape) != want:
                got = _checks.describe(leaf) if hasattr(leaf, "shape") else type(leaf).__name__
                raise ValueError(
                    f"{name}.{field}: expected shape {list(want)} (batch {list(batch_shape)}, "
                    f"H={self.hidden_size}), got {got}"
                )
            _checks.check_floating(f"{name}.{field}", leaf)

    # -- input ----------------------------------------------------------------------
    def check_input(self, params, x, name: str = "x", min_ndim: int = 1) -> None:
        """Checks ``x: [..., D]`` against ``params`` (trace time)."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        _checks.check_floating(name, x)
        _checks.check_min_ndim(name, x, min_ndim, "[..., D]")
        d = params.w_ih.shape[0]
        if x.shape[-1] != d:
            raise ValueError(
                f"{name}: expected last dim D={d} (the input_size of params), got {_checks.describe(x)}"
            )

    # -- computation ----------------------------------------------------------------
    def project(self, params, x: jax.Array) -> jax.Array:
        """Input projection ``x @ w_ih + b``: ``[..., D] -> [..., G*H]`` in float32."""
        self.check_params(params)
        self.check_input(params, x)
        return add_bias(matmul_f32(x, params.w_ih), params.b)

    def step(self, params, carry, x: jax.Array):
        """One step: ``x: [*B, D]`` -> ``(carry, y: [*B, H])``."""
        self.check_params(params)
        self.check_input(params, x)
        self.check_carry(carry, x.shape[:-1])
        return self.recur(params, carry, self.project(params, x))  # type: ignore[attr-defined]

    def check_projected(self, params, xp, carry, name: str = "xp") -> None:
        gh = self.num_gates * self.hidden_size
        if xp.shape[-1:] != (gh,):
            raise ValueError(f"{name}: expected last dim G*H={gh}, got {_checks.describe(xp)}")
        self.check_carry(carry, xp.shape[:-1])


@dataclasses.dataclass(frozen=True)
class RNN(_CellBase):
    r"""Elman RNN: ``h_t = act(x_t W_ih + h_{t-1} W_hh + b)``, ``y_t = h_t``.

    Args:
      hidden_size: H.
      activation: ``"tanh"`` (default) or ``"relu"``.
      kernel_init: initialiser of ``W_ih`` blocks (default LeCun normal).
      recurrent_init: initialiser of ``W_hh`` (default orthogonal; use
        ``initializers.identity()`` with ``activation="relu"`` and zero bias for
        the IRNN of Le et al. 2015, or ``initializers.scaled_normal(c)``).
      bias_init: initialiser of ``b`` (default zeros).

    Carry: ``RNNCarry(h)``. Params: ``RNNParams(w_ih [D, H], w_hh [H, H], b [H])``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.RNN(4, activation="relu")
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> carry, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
    >>> y.shape, bool(jnp.all(y >= 0))
    ((2, 4), True)
    """

    hidden_size: int
    activation: str = "tanh"
    kernel_init: Any = None
    recurrent_init: Any = None
    bias_init: Any = None

    num_gates: ClassVar[int] = 1
    carry_type: ClassVar[type] = RNNCarry
    params_type: ClassVar[type] = RNNParams

    def __post_init__(self):
        self._validate_config()
        _checks.check_choice("activation", self.activation, ("tanh", "relu"))

    def init(self, key, input_size: int, dtype=jnp.float32) -> RNNParams:
        return RNNParams(*self._init_common(key, input_size, dtype))

    def recur(self, params: RNNParams, carry: RNNCarry, xp: jax.Array):
        """Recurrent part of a step given ``xp = project(params, x)``: ``[*B, H]``."""
        z = xp + matmul_f32(carry.h, params.w_hh)
        h = jnp.tanh(z) if self.activation == "tanh" else jax.nn.relu(z)
        h = h.astype(carry.h.dtype)
        return RNNCarry(h), h


@dataclasses.dataclass(frozen=True)
class LSTM(_CellBase):
    r"""LSTM (Hochreiter & Schmidhuber 1997), gates in PyTorch's order i, f, g, o::

        [i, f, g, o] = x_t W_ih + h_{t-1} W_hh + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t),   y_t = h_t

    Args:
      hidden_size: H.
      forget_bias: added to the forget-gate block of ``b`` at initialisation
        (default 1.0, Jozefowicz et al. 2015), so the cell starts by remembering.
      kernel_init, recurrent_init, bias_init: as for :class:`RNN`.

    Carry: ``LSTMCarry(h, c)``. Params: ``LSTMParams(w_ih [D, 4H], w_hh [H, 4H], b [4H])``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.LSTM(4)
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> carry, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
    >>> y.shape, carry.c.shape, params.b[4:8].tolist()  # forget-gate bias 1.0
    ((2, 4), (2, 4), [1.0, 1.0, 1.0, 1.0])
    """

    hidden_size: int
    forget_bias: float = 1.0
    kernel_init: Any = None
    recurrent_init: Any = None
    bias_init: Any = None

    num_gates: ClassVar[int] = 4
    carry_type: ClassVar[type] = LSTMCarry
    params_type: ClassVar[type] = LSTMParams

    def __post_init__(self):
        self._validate_config()

    def init(self, key, input_size: int, dtype=jnp.float32) -> LSTMParams:
        w_ih, w_hh, b = self._init_common(key, input_size, dtype)
        h = self.hidden_size
        b = b.at[h : 2 * h].add(jnp.asarray(self.forget_bias, dtype))
        return LSTMParams(w_ih, w_hh, b)

    def recur(self, params: LSTMParams, carry: LSTMCarry, xp: jax.Array):
        """Recurrent part of a step given ``xp = project(params, x)``: ``[*B, 4H]``."""
        z = xp + matmul_f32(carry.h, params.w_hh)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c.astype(z.dtype) + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        h = h.astype(carry.h.dtype)
        return LSTMCarry(h, c.astype(carry.c.dtype)), h


@dataclasses.dataclass(frozen=True)
class GRU(_CellBase):
    r"""GRU (Cho et al. 2014) with the reset applied after the recurrent matmul,
    as in PyTorch and cuDNN; gates in order r, z, n::

        r = sigmoid(x W_ir + b_r + h W_hr)
        z = sigmoid(x W_iz + b_z + h W_hz)
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
        h_t = (1 - z) * n + z * h_{t-1},   y_t = h_t

    Args:
      hidden_size: H.
      kernel_init, recurrent_init, bias_init: as for :class:`RNN`.

    Carry: ``RNNCarry(h)`` (alias ``GRUCarry``). Params:
    ``GRUParams(w_ih [D, 3H], w_hh [H, 3H], b [3H], b_hn [H])``; PyTorch's
    ``b_ih + b_hh`` is folded into ``b`` for r and z, its ``b_hh`` for n is ``b_hn``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.GRU(4)
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> carry, y = cell.step(params, cell.initial_carry(), jnp.ones(3))  # no batch dims
    >>> y.shape, carry.h.shape
    ((4,), (4,))
    """

    hidden_size: int
    kernel_init: Any = None
    recurrent_init: Any = None
    bias_init: Any = None

    num_gates: ClassVar[int] = 3
    carry_type: ClassVar[type] = RNNCarry
    params_type: ClassVar[type] = GRUParams

    def __post_init__(self):
        self._validate_config()

    def init(self, key, input_size: int, dtype=jnp.float32) -> GRUParams:
        w_ih, w_hh, b = self._init_common(key, input_size, dtype)
        b_hn = self._inits()[2](jax.random.fold_in(key, 7), (self.hidden_size,), dtype)
        return GRUParams(w_ih, w_hh, b, b_hn)

    def check_params(self, params, name: str = "params") -> None:
        super().check_params(params, name)
        _checks.check_shape(f"{name}.b_hn", params.b_hn, (self.hidden_size,))

    def recur(self, params: GRUParams, carry: RNNCarry, xp: jax.Array):
        """Recurrent part of a step given ``xp = project(params, x)``: ``[*B, 3H]``."""
        hp = matmul_f32(carry.h, params.w_hh)
        xr, xz, xn = jnp.split(xp, 3, axis=-1)
        hr, hz, hn = jnp.split(hp, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * add_bias(hn, params.b_hn))
        h = (1.0 - z) * n + z * carry.h.astype(n.dtype)
        h = h.astype(carry.h.dtype)
        return RNNCarry(h), h
