"""PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` state dicts in and out (torch is never imported)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.interop._common import (
    _BUILTIN_CELLS,
    _cell_info,
    _check_layer_arg,
    _check_shape,
    _gate_hint,
    _to_array,
)
from jaxseq.recurrent.cells import (
    GRUParams,
    LSTMCarry,
    LSTMParams,
    RNNCarry,
    RNNParams,
)
from jaxseq.recurrent.layers import Bidirectional, BidirectionalCarry, BidirectionalParams, Stack

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

    >>> import numpy as np, jaxseq as js
    >>> ones = lambda *shape: np.ones(shape, np.float32)
    >>> sd = {"weight_ih_l0": ones(8, 3), "weight_hh_l0": ones(8, 2),
    ...       "bias_ih_l0": ones(8), "bias_hh_l0": ones(8)}  # an nn.LSTM(3, 2)
    >>> params = js.interop.from_torch(js.LSTM(2), sd)
    >>> params.w_ih.shape, params.w_hh.shape, float(params.b[0])  # b = bias_ih + bias_hh
    ((3, 8), (2, 8), 2.0)
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

    >>> import jax, jaxseq as js
    >>> cell = js.GRU(2)
    >>> sd = js.interop.to_torch(cell, cell.init(jax.random.key(0), 3))
    >>> {k: v.shape for k, v in sorted(sd.items())}
    {'bias_hh_l0': (6,), 'bias_ih_l0': (6,), 'weight_hh_l0': (6, 2), 'weight_ih_l0': (6, 3)}
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

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> cell = js.RNN(2)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> grads = jax.grad(lambda p: js.rollout(cell, p, jnp.ones((4, 3)))[1].sum())(params)
    >>> g = js.interop.grads_to_torch(cell, grads)
    >>> g["weight_ih_l0"].shape, bool((g["bias_ih_l0"] == g["bias_hh_l0"]).all())
    ((2, 3), True)
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
    ``js.rollout(stack, params, xs, carry, lengths=...)`` (time-major, like
    ``batch_first=False``; ``time_major=False`` for ``batch_first=True``).
    PyTorch's ``h_n[k * dirs + d]`` is ``carries[k].h`` (unidirectional) or
    ``carries[k].forward.h`` / ``carries[k].backward.h`` (d = 0 / 1):
    :func:`carry_from_torch` and :func:`carry_to_torch` convert ``(h0, c0)``
    and ``(h_n, c_n)``.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> made = js.Stack([js.Bidirectional(js.GRU(2)), js.Bidirectional(js.GRU(2))])
    >>> sd = js.interop.stack_to_torch(made, made.init(jax.random.key(0), 3))  # "nn.GRU"
    >>> stack, params = js.interop.stack_from_torch(js.GRU(2), sd)
    >>> len(stack.layers), js.rollout(stack, params, jnp.ones((5, 3)))[1].shape
    (2, (5, 4))
    """
    g, h, label = _cell_info(cell)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of names to arrays, got {type(state_dict).__name__}"
        )
    found: dict[int, set[bool]] = {}
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
    """Inverse of :func:`stack_from_torch`: a whole module's state dict (numpy arrays).

    >>> import jax, jaxseq as js
    >>> stack = js.Stack([js.LSTM(2), js.LSTM(2)])
    >>> sd = js.interop.stack_to_torch(stack, stack.init(jax.random.key(0), 3))
    >>> len(sd), sd["weight_ih_l1"].shape  # 4 entries per layer; layer 1 reads H=2
    (8, (8, 2))
    """
    return _stack_export(to_torch, stack, params, prefix, bias, "params")


def stack_grads_to_torch(stack, grads, *, prefix: str = "", bias: bool = True) -> dict:
    """:func:`grads_to_torch` for every layer of a ``js.Stack`` (see :func:`stack_from_torch`).

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> stack = js.Stack([js.GRU(2), js.GRU(2)])
    >>> params = stack.init(jax.random.key(0), 3)
    >>> grads = jax.grad(lambda p: js.rollout(stack, p, jnp.ones((4, 3)))[1].sum())(params)
    >>> sorted(js.interop.stack_grads_to_torch(stack, grads))[:2]
    ['bias_hh_l0', 'bias_hh_l1']
    """
    return _stack_export(grads_to_torch, stack, grads, prefix, bias, "grads")


