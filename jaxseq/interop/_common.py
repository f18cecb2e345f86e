"""Private helpers shared by the PyTorch and Flax weight maps (no public names)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.recurrent.cells import (
    GRU,
    LSTM,
    RNN,
)

# The built-in cells whose weights map to PyTorch/Flax; each class declares its
# gate count (``num_gates``), the one source of the layouts below.
_BUILTIN_CELLS = (RNN, LSTM, GRU)
_KIND_NAMES = {cls.num_gates: cls.__name__ for cls in _BUILTIN_CELLS}


def _cell_info(cell, name: str = "cell"):
    """Returns ``(G, H, label)`` for a built-in cell (or a subclass); TypeError otherwise."""
    base = next((cls for cls in _BUILTIN_CELLS if isinstance(cell, cls)), None)
    if base is None:
        raise TypeError(
            f"{name}: expected js.RNN, js.LSTM or js.GRU (a cell, not a layer), "
            f"got {type(cell).__name__}"
        )
    return (
        base.num_gates,
        cell.hidden_size,
        f"js.{type(cell).__name__}(hidden_size={cell.hidden_size})",
    )


def _to_array(where: str, value):
    """Array-like (jax/numpy array, torch tensor, list) -> jax array, traceable for jax input."""
    if isinstance(value, jax.Array):
        arr = value
    else:
        v, cast = value, None
        if hasattr(v, "detach") and callable(v.detach):  # torch tensor: no grad, on CPU
            v = v.detach()
            v = v.cpu() if hasattr(v, "cpu") else v
            if str(getattr(v, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
                v, cast = v.float(), jnp.bfloat16
        try:
            arr = jnp.asarray(np.asarray(v), cast)
        except Exception as e:  # noqa: BLE001 - re-raised with the key named
            raise TypeError(
                f"{where}: expected an array-like, got {type(value).__name__} ({e})"
            ) from None
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{where}: expected a floating dtype, got {_checks.describe(arr)}")
    return arr


def _check_shape(where: str, arr, spec, labels, hint: str = "") -> None:
    shape = tuple(arr.shape)
    ok = len(shape) == len(spec) and all(s is None or s == d for s, d in zip(spec, shape))
    if not ok:
        want = ", ".join(lab if s is None else f"{lab}={s}" for s, lab in zip(spec, labels))
        raise ValueError(f"{where}: expected shape [{want}], got {_checks.describe(arr)}{hint}")


def _gate_hint(rows: int, h: int, g: int) -> str:
    """A hint when a weight's gate count fits another cell type."""
    if h and rows % h == 0 and rows // h in _KIND_NAMES and rows // h != g:
        other = _KIND_NAMES[rows // h]
        return f" (that is {rows // h}*H: weights of a {other}, not a {_KIND_NAMES[g]})"
    return ""


def _check_layer_arg(layer) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 0:
        raise ValueError(f"layer: expected a non-negative int, got {layer!r}")
    return int(layer)
