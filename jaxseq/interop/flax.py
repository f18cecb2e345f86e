"""Flax linen cell variables in and out."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from jaxseq.interop._common import _KIND_NAMES, _cell_info, _check_shape, _to_array
from jaxseq.recurrent.cells import (
    GRUParams,
    LSTMCarry,
    LSTMParams,
    RNNCarry,
    RNNParams,
)

# -- Flax -----------------------------------------------------------------------------------

# submodule -> (side, has bias); side "i" reads the input [D, H], "h" the carry [H, H]
_FLAX_LAYOUT = {
    4: {
        "ii": ("i", False),
        "if": ("i", False),
        "ig": ("i", False),
        "io": ("i", False),
        "hi": ("h", True),
        "hf": ("h", True),
        "hg": ("h", True),
        "ho": ("h", True),
    },
    3: {
        "ir": ("i", True),
        "iz": ("i", True),
        "in": ("i", True),
        "hr": ("h", False),
        "hz": ("h", False),
        "hn": ("h", True),
    },
    1: {"i": ("i", True), "h": ("h", False)},
}
_FLAX_NAMES = {4: "LSTMCell/OptimizedLSTMCell", 3: "GRUCell", 1: "SimpleCell"}


def _flax_inner(variables, g: int):
    """Finds the dict holding the cell's submodules; returns ``(dict, where)``."""
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables: expected a mapping ({{'params': ...}} or the params dict), "
            f"got {type(variables).__name__}"
        )
    inner, where = variables, "variables"
    names = set(_FLAX_LAYOUT[g])
    for _ in range(3):  # {'params': {'cell': {...}}} as nn.RNN stores it
        if names <= set(inner.keys()):
            return inner, where
        for k in ("params", "cell"):
            if k in inner and isinstance(inner[k], Mapping):
                inner, where = inner[k], f"{where}[{k!r}]"
                break
        else:
            break
    missing = sorted(names - set(inner.keys()))
    got = sorted(str(k) for k in inner.keys())
    hint = ""
    for other, layout in _FLAX_LAYOUT.items():
        if other != g and set(layout) <= set(got):
            hint = (
                f" (these look like flax {_FLAX_NAMES[other]} params, for js.{_KIND_NAMES[other]})"
            )
    raise ValueError(
        f"{where}: missing {missing} for flax {_FLAX_NAMES[g]} params; got keys {got}{hint}"
    )


def from_flax(cell, variables, *, residual: bool = False):
    """Flax linen cell variables -> jaxseq params.

    Args:
      cell: ``js.LSTM`` for ``LSTMCell``/``OptimizedLSTMCell``, ``js.GRU`` for
        ``GRUCell``, ``js.RNN`` for ``SimpleCell`` (its ``activation`` must match
        the flax ``activation_fn``: tanh or relu). ``hidden_size`` must match.
      variables: ``{'params': {...}}``, the inner params dict, or ``nn.RNN``'s
        ``{'params': {'cell': {...}}}``.
      residual: the ``SimpleCell(residual=True)`` variant (``h`` is added before
        the activation): folded in as ``w_hh + I``. RNN only.

    Returns:
      The cell's params, in the variables' dtype.

    >>> import numpy as np, jaxseq as js
    >>> f32 = lambda a: np.asarray(a, np.float32)
    >>> variables = {"params": {"i": {"kernel": f32(np.ones((3, 2))), "bias": f32([0, 1])},
    ...                         "h": {"kernel": f32(np.eye(2))}}}  # a flax SimpleCell(2)
    >>> params = js.interop.from_flax(js.RNN(2), variables)
    >>> params.w_ih.shape, params.w_hh.shape, params.b.tolist()
    ((3, 2), (2, 2), [0.0, 1.0])
    """
    g, h, label = _cell_info(cell)
    if residual and g != 1:
        raise ValueError(f"residual: only flax SimpleCell has it (cell is {label}), got True")
    inner, where = _flax_inner(variables, g)
    ker, bias, d = {}, {}, None
    for name, (side, has_bias) in _FLAX_LAYOUT[g].items():
        sub = inner[name]
        w = f"{where}[{name!r}]"
        if not isinstance(sub, Mapping) or "kernel" not in sub:
            raise ValueError(f"{w}: expected a dict with 'kernel', got {type(sub).__name__}")
        k = _to_array(f"{w}['kernel']", sub["kernel"])
        if side == "i":
            d = k.shape[0] if d is None and k.ndim == 2 else d
            _check_shape(f"{w}['kernel'] for {label}", k, (d, h), (("D", "H")))
        else:
            _check_shape(f"{w}['kernel'] for {label}", k, (h, h), ("H", "H"))
        ker[name] = k
        if has_bias:
            if "bias" not in sub:
                raise ValueError(f"{w}: missing 'bias' (flax {_FLAX_NAMES[g]} has one here)")
            bias[name] = _to_array(f"{w}['bias']", sub["bias"])
            _check_shape(f"{w}['bias'] for {label}", bias[name], (h,), ("H",))
    dtype = ker[next(iter(ker))].dtype
    cat = lambda names: jnp.concatenate([ker[n] for n in names], axis=1).astype(dtype)
    catb = lambda names: jnp.concatenate([bias[n] for n in names]).astype(dtype)
    if g == 4:
        return LSTMParams(
            cat(["ii", "if", "ig", "io"]),
            cat(["hi", "hf", "hg", "ho"]),
            catb(["hi", "hf", "hg", "ho"]),
        )
    if g == 3:
        return GRUParams(
            cat(["ir", "iz", "in"]),
            cat(["hr", "hz", "hn"]),
            catb(["ir", "iz", "in"]),
            bias["hn"].astype(dtype),
        )
    w_hh = ker["h"] + jnp.eye(h, dtype=dtype) if residual else ker["h"]
    return RNNParams(ker["i"], w_hh.astype(dtype), bias["i"].astype(dtype))