# -- initial and final states ---------------------------------------------------------------


def _torch_directions(layer) -> list[list]:
    """The cells of a cell, ``Bidirectional`` or ``Stack`` per layer, in PyTorch's order.

    Layer ``k``'s directions ``d`` are rows ``k * dirs + d`` of ``h_n``; every cell is a
    built-in one, and all share one type and hidden size (as a PyTorch module does).
    """
    if isinstance(layer, Stack):
        named = [(lay, f"layer.layers[{k}]") for k, lay in enumerate(layer.layers)]
    else:
        named = [(layer, "layer")]
    groups = []
    for lay, name in named:
        if isinstance(lay, Bidirectional):
            pairs = [(lay.forward, f"{name}.forward"), (lay.backward, f"{name}.backward")]
        else:
            pairs = [(lay, name)]
        for cell, where in pairs:
            if not isinstance(cell, _BUILTIN_CELLS):
                raise TypeError(
                    f"{where}: expected js.RNN, js.LSTM or js.GRU (or a js.Bidirectional or "
                    f"js.Stack of them), got {type(cell).__name__}"
                )
            _cell_info(cell, where)
        groups.append([cell for cell, _ in pairs])
    kinds = {(_cell_info(c)[0], c.hidden_size) for group in groups for c in group}
    if len(kinds) > 1:
        raise ValueError(
            "layer: a PyTorch module has one cell type and hidden size for all layers, got "
            + ", ".join(
                sorted({f"js.{type(c).__name__}({c.hidden_size})" for g in groups for c in g})
            )
        )
    return groups


def _check_state(where: str, arr, rows: int, h: int, layout: str) -> None:
    if arr.ndim < 2 or arr.shape[0] != rows or arr.shape[-1] != h:
        raise ValueError(
            f"{where}: expected shape [num_layers * num_directions={rows}, *B, H={h}] "
            f"({layout}), got {_checks.describe(arr)}"
        )


