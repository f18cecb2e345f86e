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
threads it from one chunk to the next (see :mod:`jaxseq.train`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.attention import (
    AdditiveAttentionParams,
    additive_attention,
    additive_attention_init,
    additive_attention_keys,
)
from jaxseq.cells import GRU, LSTM, RNN
from jaxseq.layers import (
    Bidirectional,
    DenseParams,
    Stack,
    bidirectional_rollout,
    dense,
    dense_init,
    dropout,
    embed,
    embedding_init,
    stacked_rollout,
)
from jaxseq.rollout import rollout

__all__ = ["LMParams", "LanguageModel", "char_lm", "CELLS"]

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
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate: expected a value in [0, 1), got {self.dropout_rate!r}")

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


# -- taggers, sequence classifiers and an attention encoder-decoder ------------------
#
# Shapes (in addition to the legend above): C classes (tags, or regression outputs),
# S source length, N generated length, A attention size. Time-major like the rest.


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
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate: expected a value in [0, 1), got {self.dropout_rate!r}")

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


class Seq2SeqParams(NamedTuple):
    src_embedding: jax.Array  # [Vs, E]
    tgt_embedding: jax.Array  # [Vt, E]
    encoder: Any  # BidirectionalParams, or one cell's params
    bridge: DenseParams  # [He, Hd]: initial decoder state from the mean encoder state
    attention: AdditiveAttentionParams  # query Hd, keys He, size A
    decoder: Any  # cell params, input E + He
    head: DenseParams  # [Hd + He, Vt]


class Encoded(NamedTuple):
    """What the decoder needs from the source, batch-major for per-example attention."""

    states: jax.Array  # [B, S, He] encoder outputs (zeros past each source length)
    keys: jax.Array  # float32[B, S, A] states @ W_k, projected once
    lengths: jax.Array  # int32[B] source lengths
    carry: Any  # initial decoder carry, [B, Hd] leaves


@dataclasses.dataclass(frozen=True)
class Seq2SeqAttention:
    """RNN encoder-decoder with additive (Bahdanau) attention (Bahdanau et al. 2015).

    Encoder: source embeddings -> a bidirectional (default) or forward cell ->
    states ``h_j`` ``[S, B, He]``. Decoder, for each target step ``t``::

        c_t, a_t = additive_attention(s_{t-1}, h)          # context [He], weights [S]
        s_t      = cell(s_{t-1}, [embed(y_{t-1}); c_t])
        logits_t = W_o [s_t; c_t] + b_o                     # [Vt]

    with ``s_0 = tanh(W_b mean_j h_j + b_b)`` (the cell state of an LSTM starts at 0).

    Time-major with ONE batch dim: ``src: int[S, B]``, ``tgt_in: int[T, B]``.

    Args:
      src_vocab_size, tgt_vocab_size: Vs, Vt.
      embed_dim: E, for source and target embeddings.
      hidden: H of the encoder cells (each direction) and of the decoder cell.
      attention_size: A.
      cell: "gru" (default), "lstm" or "rnn", for encoder and decoder.
      bidirectional: encoder direction(s); He = 2H when True, else H.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 64
    hidden: int = 128
    attention_size: int = 64
    cell: str = "gru"
    bidirectional: bool = True

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden", "attention_size"):
            _checks.check_positive_int(name, getattr(self, name))
        _checks.check_choice("cell", self.cell, tuple(CELLS))

    @property
    def encoder(self):
        c = CELLS[self.cell](self.hidden)
        return Bidirectional(c) if self.bidirectional else c

    @property
    def decoder(self):
        return CELLS[self.cell](self.hidden)

    @property
    def encoder_size(self) -> int:
        return self.encoder.output_size

    def init(self, key, dtype=jnp.float32) -> Seq2SeqParams:
        _checks.check_key("key", key)
        ks = jax.random.split(key, 7)
        e, h, he = self.embed_dim, self.hidden, self.encoder_size
        return Seq2SeqParams(
            src_embedding=embedding_init(ks[0], self.src_vocab_size, e, dtype),
            tgt_embedding=embedding_init(ks[1], self.tgt_vocab_size, e, dtype),
            encoder=self.encoder.init(ks[2], e, dtype),
            bridge=dense_init(ks[3], he, h, dtype),
            attention=additive_attention_init(ks[4], h, he, self.attention_size, dtype),
            decoder=self.decoder.init(ks[5], e + he, dtype),
            head=dense_init(ks[6], h + he, self.tgt_vocab_size, dtype),
        )

    def check_params(self, params, name: str = "params") -> None:
        if not isinstance(params, Seq2SeqParams):
            raise TypeError(f"{name}: expected Seq2SeqParams, got {type(params).__name__}")
        e = self.embed_dim
        _checks.check_shape(
            f"{name}.src_embedding", params.src_embedding, (self.src_vocab_size, e), ("Vs", "E")
        )
        _checks.check_shape(
            f"{name}.tgt_embedding", params.tgt_embedding, (self.tgt_vocab_size, e), ("Vt", "E")
        )
        _checks.check_shape(
            f"{name}.head.w",
            params.head.w,
            (self.hidden + self.encoder_size, self.tgt_vocab_size),
            ("Hd+He", "Vt"),
        )

    def _tokens(self, name, x, batch=None):
        x = _checks.as_array(name, x)
        _checks.check_integer(name, x)
        _checks.check_ndim(name, x, 2, "[T, B] token ids (time-major, one batch dim)")
        if batch is not None and x.shape[1] != batch:
            raise ValueError(
                f"{name}: expected batch B={batch} (the batch of src), got {_checks.describe(x)}"
            )
        return x

    def encode(self, params: Seq2SeqParams, src, src_lengths=None) -> Encoded:
        """Runs the encoder over ``src: int[S, B]`` (``src_lengths: int[B]``, default S)."""
        self.check_params(params)
        src = self._tokens("src", src)
        s, b = src.shape
        if src_lengths is None:
            src_lengths = jnp.full((b,), s, jnp.int32)
        src_lengths = _checks.as_array("src_lengths", src_lengths)
        _checks.check_integer("src_lengths", src_lengths)
        _checks.check_shape("src_lengths", src_lengths, (b,), ("B",))
        src_lengths = src_lengths.astype(jnp.int32)
        x = embed(params.src_embedding, src)
        layer = self.encoder
        if isinstance(layer, Bidirectional):
            _, hs = bidirectional_rollout(layer, params.encoder, x, lengths=src_lengths)
        else:
            _, hs = rollout(layer, params.encoder, x, lengths=src_lengths)
        states = jnp.swapaxes(hs, 0, 1)  # [B, S, He]
        keys = jax.vmap(lambda st: additive_attention_keys(params.attention, st))(states)
        mean = jnp.sum(states.astype(jnp.float32), axis=1) / jnp.maximum(
            src_lengths.astype(jnp.float32), 1.0
        ).reshape(b, 1)
        h0 = jnp.tanh(dense(params.bridge, mean.astype(states.dtype)))
        carry = self.decoder.initial_carry((b,), h0.dtype)._replace(h=h0)
        return Encoded(states, keys, src_lengths, carry)

    def _attend(self, params, enc: Encoded, query):
        def one(q, st, k, n):
            return additive_attention(params.attention, q, st, length=n, projected_keys=k)

        return jax.vmap(one)(query, enc.states, enc.keys, enc.lengths)

    def step(self, params: Seq2SeqParams, enc: Encoded, carry, y_prev):
        """One decoder step: ``y_prev: int[B]`` -> ``(carry, logits f32[B, Vt], weights f32[B, S])``."""
        ctx, w = self._attend(params, enc, carry.h)
        x = jnp.concatenate([embed(params.tgt_embedding, y_prev), ctx.astype(carry.h.dtype)], -1)
        carry, h = self.decoder.step(params.decoder, carry, x)
        logits = dense(params.head, jnp.concatenate([h, ctx.astype(h.dtype)], axis=-1))
        return carry, logits.astype(jnp.float32), w

    def apply(self, params: Seq2SeqParams, src, tgt_in, *, src_lengths=None):
        """Teacher forcing: the decoder reads ``tgt_in: int[T, B]`` (the target shifted
        right, starting with a BOS id) and predicts the next target token at every step.

        Returns ``(logits float32[T, B, Vt], attention weights float32[T, B, S])``.
        """
        enc = self.encode(params, src, src_lengths)
        tgt_in = self._tokens("tgt_in", tgt_in, enc.states.shape[0])

        def body(carry, y):
            carry, logits, w = self.step(params, enc, carry, y)
            return carry, (logits, w)

        _, (logits, weights) = jax.lax.scan(body, enc.carry, tgt_in)
        return logits, weights

    def greedy_decode(
        self, params: Seq2SeqParams, src, length: int, *, bos_id: int, src_lengths=None
    ):
        """Greedy decoding of ``length`` tokens after ``bos_id`` (one scan, compiles once).

        Returns ``(tokens int32[N, B], attention weights float32[N, B, S])``; cut each
        sequence at its first end-of-sequence token yourself.
        """
        n = _checks.check_positive_int("length", length)
        if not 0 <= int(bos_id) < self.tgt_vocab_size:
            raise ValueError(
                f"bos_id: expected an id in [0, {self.tgt_vocab_size}), got {bos_id!r}"
            )
        enc = self.encode(params, src, src_lengths)
        b = enc.states.shape[0]

        def body(state, _):
            carry, y = state
            carry, logits, w = self.step(params, enc, carry, y)
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (carry, nxt), (nxt, w)

        y0 = jnp.full((b,), int(bos_id), jnp.int32)
        _, (tokens, weights) = jax.lax.scan(body, (enc.carry, y0), None, length=n)
        return tokens, weights


__all__ += [
    "Encoded",
    "Seq2SeqAttention",
    "Seq2SeqParams",
    "SequenceClassifier",
    "SequenceParams",
    "SequenceTagger",
    "classifier",
    "tagger",
]
