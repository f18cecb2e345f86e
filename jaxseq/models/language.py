"""Composed pure models built from cells and layers.

:class:`LanguageModel`: token embedding, a :class:`jaxseq.Stack` of recurrent
layers and a dense head over the vocabulary. Time-major::

    model = js.models.char_lm(vocab_size=65, cell="lstm", layers=2, hidden=256)
    params = model.init(key)                      # LMParams(embedding, stack, head)
    carry = model.initial_carry((B,))             # tuple of per-layer carries
    carry, logits = model.apply(params, carry, tokens)   # int[T, B] -> [T, B, V]

Shapes: T time, B batch (any number of batch dims), E embedding size,
H hidden size, V vocabulary size.

The recurrent state is an explicit input and output, so a truncated-BPTT loop
threads it from one chunk to the next (see :mod:`jaxseq.training`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.nn.dense import DenseParams, dense, dense_init
from jaxseq.nn.dropout import dropout
from jaxseq.nn.embedding import embed, embedding_init
from jaxseq.recurrent.cells import GRU, LSTM, RNN
from jaxseq.recurrent.layers import Stack, stacked_rollout

__all__ = [
    "CELLS",
    "LMParams",
    "LanguageModel",
    "char_lm",
]


CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


class LMParams(NamedTuple):
    embedding: jax.Array  # [V, E]
    stack: tuple  # per-layer cell params
    head: DenseParams  # w [H, V], b [V]


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Embedding -> stacked recurrent layers -> dense head over the vocabulary.

    Args:
      vocab_size: V.
      embed_dim: E, the embedding size (input size of the first layer).
      stack: a :class:`jaxseq.Stack` (its ``dropout_rate`` applies between layers).
      dropout_rate: dropout on the embeddings and on the last layer's outputs
        (before the head); like the stack's, it is on only when ``apply`` gets a ``key``.
      unroll: the ``lax.scan`` unroll passed to the rollouts.
      variational_dropout: share each dropout mask over the time axis (one mask per
        sequence and chunk, as the stack's ``variational_dropout``).
    """

    vocab_size: int
    embed_dim: int
    stack: Stack
    dropout_rate: float = 0.0
    unroll: Any = 1
    variational_dropout: bool = False

    def __post_init__(self):
        _checks.check_positive_int("vocab_size", self.vocab_size)
        _checks.check_positive_int("embed_dim", self.embed_dim)
        if not isinstance(self.stack, Stack):
            raise TypeError(f"stack: expected js.Stack, got {type(self.stack).__name__}")
        _checks.check_rate("dropout_rate", self.dropout_rate)

    def init(self, key, dtype=jnp.float32) -> LMParams:
        _checks.check_key("key", key)
        ke, ks, kh = jax.random.split(key, 3)
        emb = embedding_init(ke, self.vocab_size, self.embed_dim, dtype)
        stack = self.stack.init(ks, self.embed_dim, dtype)
        head = dense_init(kh, self.stack.output_size, self.vocab_size, dtype)
        return LMParams(emb, stack, head)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> tuple:
        """Zeros for every layer: a tuple of per-layer carries ``[*B, H]``."""
        return self.stack.initial_carry(batch_shape, dtype)

    def config(self) -> dict:
        """A JSON-able description (compared when a checkpoint is restored)."""
        layers = []
        for lay in self.stack.layers:
            d = {"type": type(lay).__name__}
            for f in dataclasses.fields(lay):
                v = getattr(lay, f.name)
                if isinstance(v, int | float | str | bool) or v is None:
                    d[f.name] = v
            layers.append(d)
        return {
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "layers": layers,
            "residual": bool(self.stack.residual),
            "stack_dropout": float(self.stack.dropout_rate),
            "dropout_rate": float(self.dropout_rate),
            "variational_dropout": bool(self.variational_dropout),
            "stack_variational_dropout": bool(self.stack.variational_dropout),
        }

    def check_tokens(self, tokens, name: str = "tokens"):
        tokens = _checks.as_array(name, tokens)
        _checks.check_integer(name, tokens)
        _checks.check_min_ndim(name, tokens, 1, "[T, *B]")
        return tokens

    def check_params(self, params, name: str = "params") -> None:
        if not isinstance(params, LMParams):
            raise TypeError(f"{name}: expected LMParams, got {type(params).__name__}")
        _checks.check_shape(
            f"{name}.embedding", params.embedding, (self.vocab_size, self.embed_dim), ("V", "E")
        )
        _checks.check_shape(
            f"{name}.head.w", params.head.w, (self.stack.output_size, self.vocab_size), ("H", "V")
        )

    def apply(self, params: LMParams, carry, tokens, *, reset=None, lengths=None, key=None):
        """Runs the model over ``tokens: int[T, *B]``.

        Args:
          params: :class:`LMParams`.
          carry: per-layer carries for batch ``*B`` (``None``: zeros).
          tokens: ``int[T, *B]`` token ids in ``[0, V)``, time-major.
          reset: optional ``bool[T, *B]``: zero the carry before step t (document starts).
          lengths: optional ``int[*B]``: steps past a sequence's length leave its carry
            unchanged (the returned carry is the one after its last valid step).
          key: dropout key; dropout is off when None (evaluation).

        Returns:
          ``(carry, logits: float32[T, *B, V])``.
        """
        self.check_params(params)
        tokens = self.check_tokens(tokens)
        batch_shape = tuple(tokens.shape[1:])
        if carry is None:
            carry = self.initial_carry(batch_shape)
        use_dropout = key is not None and self.dropout_rate > 0.0
        shared = (0,) if self.variational_dropout else ()  # time axis: one mask per chunk
        k_in = k_stack = k_out = None
        if key is not None:
            _checks.check_key("key", key)
            k_in, k_stack, k_out = jax.random.split(key, 3)
        x = embed(params.embedding, tokens)
        if use_dropout:
            x = dropout(k_in, x, self.dropout_rate, shared_axes=shared)
        carry, h = stacked_rollout(
            self.stack,
            params.stack,
            x,
            tuple(carry),
            lengths=lengths,
            reset=reset,
            key=k_stack,
            unroll=self.unroll,
        )
        if use_dropout:
            h = dropout(k_out, h, self.dropout_rate, shared_axes=shared)
        logits = dense(params.head, h).astype(jnp.float32)
        return carry, logits


def char_lm(
    vocab_size: int,
    *,
    cell: str = "lstm",
    layers: int = 2,
    hidden: int = 256,
    embed_dim: int = 128,
    dropout_rate: float = 0.0,
    layer_dropout: float | None = None,
    variational_dropout: bool = False,
    unroll: Any = 1,
) -> LanguageModel:
    """A character language model: ``layers`` cells of type ``cell`` ("lstm", "gru", "rnn").

    ``dropout_rate`` applies to the embeddings and the head input;
    ``layer_dropout`` (default: ``dropout_rate``) between the recurrent layers;
    ``variational_dropout`` shares every mask over time (one per stream and chunk).
    """
    _checks.check_choice("cell", cell, tuple(CELLS))
    n = _checks.check_positive_int("layers", layers)
    h = _checks.check_positive_int("hidden", hidden)
    cells = tuple(CELLS[cell](h) for _ in range(n))
    ld = dropout_rate if layer_dropout is None else layer_dropout
    return LanguageModel(
        vocab_size,
        embed_dim,
        Stack(cells, dropout_rate=ld, variational_dropout=variational_dropout),
        dropout_rate=dropout_rate,
        unroll=unroll,
        variational_dropout=variational_dropout,
    )
