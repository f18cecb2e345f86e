"""The body every recurrent model shares: inputs (token embeddings or features) ->
dropout -> a :class:`jaxseq.Stack` run by :func:`jaxseq.rollout` -> dropout -> a dense head.

Invariants: one key split ``(inputs, stack, outputs)`` per call, dropout only when
a key is given and the rate is positive; the parameters are ``(embedding or None,
stack, head)`` drawn from one key split ``(embedding, stack, head)``. Time-major:
``[T, *B, ...]`` inside; :func:`time_major_tokens` turns batch-major inputs
(``time_major=False``) around once at a model's boundary.

Any cell or layer meeting :class:`jaxseq.protocols.Cell` or
:class:`jaxseq.protocols.SequenceLayer` can sit in a model's stack:
:func:`check_stack` checks its outputs against its ``output_size`` when the
model is built,
:func:`pool_last` reads the outputs (never a carry's fields) and
:func:`describe_layer` writes its settings into a config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.models.xlstm import xlstm_stack
from jaxseq.nn.dense import Dense
from jaxseq.nn.dropout import dropout
from jaxseq.nn.embedding import Embedding
from jaxseq.recurrent.cells import GRU, LSTM, RNN
from jaxseq.recurrent.layers import Bidirectional, Stack
from jaxseq.recurrent.minimal import MinGRU, MinLSTM
from jaxseq.recurrent.mlstm import MLSTM
from jaxseq.recurrent.rglru import RGLRU
from jaxseq.recurrent.rollouts import RolloutOptions, rollout
from jaxseq.recurrent.rollouts import check_sequence_parallel as check_layer_sequence_parallel
from jaxseq.recurrent.sequence import valid_steps as _steps_mask
from jaxseq.recurrent.slstm import SLSTM

__all__: list[str] = []

CELLS = {
    "lstm": LSTM,
    "gru": GRU,
    "rnn": RNN,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
    "rglru": RGLRU,
    "mlstm": MLSTM,
    "slstm": SLSTM,
}

# Names of mixed stacks :func:`recurrent_stack` builds besides one cell per layer.
STACKS = ("xlstm",)

# The js.Stack settings of a cell's stack where they differ from Stack's defaults.
# The RG-LRU runs Griffin-style (De et al. 2024): pre-norm residual blocks (RMS
# norm on each layer's input, the residual stream un-normalised) and a final
# RMS norm before the head. A bare RG-LRU stack amplifies the constant part of
# its input by up to sqrt((1 + a) / (1 - a)) as the carried state fills up;
# the norms keep what each layer and the head see at unit scale.
STACK_DEFAULTS: dict[str, dict] = {"rglru": {"residual": True, "norm": "rms"}}


def recurrent_stack(
    cell: str,
    hidden_size: int,
    num_layers: int,
    *,
    bidirectional: bool = False,
    dropout_rate: float = 0.0,
    variational_dropout: bool = False,
    weight_dropout: float = 0.0,
    cell_kwargs=None,
) -> Stack:
    """``num_layers`` cells named ``cell`` of size ``hidden_size`` (each direction), stacked.

    ``cell="xlstm"``: the mLSTM/sLSTM stack of :func:`jaxseq.models.xlstm_stack`,
    which takes ``cell_kwargs`` (``slstm_at``, ``num_heads``, ...).
    ``cell="rglru"``: the Griffin-style arrangement (:data:`STACK_DEFAULTS`), a
    ``js.Stack(..., residual=True, norm="rms")``: each layer's input RMS-normalised,
    residual connections from the second layer on, a final RMS norm on the outputs.
    The other cells stack plainly (no norm, no residual). ``weight_dropout`` is the
    stack's DropConnect on the recurrent weights (:class:`jaxseq.Stack`)."""
    _checks.check_choice("cell", cell, (*CELLS, *STACKS))
    h = _checks.check_positive_int("hidden_size", hidden_size)
    n = _checks.check_positive_int("num_layers", num_layers)
    kw = dict(cell_kwargs or {})
    if cell == "xlstm":
        stack = xlstm_stack(
            h,
            n,
            bidirectional=bidirectional,
            dropout_rate=dropout_rate,
            variational_dropout=variational_dropout,
            **kw,
        )
        return dataclasses.replace(stack, weight_dropout=weight_dropout)

    def layer():
        c = CELLS[cell](h, **kw)
        return Bidirectional(c) if bidirectional else c

    return Stack(
        tuple(layer() for _ in range(n)),
        dropout_rate=dropout_rate,
        variational_dropout=variational_dropout,
        weight_dropout=weight_dropout,
        **STACK_DEFAULTS.get(cell, {}),
    )


