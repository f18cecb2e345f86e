"""Sequence taggers (one label per step) and classifiers (one label per sequence)
over padded batches with lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.models.language import CELLS
from jaxseq.nn.dense import DenseParams, dense, dense_init
from jaxseq.nn.dropout import dropout
from jaxseq.nn.embedding import embed, embedding_init
from jaxseq.recurrent.layers import Bidirectional, Stack, stacked_rollout

__all__ = ["SequenceClassifier", "SequenceParams", "SequenceTagger", "classifier", "tagger"]


class SequenceParams(NamedTuple):
    embedding: jax.Array | None  # [V, E] for token inputs; None for feature inputs
    stack: tuple  # per-layer cell params
    head: DenseParams  # w [H, C], b [C]


def _last_hidden(layer, carry):
    """The ``h`` of one layer's final carry (forward and backward halves concatenated)."""
    if isinstance(layer, Bidirectional):
        return jnp.concatenate([carry.forward.h, carry.backward.h], axis=-1)
    return carry.h


@dataclasses.dataclass(frozen=True)
class _SequenceModel:
    """Shared input handling of :class:`SequenceTagger` and :class:`SequenceClassifier`.

    Exactly one input kind: tokens (``vocab_size`` and ``embed_dim``: ``int[T, *B]``
    ids embedded to ``[T, *B, E]``) or features (``input_size``: ``[T, *B, D]``).
    """

    stack: Stack
    num_classes: int
    vocab_size: int | None = None
    embed_dim: int | None = None
    input_size: int | None = None
    dropout_rate: float = 0.0
    unroll: Any = 1

    def __post_init__(self):
        if not isinstance(self.stack, Stack):
            raise TypeError(f"stack: expected js.Stack, got {type(self.stack).__name__}")
        _checks.check_positive_int("num_classes", self.num_classes)
        tokens = self.vocab_size is not None
        if tokens == (self.input_size is not None):
            raise ValueError(
                "vocab_size, input_size: give exactly one (token ids or feature inputs), got "
                f"vocab_size={self.vocab_size!r}, input_size={self.input_size!r}"
            )
        if tokens:
            _checks.check_positive_int("vocab_size", self.vocab_size)
            _checks.check_positive_int("embed_dim", self.embed_dim)
        else:
            _checks.check_positive_int("input_size", self.input_size)
        _checks.check_rate("dropout_rate", self.dropout_rate)

    @property
    def _rnn_input_size(self) -> int:
        return self.embed_dim if self.vocab_size is not None else self.input_size

    @property
    def _head_input_size(self) -> int:
        return self.stack.output_size

    def init(self, key, dtype=jnp.float32) -> SequenceParams:
        _checks.check_key("key", key)
        ke, ks, kh = jax.random.split(key, 3)
        emb = None
        if self.vocab_size is not None:
            emb = embedding_init(ke, self.vocab_size, self.embed_dim, dtype)
        stack = self.stack.init(ks, self._rnn_input_size, dtype)
        head = dense_init(kh, self._head_input_size, self.num_classes, dtype)
        return SequenceParams(emb, stack, head)

    def check_params(self, params, name: str = "params") -> None:
        if not isinstance(params, SequenceParams):
            raise TypeError(f"{name}: expected SequenceParams, got {type(params).__name__}")
        if self.vocab_size is not None:
            _checks.check_shape(
                f"{name}.embedding", params.embedding, (self.vocab_size, self.embed_dim), ("V", "E")
            )
        _checks.check_shape(
            f"{name}.head.w", params.head.w, (self._head_input_size, self.num_classes), ("H", "C")
        )

    def _inputs(self, params, xs, lengths):
        xs = _checks.as_array("xs", xs)
        if self.vocab_size is not None:
            _checks.check_integer("xs", xs)
            _checks.check_min_ndim("xs", xs, 1, "[T, *B] token ids")
            batch_shape = tuple(xs.shape[1:])
            x = embed(params.embedding, xs)
        else:
            _checks.check_floating("xs", xs)
            _checks.check_min_ndim("xs", xs, 2, "[T, *B, D] features")
            if xs.shape[-1] != self.input_size:
                raise ValueError(
                    f"xs: expected last dim D={self.input_size} (input_size), "
                    f"got {_checks.describe(xs)}"
                )
            batch_shape = tuple(xs.shape[1:-1])
            x = xs
        if lengths is not None:
            lengths = _checks.check_lengths(lengths, batch_shape, xs)
        return x, lengths

    def _run(self, params, xs, lengths, key):
        """-> (per-layer final carries, last-layer outputs ``[T, *B, H]``)."""
        self.check_params(params)
        x, lengths = self._inputs(params, xs, lengths)
        use_dropout = key is not None and self.dropout_rate > 0.0
        k_in = k_stack = k_out = None
        if key is not None:
            _checks.check_key("key", key)
            k_in, k_stack, k_out = jax.random.split(key, 3)
        if use_dropout:
            x = dropout(k_in, x, self.dropout_rate)
        carries, h = stacked_rollout(
            self.stack, params.stack, x, lengths=lengths, key=k_stack, unroll=self.unroll
        )
        if use_dropout:
            h = dropout(k_out, h, self.dropout_rate)
        return carries, h, lengths


