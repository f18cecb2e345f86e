"""The body every recurrent model shares: inputs (token embeddings or features) ->
dropout -> a :class:`jaxseq.Stack` run by :func:`jaxseq.rollout` -> dropout -> a dense head.

Invariants: one key split ``(inputs, stack, outputs)`` per call, dropout only when
a key is given and the rate is positive; the parameters are ``(embedding or None,
stack, head)`` drawn from one key split ``(embedding, stack, head)``. Time-major:
``[T, *B, ...]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.nn.dense import dense_init
from jaxseq.nn.dropout import dropout
from jaxseq.nn.embedding import embedding_init
from jaxseq.recurrent.cells import GRU, LSTM, RNN
from jaxseq.recurrent.layers import Bidirectional, Stack
from jaxseq.recurrent.minimal import MinGRU, MinLSTM
from jaxseq.recurrent.rollouts import rollout
from jaxseq.recurrent.rollouts import valid_steps as _steps_mask

__all__: list[str] = []

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN, "mingru": MinGRU, "minlstm": MinLSTM}


def recurrent_stack(
    cell: str,
    hidden_size: int,
    num_layers: int,
    *,
    bidirectional: bool = False,
    dropout_rate: float = 0.0,
    variational_dropout: bool = False,
    cell_kwargs=None,
) -> Stack:
    """``num_layers`` cells named ``cell`` of size ``hidden_size`` (each direction), stacked."""
    _checks.check_choice("cell", cell, tuple(CELLS))
    h = _checks.check_positive_int("hidden_size", hidden_size)
    n = _checks.check_positive_int("num_layers", num_layers)
    kw = dict(cell_kwargs or {})

    def layer():
        c = CELLS[cell](h, **kw)
        return Bidirectional(c) if bidirectional else c

    return Stack(
        tuple(layer() for _ in range(n)),
        dropout_rate=dropout_rate,
        variational_dropout=variational_dropout,
    )


def init_body(key, stack: Stack, input_size: int, output_size: int, vocab_size, dtype):
    """``(embedding [V, E] or None, stack params, head DenseParams [H, O])``.

    With ``vocab_size`` the inputs are token ids embedded to ``input_size = E``.
    """
    _checks.check_key("key", key)
    ke, ks, kh = jax.random.split(key, 3)
    emb = None if vocab_size is None else embedding_init(ke, vocab_size, input_size, dtype)
    return (
        emb,
        stack.init(ks, input_size, dtype),
        dense_init(kh, stack.output_size, output_size, dtype),
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
    reset=None,
    unroll="auto",
    key=None,
):
    """Dropout on ``x: [T, *B, D]``, the stack, dropout on its outputs -> ``(carries, h [T, *B, H])``."""
    use_dropout = key is not None and dropout_rate > 0.0
    k_in = k_stack = k_out = None
    if key is not None:
        _checks.check_key("key", key)
        k_in, k_stack, k_out = jax.random.split(key, 3)
    if use_dropout:
        x = dropout(k_in, x, dropout_rate, shared_axes=shared_axes)
    carry, h = rollout(
        stack, params, x, carry, lengths=lengths, reset=reset, unroll=unroll, key=k_stack
    )
    if use_dropout:
        h = dropout(k_out, h, dropout_rate, shared_axes=shared_axes)
    return carry, h


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