def init_body(key, stack: Stack, input_size: int, output_size: int, vocab_size, dtype):
    """``(embedding [V, E] or None, stack params, head DenseParams [H, O])``.

    With ``vocab_size`` the inputs are token ids embedded to ``input_size = E``.
    """
    _checks.check_key("key", key)
    ke, ks, kh = jax.random.split(key, 3)
    emb = None if vocab_size is None else Embedding(input_size).init(ke, vocab_size, dtype)
    return (
        emb,
        stack.init(ks, input_size, dtype),
        Dense(output_size).init(kh, stack.output_size, dtype),
    )


def run_body(
    stack: Stack,
    params,
    x,
    carry=None,
    *,
    dropout_rate: float,
    shared_axes=(),
    lengths=None,
    mask=None,
    reset=None,
    unroll="auto",
    mesh=None,
    sequence_axis=None,
    key=None,
):
    """Dropout on ``x: [T, *B, D]``, the stack, dropout on its outputs -> ``(carries, h [T, *B, H])``.

    The padding is ``lengths`` or, when the caller has built it already, ``mask``
    (``bool[T, *B]``), which the rollout then uses as it is. ``mesh`` and
    ``sequence_axis`` (both or neither) split the stack's ``T`` over that mesh axis
    (see :func:`jaxseq.rollout`)."""
    use_dropout = key is not None and dropout_rate > 0.0
    k_in = k_stack = k_out = None
    if key is not None:
        _checks.check_key("key", key)
        k_in, k_stack, k_out = jax.random.split(key, 3)
    if use_dropout:
        x = dropout(k_in, x, dropout_rate, shared_axes=shared_axes)
    carry, h = rollout(
        stack,
        params,
        x,
        carry,
        lengths=lengths,
        mask=mask,
        reset=reset,
        unroll=unroll,
        mesh=mesh,
        sequence_axis=sequence_axis,
        key=k_stack,
    )
    if use_dropout:
        h = dropout(k_out, h, dropout_rate, shared_axes=shared_axes)
    return carry, h


def check_sequence_parallel(stack: Stack, mesh, sequence_axis) -> None:
    """Checks a model's ``mesh``/``sequence_axis`` (both or neither, the axis one of the
    mesh's) and that every layer of ``stack`` can split ``T`` over that axis: a
    ``ValueError`` naming ``sequence_axis`` and the layer otherwise, when the model is
    built rather than at its first call."""
    options = RolloutOptions(mesh=mesh, sequence_axis=sequence_axis)
    if sequence_axis is None:
        return

    def check(layer):
        if isinstance(layer, Stack):
            for inner in layer.layers:
                check(inner)
        elif isinstance(layer, Bidirectional):
            check(layer.forward)
            check(layer.backward)
        else:
            check_layer_sequence_parallel(layer, options)

    check(stack)


def check_tokens(name: str, tokens, layout: str = "[T, *B]", ndim: int | None = None):
    """Token ids: an integer array of rank >= 1 (exactly ``ndim`` when given)."""
    tokens = _checks.as_array(name, tokens)
    _checks.check_integer(name, tokens)
    if ndim is None:
        _checks.check_min_ndim(name, tokens, 1, layout)
    else:
        _checks.check_ndim(name, tokens, ndim, layout)
    return tokens