@dataclasses.dataclass(frozen=True)
class SequenceTagger(_SequenceModel):
    """One prediction per time step: inputs -> :class:`jaxseq.Stack` -> dense head.

    With a bidirectional stack (see :func:`tagger`) every step's prediction sees
    the whole sequence. Args as :class:`SequenceClassifier` (``num_classes`` is the
    number of tags).
    """

    def apply(self, params: SequenceParams, xs, *, lengths=None, key=None):
        """``xs: int[T, *B]`` (tokens) or ``[T, *B, D]`` (features) -> ``float32[T, *B, C]``.

        ``lengths: int[*B]`` right padding: the backward direction starts at each
        sequence's last valid step, and padded steps get the head's bias only
        (mask them in the loss, e.g. ``js.losses.cross_entropy(..., lengths=lengths)``).
        ``key``: dropout key (dropout off when None).
        """
        _, h, _ = self._run(params, xs, lengths, key)
        return dense(params.head, h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SequenceClassifier(_SequenceModel):
    """One prediction per sequence: inputs -> :class:`jaxseq.Stack` -> pooling -> dense head.

    Args:
      stack: the recurrent layers (cells and/or :class:`jaxseq.Bidirectional`).
      num_classes: C, the head's outputs (class logits, or C regression outputs).
      vocab_size, embed_dim: token inputs ``int[T, *B]`` through an embedding ``[V, E]``;
      input_size: or feature inputs ``[T, *B, D]`` (give one of the two kinds).
      dropout_rate: dropout on the inputs and on the pooled features (with a ``key``).
      pool: ``"last"`` the last layer's final hidden state (for a bidirectional
        layer, the forward state after the last valid step and the backward
        state after step 0), or ``"mean"`` the mean of its outputs over valid steps.
    """

    pool: str = "last"

    def __post_init__(self):
        super().__post_init__()
        _checks.check_choice("pool", self.pool, ("last", "mean"))

    def apply(self, params: SequenceParams, xs, *, lengths=None, key=None):
        """``xs: int[T, *B]`` or ``[T, *B, D]`` -> ``float32[*B, C]``; ``lengths: int[*B]``."""
        carries, h, lengths = self._run(params, xs, lengths, key)
        if self.pool == "last":
            feat = _last_hidden(self.stack.layers[-1], carries[-1])
        else:
            t = h.shape[0]
            if lengths is None:
                feat = jnp.mean(h.astype(jnp.float32), axis=0)
            else:
                steps = jnp.arange(t, dtype=jnp.int32).reshape((t,) + (1,) * lengths.ndim)
                w = (steps < lengths[None]).astype(jnp.float32)[..., None]
                total = jnp.sum(h.astype(jnp.float32) * w, axis=0)
                feat = total / jnp.maximum(jnp.sum(w, axis=0), 1.0)
            feat = feat.astype(h.dtype)
        return dense(params.head, feat).astype(jnp.float32)


def _recurrent_stack(cell, hidden, layers, bidirectional, dropout_rate, cell_kwargs):
    _checks.check_choice("cell", cell, tuple(CELLS))
    h = _checks.check_positive_int("hidden", hidden)
    n = _checks.check_positive_int("layers", layers)
    make = (
        (lambda: Bidirectional(CELLS[cell](h, **cell_kwargs)))
        if bidirectional
        else (lambda: CELLS[cell](h, **cell_kwargs))
    )
    return Stack(tuple(make() for _ in range(n)), dropout_rate=dropout_rate)


def tagger(
    num_tags: int,
    *,
    vocab_size: int | None = None,
    embed_dim: int = 64,
    input_size: int | None = None,
    cell: str = "lstm",
    hidden: int = 128,
    layers: int = 1,
    bidirectional: bool = True,
    dropout_rate: float = 0.0,
    **cell_kwargs,
) -> SequenceTagger:
    """A (by default bidirectional) recurrent sequence tagger.

    ``cell`` is "lstm", "gru" or "rnn"; ``cell_kwargs`` go to every cell (e.g.
    ``activation="relu"``, ``recurrent_init=...`` for an IRNN). Token inputs when
    ``vocab_size`` is given, else feature inputs of size ``input_size``.
    """
    stack = _recurrent_stack(cell, hidden, layers, bidirectional, dropout_rate, cell_kwargs)
    return SequenceTagger(
        stack, num_tags, vocab_size=vocab_size, embed_dim=embed_dim if vocab_size else None,
        input_size=input_size, dropout_rate=dropout_rate,
    )  # fmt: skip


def classifier(
    num_classes: int,
    *,
    vocab_size: int | None = None,
    embed_dim: int = 64,
    input_size: int | None = None,
    cell: str = "lstm",
    hidden: int = 128,
    layers: int = 1,
    bidirectional: bool = False,
    pool: str = "last",
    dropout_rate: float = 0.0,
    **cell_kwargs,
) -> SequenceClassifier:
    """A recurrent sequence classifier (or regressor: train its C outputs with MSE).

    Arguments as :func:`tagger`; ``pool`` as :class:`SequenceClassifier`.
    """
    stack = _recurrent_stack(cell, hidden, layers, bidirectional, dropout_rate, cell_kwargs)
    return SequenceClassifier(
        stack, num_classes, vocab_size=vocab_size, embed_dim=embed_dim if vocab_size else None,
        input_size=input_size, dropout_rate=dropout_rate, pool=pool,
    )  # fmt: skip
