"""The RG-LRU (De et al. 2024, "Griffin"): a real-gated diagonal linear recurrence.

From the input ``x_t`` alone the cell forms a recurrence gate ``r_t``, an input
gate ``i_t`` and the recurrence input ``u_t`` (one projection ``[D, 3H]``), and
a learnt per-channel decay ``sigmoid(Λ)`` raised to the power ``c * r_t``::

    r_t = sigmoid(x_t W_a + b_a)                 recurrence gate
    i_t = sigmoid(x_t W_x + b_x)                 input gate
    u_t = x_t W_u + b_u                          recurrence input, size H
    log a_t = -c * r_t * softplus(-Λ)            a_t = sigmoid(Λ)^(c r_t), c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t),   y_t = h_t

The paper's cell takes an input of size ``H`` and has no ``W_u``: it is the
case ``D = H``, ``W_u = I``, ``b_u = 0`` here. The projection ``W_u`` lets the
cell take any input size ``D``, as every other cell of the library does, and
costs nothing at run time (its block is part of the one input matmul).

Like minGRU (:mod:`jaxseq.recurrent.minimal`) the coefficients do not depend
on ``h``, so a rollout solves the whole sequence with the solver of
:func:`jaxseq.linear_recurrence` after ONE input projection, while ``step``
runs one token at a time for generation with the same results.

**Numerics.** ``a_t`` is formed in log space (``softplus(-Λ) = -log
sigmoid(Λ)``), never as a power of a rounded sigmoid; ``sqrt(1 - a_t^2)`` is
``sqrt(-expm1(2 log a_t))``, exact for ``a_t`` near 1 where ``1 - a_t^2``
would cancel. Its derivative ``1 / (2 sqrt(.))`` grows without bound as
``a_t -> 1`` (a closed recurrence gate, ``r_t -> 0``); it is capped at 1000,
as in the paper's code, so gradients stay finite for any gate pre-activation;
the values are unchanged. All arithmetic runs in float32 (float64 for float64
params) whatever the input dtype.

Params: ``RGLRUParams(w_ih [D, 3H], b [3H], lam [H])``, blocks ``r, i, u`` of
``w_ih`` and ``b`` (``[in, out]`` as the other cells). Carry: ``RNNCarry(h)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq import initializers as inits
from jaxseq.recurrent.cells import RNNCarry
from jaxseq.recurrent.linear import LINEAR_MODES
from jaxseq.recurrent.minimal import _MinimalBase
from jaxseq.recurrent.rollouts import RolloutOptions
from jaxseq.recurrent.sequence import Sequence

__all__ = [
    "RGLRU",
    "RGLRUParams",
]

# The cap on d sqrt(x) / dx = 1 / (2 sqrt(x)): reached for x below 1 / (4 cap^2).
_SQRT_MAX_GRAD = 1000.0


class RGLRUParams(NamedTuple):
    """RG-LRU weights, blocks r, i, u: ``w_ih [D, 3H]``, ``b [3H]``, and ``lam [H]`` (Λ).

    >>> import jax, jaxseq as js
    >>> [a.shape for a in js.recurrent.RGLRU(4).init(jax.random.key(0), 3)]
    [(3, 12), (12,), (4,)]
    """

    w_ih: jax.Array  # [D, 3H], blocks r (recurrence gate), i (input gate), u (input)
    b: jax.Array  # [3H]
    lam: jax.Array  # [H], Λ: a = sigmoid(Λ)^(c r)


@jax.custom_jvp
def _sqrt_bounded(x):
    """``sqrt(x)`` for ``x >= 0`` whose derivative is capped at ``_SQRT_MAX_GRAD``."""
    return jnp.sqrt(x)


@_sqrt_bounded.defjvp
def _sqrt_bounded_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    floor = jnp.asarray(1.0 / (4.0 * _SQRT_MAX_GRAD**2), x.dtype)
    return jnp.sqrt(x), dx * (0.5 / jnp.sqrt(jnp.maximum(x, floor)))


def lambda_init(a_min: float = 0.9, a_max: float = 0.999, c: float = 8.0):
    """Initialiser of Λ: ``sigmoid(Λ)^c`` uniform in ``[a_min, a_max]`` (the paper's).

    Returns ``init(key, shape, dtype)``; Λ is drawn as ``-log(expm1(-log(a0) / c))``
    with ``a0 ~ U(a_min, a_max)``, the exact inverse of ``a0 = sigmoid(Λ)^c``.

    >>> import jax, jax.numpy as jnp
    >>> lam = lambda_init()(jax.random.key(0), (1000,), jnp.float32)
    >>> a = jax.nn.sigmoid(lam) ** 8
    >>> bool(jnp.all((a >= 0.9 - 1e-6) & (a <= 0.999 + 1e-6)))
    True
    """
    if not 0.0 < a_min <= a_max < 1.0:
        raise ValueError(f"a_min, a_max: expected 0 < a_min <= a_max < 1, got {a_min}, {a_max}")

    def init(key, shape, dtype=jnp.float32):
        a0 = jax.random.uniform(key, shape, jnp.promote_types(dtype, jnp.float32), a_min, a_max)
        return (-jnp.log(jnp.expm1(-jnp.log(a0) / c))).astype(dtype)

    return init


@dataclasses.dataclass(frozen=True)
class RGLRU(_MinimalBase):
    r"""Griffin's real-gated linear recurrent unit (see the module for the equations)::

        h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t),   a_t = sigmoid(Λ)^(c r_t)

    Args:
      hidden_size: H.
      c: the exponent scale ``c`` of ``a_t = sigmoid(Λ)^(c r_t)`` (default 8, the paper's).
      a_min, a_max: the range ``Λ`` is initialised in: ``sigmoid(Λ)^c`` uniform in
        ``[a_min, a_max]`` (default ``[0.9, 0.999]``, the paper's).
      mode: how rollouts solve the recurrence, a mode of :func:`jaxseq.linear_recurrence`
        (default ``"auto"``).
      chunk: the chunk length of ``mode="chunked"`` (default: chosen from T).
      kernel_init: initialiser of the ``w_ih`` blocks (default LeCun normal).
      bias_init: initialiser of ``b`` (default zeros).

    Carry: ``RNNCarry(h)``. Params: ``RGLRUParams(w_ih [D, 3H], b [3H], lam [H])``.
    ``js.rollout`` solves a whole sequence in one :func:`jaxseq.linear_recurrence`
    (``kernel="scan"`` steps the cell instead); lengths, resets and reverse as
    for any cell.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.recurrent.RGLRU(4)
    >>> params = cell.init(jax.random.key(0), input_size=3)
    >>> xs = jax.random.normal(jax.random.key(1), (6, 2, 3))
    >>> carry, ys = js.rollout(cell, params, xs)  # solved over the whole sequence
    >>> _, ys_steps = js.rollout(cell, params, xs, kernel="scan")  # one step at a time
    >>> ys.shape, bool(jnp.allclose(ys, ys_steps, atol=1e-6))
    ((6, 2, 4), True)
    """

    hidden_size: int
    c: float = 8.0
    a_min: float = 0.9
    a_max: float = 0.999
    mode: str = "auto"
    chunk: Any = None
    kernel_init: Any = None
    bias_init: Any = None

    num_gates: ClassVar[int] = 3
    carry_type: ClassVar[type] = RNNCarry
    params_type: ClassVar[type] = RGLRUParams

    def __post_init__(self):
        self._validate_config()
        if isinstance(self.c, bool) or not isinstance(self.c, int | float) or not self.c > 0:
            raise ValueError(f"c: expected a positive number, got {self.c!r}")
        if not math.isfinite(self.c):
            raise ValueError(f"c: expected a finite number, got {self.c!r}")
        for name in ("a_min", "a_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v < 1.0:
                raise ValueError(f"{name}: expected a number in (0, 1), got {v!r}")
        if self.a_min > self.a_max:
            raise ValueError(
                f"a_min, a_max: expected a_min <= a_max, got {self.a_min}, {self.a_max}"
            )
        _checks.check_choice("mode", self.mode, LINEAR_MODES)
        if self.chunk is not None:
            _checks.check_positive_int("chunk", self.chunk)

    def init(self, key, input_size: int, dtype=jnp.float32) -> RGLRUParams:
        """Fresh params for inputs of size ``D = input_size``: ``w_ih [D, 3H]`` (LeCun
        normal per block unless ``kernel_init``), ``b [3H]`` (zeros unless ``bias_init``),
        ``lam [H]`` with ``sigmoid(lam)^c`` uniform in ``[a_min, a_max]``."""
        _checks.check_key("key", key)
        d = _checks.check_positive_int("input_size", input_size)
        h = self.hidden_size
        k_init = self.kernel_init or inits.lecun_normal()
        b_init = self.bias_init or inits.zeros()
        kx, kb, kl = jax.random.split(key, 3)
        w = jnp.concatenate([k_init(k, (d, h), dtype) for k in jax.random.split(kx, 3)], axis=1)
        b = jnp.concatenate([b_init(k, (h,), dtype) for k in jax.random.split(kb, 3)], axis=0)
        lam = lambda_init(self.a_min, self.a_max, self.c)(kl, (h,), dtype)
        return RGLRUParams(w, b, lam)

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are ``RGLRUParams`` with ``w_ih [D, 3H]``, ``b [3H]``,
        ``lam [H]``, all floating."""
        super().check_params(params, name)
        _checks.check_shape(f"{name}.lam", params.lam, (self.hidden_size,))

    def coefficients(self, params, xp):
        """``(a, b)``, each ``[..., H]`` in float32 (float64), of ``h_t = a h_{t-1} + b``
        from ``xp = project(x) [..., 3H]``: ``a = sigmoid(Λ)^(c r)``,
        ``b = sqrt(1 - a^2) * i * u``."""
        gr, gi, u = jnp.split(xp, 3, axis=-1)
        lam = jnp.broadcast_to(params.lam.astype(xp.dtype), gr.shape)
        log_a = -self.c * jax.nn.sigmoid(gr) * jax.nn.softplus(-lam)
        scale = _sqrt_bounded(-jnp.expm1(2.0 * log_a))
        return jnp.exp(log_a), scale * (jax.nn.sigmoid(gi) * u)

    def rollout(self, params, seq: Sequence, carry, options: RolloutOptions, key=None):
        """The cell over ``seq.xs: [T, *B, D] -> ys: [T, *B, H]`` (run by :func:`jaxseq.rollout`).

        ``kernel="auto"`` or ``"fused"``: one input projection, then the solver of
        :func:`jaxseq.linear_recurrence` with the cell's ``mode`` and ``chunk``.
        ``kernel="scan"``, or ``"auto"`` under ``jax.jvp``: the cell's ``step``
        scanned like any other cell's. ``key`` is not used. Returns
        ``(RNNCarry(h), ys)``, zeros at padded steps.

        >>> import jax, jax.numpy as jnp, jaxseq as js
        >>> cell = js.recurrent.RGLRU(4)
        >>> params = cell.init(jax.random.key(0), 3)
        >>> carry, ys = js.rollout(cell, params, jnp.ones((6, 2, 3)), lengths=jnp.array([6, 2]))
        >>> ys.shape, bool(jnp.all(ys[2:, 1] == 0))
        ((6, 2, 4), True)
        """
        return super().rollout(params, seq, carry, options, key)