def valid_steps(lengths, t: int, batch_shape, xs):
    """``bool[T, *B]`` (``t < lengths[b]``) after validating ``lengths: int[*B]``; None without lengths."""
    if lengths is None:
        return None
    return _steps_mask(_checks.check_lengths(lengths, batch_shape, xs), t)


def token_ids(name: str, tokens, vocab_size: int, valid=None):
    """Token ids ``int[T, *B]`` checked to lie in ``[0, V)`` at the valid steps.

    ``valid: bool[T, *B]`` (or None: every step): padded steps may hold anything
    (e.g. ``-100``) and are set to 0 before the embedding lookup. Concrete ids out
    of range raise ``ValueError`` naming ``name``, the range and the value; traced
    ids get a checkify check (enforced by :func:`jaxseq.checked`).
    """
    if valid is not None:
        tokens = jnp.where(valid, tokens, jnp.zeros((), tokens.dtype))
    if tokens.size:
        _checks.check_in_range(
            name, tokens, 0, vocab_size - 1, f" (token ids, vocab_size V={vocab_size})"
        )
    return tokens


def check_time_major(time_major) -> bool:
    """``time_major`` as a bool; a ``TypeError`` for anything else."""
    if not isinstance(time_major, bool | np.bool_):
        raise TypeError(
            "time_major: expected a Python bool (True: time-major [T, *B, ...] inputs, "
            f"False: batch-major [*B, T, ...]), got {type(time_major).__name__} {time_major!r}"
        )
    return bool(time_major)


def time_major_tokens(name: str, x, time_major: bool, feature_dims: int = 0):
    """``x`` moved to time-major: ``[*B, T, *F] -> [T, *B, *F]`` when not ``time_major``.

    ``feature_dims`` trailing dims (e.g. 1 for features ``[..., D]``) stay last; ``None``
    passes through. Raises ``ValueError`` naming ``name`` when ``x`` has no time axis.
    """
    if x is None or check_time_major(time_major):
        return x
    x = _checks.as_array(name, x)
    layout = "[*B, T" + ", D" * feature_dims + "] (time_major=False)"
    _checks.check_min_ndim(name, x, 1 + feature_dims, layout)
    return jnp.moveaxis(x, x.ndim - 1 - feature_dims, 0)


def _layer_name(name: str, layer) -> str:
    return f"{name} ({type(layer).__name__})"


def _is_builtin(layer) -> bool:
    return type(layer).__module__.startswith("jaxseq.")


def check_layer(name: str, layer, input_size: int) -> int:
    """Checks one layer's ``output_size`` for inputs ``[..., D]`` and returns it.

    (:class:`jaxseq.Stack` has checked that every layer declares a positive int.)
    For a layer not from this library (also inside :class:`jaxseq.Bidirectional`
    and nested :class:`jaxseq.Stack`), its params and outputs are traced
    abstractly (``jax.eval_shape``, nothing computed) and an output size that
    disagrees with the declared one is a ``ValueError`` naming the layer and both
    sizes, when the model is built rather than at its first call.
    """
    if isinstance(layer, Bidirectional):  # the halves first: its size is theirs
        f = check_layer(f"{name}.forward", layer.forward, input_size)
        return f + check_layer(f"{name}.backward", layer.backward, input_size)
    if isinstance(layer, Stack):
        return check_stack(layer, input_size, name)
    size = int(layer.output_size)
    if _is_builtin(layer):
        return size

    def outputs():
        params = layer.init(jax.random.key(0), input_size, jnp.float32)
        return rollout(layer, params, jnp.zeros((1, 1, input_size), jnp.float32))[1]

    got = jax.eval_shape(outputs).shape[-1]
    if got != size:
        raise ValueError(
            f"{_layer_name(name, layer)}: declares output_size={size} but its outputs "
            f"have last dim {got} (for inputs of size {input_size}); set output_size to "
            "the last dim of what step/rollout returns"
        )
    return size


def check_stack(stack: Stack, input_size: int, name: str = "stack") -> int:
    """Checks every layer of ``stack`` (see :func:`check_layer`); returns its output size."""
    d = input_size
    for i, layer in enumerate(stack.layers):
        d = check_layer(f"{name}.layers[{i}]", layer, d)
    return d