def to_flax(cell, params, *, residual: bool = False) -> dict:
    """jaxseq params -> ``{'params': {...}}`` for the matching flax linen cell.

    ``js.LSTM`` -> ``LSTMCell``/``OptimizedLSTMCell``, ``js.GRU`` -> ``GRUCell``,
    ``js.RNN`` -> ``SimpleCell`` (``residual=True`` subtracts the identity from
    ``w_hh`` for ``SimpleCell(residual=True)``). The LSTM's bias goes to flax's
    recurrent side (``hi``..``ho``), where flax keeps it; the GRU's ``b`` to
    ``ir``/``iz``/``in`` and ``b_hn`` to ``hn``.

    >>> import jax, jaxseq as js
    >>> cell = js.LSTM(2)
    >>> variables = js.interop.to_flax(cell, cell.init(jax.random.key(0), 3))
    >>> sorted(variables["params"]), variables["params"]["ii"]["kernel"].shape
    (['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io'], (3, 2))
    """
    g, h, label = _cell_info(cell)
    cell.check_params(params)
    if residual and g != 1:
        raise ValueError(f"residual: only flax SimpleCell has it (cell is {label}), got True")
    split = lambda w: jnp.split(w, g, axis=-1)
    if g == 4:
        wi, wh, b = split(params.w_ih), split(params.w_hh), split(params.b)
        out = {f"i{n}": {"kernel": wi[j]} for j, n in enumerate("ifgo")}
        out.update({f"h{n}": {"kernel": wh[j], "bias": b[j]} for j, n in enumerate("ifgo")})
    elif g == 3:
        wi, wh, b = split(params.w_ih), split(params.w_hh), split(params.b)
        out = {f"i{n}": {"kernel": wi[j], "bias": b[j]} for j, n in enumerate("rzn")}
        out.update({f"h{n}": {"kernel": wh[j]} for j, n in enumerate("rz")})
        out["hn"] = {"kernel": wh[2], "bias": params.b_hn}
    else:
        w_hh = params.w_hh - jnp.eye(h, dtype=params.w_hh.dtype) if residual else params.w_hh
        out = {"i": {"kernel": params.w_ih, "bias": params.b}, "h": {"kernel": w_hh}}
    return {"params": out}


def carry_from_flax(cell, carry):
    """A flax cell carry -> the jaxseq carry.

    Flax LSTMs carry ``(c, h)``, jaxseq ``LSTMCarry(h, c)``; GRU/SimpleCell carry ``h``.
    Leaves are ``[*B, H]``.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> carry = js.interop.carry_from_flax(js.LSTM(2), (jnp.zeros((1, 2)), jnp.ones((1, 2))))
    >>> float(carry.h[0, 0]), float(carry.c[0, 0])
    (1.0, 0.0)
    """
    g, _, label = _cell_info(cell)
    if g == 4:
        if not isinstance(carry, tuple | list) or len(carry) != 2:
            raise TypeError(
                f"carry: expected flax LSTM carry (c, h) for {label}, got {type(carry).__name__}"
            )
        c, h = carry
        return LSTMCarry(h, c)
    return RNNCarry(carry)


def carry_to_flax(cell, carry):
    """Inverse of :func:`carry_from_flax`: a jaxseq carry -> flax's (``(c, h)`` for an LSTM).

    >>> import jax.numpy as jnp, jaxseq as js
    >>> c, h = js.interop.carry_to_flax(js.LSTM(2), js.recurrent.LSTMCarry(jnp.ones(2), jnp.zeros(2)))
    >>> c.tolist(), h.tolist()
    ([0.0, 0.0], [1.0, 1.0])
    """
    g, _, label = _cell_info(cell)
    want = LSTMCarry if g == 4 else RNNCarry
    if not isinstance(carry, want):
        raise TypeError(f"carry: expected {want.__name__} for {label}, got {type(carry).__name__}")
    return (carry.c, carry.h) if g == 4 else carry.h