def carry_from_torch(layer, hx):
    """PyTorch's initial state ``h0`` / ``(h0, c0)`` -> the jaxseq carry of ``layer``.

    Args:
      layer: a ``js.RNN``/``js.LSTM``/``js.GRU`` cell, a ``js.Bidirectional`` of one,
        or a ``js.Stack`` of them (e.g. from :func:`stack_from_torch`): one cell type
        and hidden size throughout, as in a PyTorch module.
      hx: what the PyTorch module takes as its second argument: ``h0`` for
        ``nn.RNN``/``nn.GRU``, the pair ``(h0, c0)`` for ``nn.LSTM``; each an array-like
        (torch tensors included) ``[num_layers * num_directions, *B, H]`` (``[L*dirs, H]``
        for unbatched input). Row ``k * dirs + d`` is layer ``k``, direction ``d``
        (0 forward, 1 backward), as in PyTorch; also with ``batch_first=True``.

    Returns:
      The carry ``js.rollout(layer, params, xs, carry)`` takes: ``RNNCarry(h)`` /
      ``LSTMCarry(h, c)`` for a cell, ``BidirectionalCarry(forward, backward)`` for a
      bidirectional layer, a tuple of one carry per layer for a ``Stack``; leaves
      ``[*B, H]`` in ``hx``'s dtype.

    >>> import numpy as np, jaxseq as js
    >>> stack = js.Stack([js.Bidirectional(js.LSTM(4)), js.Bidirectional(js.LSTM(4))])
    >>> h0 = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 4), np.float32)
    >>> carry = js.interop.carry_from_torch(stack, (h0, -h0))  # nn.LSTM(..., 2, bidirectional)
    >>> float(carry[1].backward.h[0, 0]), float(carry[1].backward.c[0, 0])  # row 1 * 2 + 1
    (3.0, -3.0)
    """
    groups = _torch_directions(layer)
    cell0 = groups[0][0]
    g, h = _cell_info(cell0)[0], cell0.hidden_size
    rows = sum(len(group) for group in groups)
    layout = f"{len(groups)} layer(s) x {len(groups[0])} direction(s)"
    kind = f"js.{type(cell0).__name__}"
    if g == 4:
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            raise TypeError(
                f"hx: expected the pair (h0, c0) for a {kind}, as nn.LSTM takes it, got "
                f"{type(hx).__name__}"
                + (f" of length {len(hx)}" if isinstance(hx, tuple | list) else "")
            )
        states = [_to_array("hx[0] (h0)", hx[0]), _to_array("hx[1] (c0)", hx[1])]
    else:
        if isinstance(hx, tuple | list):
            raise TypeError(
                f"hx: expected h0 (one array) for a {kind}, as nn.RNN/nn.GRU take it, got a "
                f"{type(hx).__name__} of {len(hx)}"
            )
        states = [_to_array("hx (h0)", hx)]
    for name, arr in zip(("hx[0] (h0)", "hx[1] (c0)") if g == 4 else ("hx (h0)",), states):
        _check_state(name, arr, rows, h, layout)
    if g == 4 and states[0].shape != states[1].shape:
        raise ValueError(
            f"hx[1] (c0): expected the shape of h0 {list(states[0].shape)}, got "
            f"{_checks.describe(states[1])}"
        )
    make = LSTMCarry if g == 4 else RNNCarry
    carries, row = [], 0
    for group in groups:
        parts = [make(*(s[row + d] for s in states)) for d in range(len(group))]
        row += len(group)
        carries.append(BidirectionalCarry(*parts) if len(parts) == 2 else parts[0])
    return tuple(carries) if isinstance(layer, Stack) else carries[0]


def carry_to_torch(layer, carry):
    """Inverse of :func:`carry_from_torch`: a jaxseq carry -> PyTorch's ``h_n`` / ``(h_n, c_n)``.

    ``carry`` is a final (or initial) carry of ``layer`` (a cell, a
    ``js.Bidirectional`` or a ``js.Stack`` of built-in cells), e.g. what
    ``js.rollout`` returns. Returns numpy arrays ``[num_layers * num_directions,
    *B, H]``: ``h_n`` for RNN/GRU cells, the pair ``(h_n, c_n)`` for LSTMs, the
    layout PyTorch modules return and take (``torch.from_numpy`` each).

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> stack = js.Stack([js.GRU(3), js.GRU(3)])
    >>> params = stack.init(jax.random.key(0), 2)
    >>> carries, ys = js.rollout(stack, params, jnp.ones((5, 4, 2)))
    >>> h_n = js.interop.carry_to_torch(stack, carries)  # nn.GRU(2, 3, num_layers=2)
    >>> h_n.shape, bool((h_n[1] == ys[-1]).all())  # the top layer's last output
    ((2, 4, 3), True)
    """
    groups = _torch_directions(layer)
    leaves = jax.tree_util.tree_leaves(carry)
    if not leaves or not hasattr(leaves[0], "shape") or not leaves[0].shape:
        raise TypeError(
            f"carry: expected the carry of {type(layer).__name__} (arrays [*B, H]), "
            f"got {type(carry).__name__}"
        )
    layer.check_carry(carry, tuple(leaves[0].shape[:-1]))
    per_layer = tuple(carry) if isinstance(layer, Stack) else (carry,)
    flat = []
    for group, c in zip(groups, per_layer):
        flat.extend([c.forward, c.backward] if len(group) == 2 else [c])
    h_n = np.stack([np.asarray(c.h) for c in flat])
    if _cell_info(groups[0][0])[0] == 4:
        return h_n, np.stack([np.asarray(c.c) for c in flat])
    return h_n