def pool_last(layer, h, lengths=None):
    """The last valid output of each sequence: ``h: [T, *B, H] -> [*B, H]``.

    The output at step ``lengths - 1`` (``T - 1`` without lengths); for a
    :class:`jaxseq.Bidirectional` ``layer`` the forward half there and the
    backward half at step 0 (where the backward direction ends). Zeros for an
    empty sequence. Read from the outputs, so any cell or layer works.
    """
    t = h.shape[0]
    if t == 0:
        return jnp.zeros(h.shape[1:], h.dtype)
    if lengths is None:
        last = h[-1]
    else:
        idx = jnp.maximum(lengths.astype(jnp.int32) - 1, 0)  # [*B]
        steps = jnp.arange(t, dtype=jnp.int32).reshape((t,) + (1,) * idx.ndim)
        at_last = (steps == idx[None])[..., None]  # [T, *B, 1]
        last = jnp.sum(jnp.where(at_last, h, jnp.zeros((), h.dtype)), axis=0)
    if isinstance(layer, Bidirectional):
        f = layer.forward.output_size
        last = jnp.concatenate([last[..., :f], h[0, ..., f:]], axis=-1)
    if lengths is not None:
        last = jnp.where((lengths > 0)[..., None], last, jnp.zeros((), h.dtype))
    return last


_SCALARS = (bool, int, float, str, type(None))


def _is_layer(value) -> bool:
    return hasattr(value, "init") and hasattr(value, "output_size") and not isinstance(value, type)


def stack_norm(stack) -> dict:
    """The stack settings a model's config records only when set: ``{"norm": ...,
    "norm_eps": ...}`` of a normalised stack, ``{"stack_weight_dropout": ...}`` with
    weight dropout, else ``{}`` (a stack without them records nothing new, so earlier
    configs compare equal).

    >>> stack_norm(recurrent_stack("rglru", 4, 2))
    {'norm': 'rms', 'norm_eps': 1e-06}
    >>> stack_norm(recurrent_stack("gru", 4, 2, weight_dropout=0.2))
    {'stack_weight_dropout': 0.2}
    """
    norm = getattr(stack, "norm", None)
    out = {} if norm is None else {"norm": norm, "norm_eps": float(stack.norm_eps)}
    weight_dropout = float(getattr(stack, "weight_dropout", 0.0))
    return {**out, "stack_weight_dropout": weight_dropout} if weight_dropout else out


def describe_layer(name: str, layer) -> dict:
    """A JSON-able description of a cell or layer: ``{"type": ..., <settings>}``.

    The settings are the layer's ``config()`` when it has one (a dict of JSON
    values), else its dataclass fields, else its public attributes with its
    ``output_size``; nested layers (a :class:`jaxseq.Bidirectional`'s halves)
    are described the same way, and values that are not JSON scalars
    (initializer functions, arrays) are left out.
    """
    config = getattr(layer, "config", None)
    if callable(config):
        d = config()
        if not isinstance(d, dict):
            raise TypeError(
                f"{_layer_name(name, layer)}: config() must return a dict of JSON-able "
                f"settings, got {type(d).__name__}"
            )
        return {"type": type(layer).__name__, **d}
    if dataclasses.is_dataclass(layer):
        items = [(f.name, getattr(layer, f.name)) for f in dataclasses.fields(layer)]
    else:
        public = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
        items = [("output_size", int(layer.output_size)), *public.items()]
    d = {"type": type(layer).__name__}
    for key, value in items:
        if isinstance(value, _SCALARS):
            d[key] = int(value) if isinstance(value, np.integer) else value
        elif isinstance(value, np.integer | np.floating):
            d[key] = value.item()
        elif _is_layer(value):
            d[key] = describe_layer(f"{name}.{key}", value)
        elif isinstance(value, tuple | list) and value and all(map(_is_layer, value)):
            d[key] = [describe_layer(f"{name}.{key}[{i}]", v) for i, v in enumerate(value)]
    return d
