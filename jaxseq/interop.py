"""Bring weights from PyTorch and Flax, and take them back.

PyTorch (``nn.RNN``/``nn.LSTM``/``nn.GRU`` state dicts; torch is never imported,
any array-like works, torch tensors included)::

    params = js.interop.from_torch(js.LSTM(256), module.state_dict(), layer=1, reverse=True)
    sd = js.interop.to_torch(js.LSTM(256), params, layer=1, reverse=True)   # numpy arrays
    stack, params = js.interop.stack_from_torch(js.GRU(256), module.state_dict())
    carries, ys = js.stacked_rollout(stack, params, xs, lengths=lengths)

Flax linen (``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``, ``SimpleCell``)::

    params = js.interop.from_flax(js.GRU(256), variables)      # {'params': ...} or inner dict
    variables = js.interop.to_flax(js.GRU(256), params)        # {'params': ...}

Layouts. jaxseq stores ``w_ih: [D, G*H]``, ``w_hh: [H, G*H]`` with gates in
PyTorch's order (RNN: one; LSTM: i, f, g, o; GRU: r, z, n), ``b: [G*H]`` and for
the GRU ``b_hn: [H]``. PyTorch stores ``weight_ih_l{k}: [G*H, D]`` (the
transpose), ``weight_hh_l{k}: [G*H, H]`` and two biases; the maps are

* RNN, LSTM: ``w_ih = weight_ih.T``, ``w_hh = weight_hh.T``, ``b = bias_ih + bias_hh``;
* GRU: ``b = bias_ih + [bias_hh_r, bias_hh_z, 0]``, ``b_hn = bias_hh_n`` (the n
  gate's recurrent bias sits inside the reset, so it cannot be folded);
* ``bias=False`` modules give zero biases.

Going back, :func:`to_torch` puts the whole bias in ``bias_ih`` and zeros in
``bias_hh`` (except the GRU's n part, which is ``b_hn``): the same function,
not the same numbers. :func:`grads_to_torch` maps *gradients* instead (the
adjoint of :func:`from_torch`: both biases get the gradient of ``b``), so they
equal what ``.grad`` holds after PyTorch's backward pass.

Flax cells keep one ``[in, H]`` kernel per gate (``ii``, ``hf``, ...); their
equations are exactly jaxseq's: LSTMCell/OptimizedLSTMCell (same parameter
names) put the bias on the recurrent side (``hi``..``ho``), GRUCell has input
biases ``ir``/``iz``/``in`` and the reset-wrapped ``hn`` bias, SimpleCell has
``i`` (kernel, bias) and ``h`` (kernel). Flax's LSTM carry is ``(c, h)``;
jaxseq's is ``LSTMCarry(h, c)``: see :func:`carry_from_flax`.

Activations are not stored in weights: the jaxseq cell you pass decides them
(``js.RNN(H, activation="relu")`` for ``nn.RNN(nonlinearity="relu")`` or
``SimpleCell(activation_fn=nn.relu)``).

Every function validates its input and raises ``ValueError``/``TypeError`` that
names the key, the expected and the actual shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.cells import GRU, LSTM, RNN, GRUParams, LSTMCarry, LSTMParams, RNNCarry, RNNParams
from jaxseq.layers import Bidirectional, BidirectionalParams, Stack

__all__ = [
    "carry_from_flax",
    "carry_to_flax",
    "from_flax",
    "from_torch",
    "grads_to_torch",
    "stack_from_torch",
    "stack_grads_to_torch",
    "stack_to_torch",
    "to_flax",
    "to_torch",
]

_KIND_NAMES = {1: "RNN", 3: "GRU", 4: "LSTM"}


def _cell_info(cell, name: str = "cell"):
    """Returns ``(G, H, label)`` for a built-in cell; TypeError otherwise."""
    if isinstance(cell, LSTM):
        g = 4
    elif isinstance(cell, GRU):
        g = 3
    elif isinstance(cell, RNN):
        g = 1
    else:
        raise TypeError(
            f"{name}: expected js.RNN, js.LSTM or js.GRU (a cell, not a layer), "
            f"got {type(cell).__name__}"
        )
    return g, cell.hidden_size, f"js.{type(cell).__name__}(hidden_size={cell.hidden_size})"


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


# -- PyTorch --------------------------------------------------------------------------------


def _torch_keys(layer: int, reverse: bool, prefix: str) -> dict:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    return {n: f"{prefix}{n}{sfx}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}


def _key_list(state_dict) -> str:
    keys = sorted(str(k) for k in state_dict.keys())
    shown = ", ".join(repr(k) for k in keys[:12])
    return f"[{shown}{', ...' if len(keys) > 12 else ''}]"


def from_torch(cell, state_dict, *, layer: int = 0, reverse: bool = False, prefix: str = ""):
    """PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` weights of one layer and direction -> params.

    Args:
      cell: the jaxseq cell the weights are for (``js.RNN``/``js.LSTM``/``js.GRU``);
        its ``hidden_size`` must be the module's, its ``activation`` decides tanh/ReLU.
      state_dict: mapping of names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...) to
        array-likes ``[G*H, D]``, ``[G*H, H]``, ``[G*H]``; biases may be absent
        (``bias=False``). jax arrays pass through untouched, so this is differentiable.
      layer: which layer ``k`` (the ``_l{k}`` suffix).
      reverse: the backward direction of a bidirectional module (``_reverse`` suffix).
      prefix: prepended to every key, e.g. ``"encoder.rnn."`` for a submodule's entries.

    Returns:
      The cell's params (``RNNParams``/``LSTMParams``/``GRUParams``) in the weights' dtype.
    """
    g, h, label = _cell_info(cell)
    layer = _check_layer_arg(layer)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of names to arrays, got {type(state_dict).__name__}"
        )
    keys = _torch_keys(layer, bool(reverse), prefix)
    proj = f"{prefix}weight_hr_l{layer}" + ("_reverse" if reverse else "")
    if proj in state_dict:
        raise ValueError(
            f"state_dict[{proj!r}]: LSTMs with proj_size > 0 have no jaxseq equivalent"
        )
    for n in ("weight_ih", "weight_hh"):
        if keys[n] not in state_dict:
            raise ValueError(
                f"state_dict: missing key {keys[n]!r} (layer={layer}, reverse={bool(reverse)}, "
                f"prefix={prefix!r}); keys present: {_key_list(state_dict)}"
            )
    has_b = [keys[n] in state_dict for n in ("bias_ih", "bias_hh")]
    if has_b[0] != has_b[1]:
        missing = keys["bias_hh"] if has_b[0] else keys["bias_ih"]
        raise ValueError(
            f"state_dict: missing key {missing!r}: expected both biases (bias=True) or none "
            f"(bias=False)"
        )

    w_ih = _to_array(f"state_dict[{keys['weight_ih']!r}]", state_dict[keys["weight_ih"]])
    w_hh = _to_array(f"state_dict[{keys['weight_hh']!r}]", state_dict[keys["weight_hh"]])
    rows = w_ih.shape[0] if w_ih.ndim else 0
    _check_shape(
        f"state_dict[{keys['weight_ih']!r}] for {label}",
        w_ih,
        (g * h, None),
        (f"{g}*H", "D"),
        _gate_hint(rows, h, g),
    )
    _check_shape(
        f"state_dict[{keys['weight_hh']!r}] for {label}",
        w_hh,
        (g * h, h),
        (f"{g}*H", "H"),
        _gate_hint(w_hh.shape[0] if w_hh.ndim else 0, h, g),
    )
    dtype = w_ih.dtype
    if has_b[0]:
        b_ih = _to_array(f"state_dict[{keys['bias_ih']!r}]", state_dict[keys["bias_ih"]])
        b_hh = _to_array(f"state_dict[{keys['bias_hh']!r}]", state_dict[keys["bias_hh"]])
        for n, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
            _check_shape(f"state_dict[{keys[n]!r}] for {label}", b, (g * h,), (f"{g}*H",))
    else:
        b_ih = b_hh = jnp.zeros((g * h,), dtype)

    w_ih_t, w_hh_t = w_ih.T, w_hh.T.astype(dtype)
    if g == 3:
        b = (b_ih + jnp.concatenate([b_hh[: 2 * h], jnp.zeros((h,), b_hh.dtype)])).astype(dtype)
        return GRUParams(w_ih_t, w_hh_t, b, b_hh[2 * h :].astype(dtype))
    b = (b_ih + b_hh).astype(dtype)
    return (LSTMParams if g == 4 else RNNParams)(w_ih_t, w_hh_t, b)


def _export(cell, params, layer, reverse, prefix):
    g, h, _ = _cell_info(cell)
    layer = _check_layer_arg(layer)
    cell.check_params(params)
    keys = _torch_keys(layer, bool(reverse), prefix)
    return g, h, keys, {n: np.asarray(getattr(params, n)) for n in params._fields}


def to_torch(
    cell, params, *, layer: int = 0, reverse: bool = False, prefix: str = "", bias: bool = True
) -> dict:
    """jaxseq params -> the PyTorch state dict entries of one layer and direction.

    Returns a dict of numpy arrays (``torch.from_numpy`` each, or
    ``module.load_state_dict(..., strict=False)``) with keys ``weight_ih_l{layer}``,
    ``weight_hh_l{layer}`` and, when ``bias``, ``bias_ih_l{layer}`` (the whole ``b``)
    and ``bias_hh_l{layer}`` (zeros; for the GRU ``[0, 0, b_hn]``), each with the
    ``_reverse`` suffix when ``reverse``. ``bias=False`` (a module built without
    biases) needs all-zero biases.
    """
    g, h, keys, p = _export(cell, params, layer, reverse, prefix)
    out = {
        keys["weight_ih"]: np.ascontiguousarray(p["w_ih"].T),
        keys["weight_hh"]: np.ascontiguousarray(p["w_hh"].T),
    }
    b_hh = np.zeros((g * h,), p["b"].dtype)
    if g == 3:
        b_hh[2 * h :] = p["b_hn"]
    if bias:
        out[keys["bias_ih"]] = p["b"].copy()
        out[keys["bias_hh"]] = b_hh
    else:
        for n, v in (("b", p["b"]), ("b_hn", p.get("b_hn"))):
            if v is not None and np.any(v != 0):
                raise ValueError(
                    f"params.{n}: bias=False needs zero biases, got nonzero values "
                    f"(max |{n}| = {float(np.max(np.abs(v))):g})"
                )
    return out


def grads_to_torch(
    cell, grads, *, layer: int = 0, reverse: bool = False, prefix: str = "", bias: bool = True
) -> dict:
    """Gradients w.r.t. jaxseq params -> gradients w.r.t. the PyTorch state dict entries.

    The adjoint of :func:`from_torch` (not the inverse :func:`to_torch`): since
    ``b = bias_ih + bias_hh``, both biases get the gradient of ``b`` (for the GRU,
    ``bias_hh`` gets ``[grad b_r, grad b_z, grad b_hn]``). The result equals
    ``param.grad`` after PyTorch's backward pass of the same loss.
    """
    g, h, keys, p = _export(cell, grads, layer, reverse, prefix)
    out = {
        keys["weight_ih"]: np.ascontiguousarray(p["w_ih"].T),
        keys["weight_hh"]: np.ascontiguousarray(p["w_hh"].T),
    }
    if bias:
        out[keys["bias_ih"]] = p["b"].copy()
        if g == 3:
            out[keys["bias_hh"]] = np.concatenate([p["b"][: 2 * h], p["b_hn"]])
        else:
            out[keys["bias_hh"]] = p["b"].copy()
    return out


_LAYER_KEY = re.compile(r"^weight_ih_l(\d+)(_reverse)?$")


def stack_from_torch(cell, state_dict, *, prefix: str = ""):
    """A whole multi-layer (and/or bidirectional) PyTorch module -> ``(js.Stack, params)``.

    The number of layers and the directions are read from the keys. Each layer
    is ``cell`` or ``js.Bidirectional(cell)``; run it with
    ``js.stacked_rollout(stack, params, xs, lengths=...)`` (time-major, like
    ``batch_first=False``). PyTorch's ``h_n[k * dirs + d]`` is
    ``carries[k].h`` (unidirectional) or ``carries[k].forward.h`` /
    ``carries[k].backward.h`` (d = 0 / 1).
    """
    g, h, label = _cell_info(cell)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of names to arrays, got {type(state_dict).__name__}"
        )
    found = {}
    for k in state_dict.keys():
        k = str(k)
        if not k.startswith(prefix):
            continue
        m = _LAYER_KEY.match(k[len(prefix) :])
        if m:
            found.setdefault(int(m.group(1)), set()).add(bool(m.group(2)))
    if not found:
        raise ValueError(
            f"state_dict: no key '{prefix}weight_ih_l<k>' found (prefix={prefix!r}); "
            f"keys present: {_key_list(state_dict)}"
        )
    n = max(found) + 1
    bidir = True in found.get(0, set())
    for k in range(n):
        want = {False, True} if bidir else {False}
        if found.get(k, set()) != want:
            missing = sorted(want - found.get(k, set()))
            name = f"{prefix}weight_ih_l{k}" + ("_reverse" if missing and missing[0] else "")
            raise ValueError(
                f"state_dict: missing key {name!r}: a {n}-layer "
                f"{'bidirectional ' if bidir else ''}module needs it"
            )
    layers, params = [], []
    dirs = 2 if bidir else 1
    for k in range(n):
        fwd = from_torch(cell, state_dict, layer=k, prefix=prefix)
        if k > 0 and fwd.w_ih.shape[0] != dirs * h:
            key = f"{prefix}weight_ih_l{k}"
            raise ValueError(
                f"state_dict[{key!r}] for {label}: expected shape [{g}*H={g * h}, D={dirs * h}] "
                f"(layer {k} reads the {dirs}*H outputs of layer {k - 1}), "
                f"got {_checks.describe(fwd.w_ih.T)}"
            )
        if bidir:
            bwd = from_torch(cell, state_dict, layer=k, reverse=True, prefix=prefix)
            if bwd.w_ih.shape != fwd.w_ih.shape:
                key = f"{prefix}weight_ih_l{k}_reverse"
                raise ValueError(
                    f"state_dict[{key!r}]: expected shape {list(fwd.w_ih.T.shape)} like the "
                    f"forward direction, got {_checks.describe(bwd.w_ih.T)}"
                )
            layers.append(Bidirectional(cell))
            params.append(BidirectionalParams(fwd, bwd))
        else:
            layers.append(cell)
            params.append(fwd)
    return Stack(tuple(layers)), tuple(params)


def _stack_export(fn, stack, tree, prefix, bias, what):
    if not isinstance(stack, Stack):
        raise TypeError(f"stack: expected js.Stack, got {type(stack).__name__}")
    if not isinstance(tree, tuple | list) or len(tree) != len(stack.layers):
        raise ValueError(
            f"{what}: expected a tuple of {len(stack.layers)} layer {what}, got "
            f"{type(tree).__name__}"
            + (f" of length {len(tree)}" if hasattr(tree, "__len__") else "")
        )
    out, kinds = {}, set()
    for k, (layer, p) in enumerate(zip(stack.layers, tree)):
        if isinstance(layer, Bidirectional):
            if not isinstance(p, BidirectionalParams):
                raise TypeError(
                    f"{what}[{k}]: expected BidirectionalParams, got {type(p).__name__}"
                )
            parts = [(layer.forward, p.forward, False), (layer.backward, p.backward, True)]
        else:
            parts = [(layer, p, False)]
        for cell, cp, rev in parts:
            _cell_info(cell, f"stack.layers[{k}]")
            kinds.add((type(cell), cell.hidden_size, len(parts)))
            out.update(fn(cell, cp, layer=k, reverse=rev, prefix=prefix, bias=bias))
    if len(kinds) > 1:
        raise ValueError(
            f"stack: a PyTorch module has one cell type, hidden size and direction count for "
            f"all layers, got {sorted((t.__name__, hs, d) for t, hs, d in kinds)}"
        )
    return out


def stack_to_torch(stack, params, *, prefix: str = "", bias: bool = True) -> dict:
    """Inverse of :func:`stack_from_torch`: a whole module's state dict (numpy arrays)."""
    return _stack_export(to_torch, stack, params, prefix, bias, "params")


def stack_grads_to_torch(stack, grads, *, prefix: str = "", bias: bool = True) -> dict:
    """:func:`grads_to_torch` for every layer of a ``js.Stack`` (see :func:`stack_from_torch`)."""
    return _stack_export(grads_to_torch, stack, grads, prefix, bias, "grads")


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
    """Inverse of :func:`carry_from_flax`."""
    g, _, label = _cell_info(cell)
    want = LSTMCarry if g == 4 else RNNCarry
    if not isinstance(carry, want):
        raise TypeError(f"carry: expected {want.__name__} for {label}, got {type(carry).__name__}")
    return (carry.c, carry.h) if g == 4 else carry.h
