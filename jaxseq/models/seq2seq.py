"""An RNN encoder-decoder with additive attention (Bahdanau et al. 2015), or without
it (Cho et al. 2014: the decoder sees only the final encoder state)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.attention.additive import (
    AdditiveAttention,
    AdditiveAttentionParams,
    additive_attention,
    additive_attention_keys,
)
from jaxseq.models._body import CELLS, check_time_major, check_tokens, token_ids
from jaxseq.nn.dense import Dense, DenseParams, dense
from jaxseq.nn.embedding import Embedding, embed
from jaxseq.recurrent.layers import Bidirectional
from jaxseq.recurrent.rollouts import rollout
from jaxseq.recurrent.sequence import valid_steps

__all__ = ["DecoderCarry", "Encoded", "Seq2SeqAttention", "Seq2SeqParams"]


class Seq2SeqParams(NamedTuple):
    """Encoder-decoder parameters (shapes per field below)."""

    src_embedding: jax.Array  # [Vs, E]
    tgt_embedding: jax.Array  # [Vt, E]
    encoder: Any  # BidirectionalParams, or one cell's params
    bridge: DenseParams  # [He, Hd]: initial decoder state from the mean (or final) state
    attention: AdditiveAttentionParams | None  # query Hd, keys He, size A (None: no attention)
    decoder: Any  # cell params, input E + He
    head: DenseParams  # [Hd + He, Vt]


class Encoded(NamedTuple):
    """What the decoder needs from the source, batch-major for per-example attention."""

    states: jax.Array  # [B, S, He] encoder outputs (zeros past each source length)
    keys: jax.Array | None  # float32[B, S, A] states @ W_k, projected once (None: no attention)
    lengths: jax.Array  # int32[B] source lengths
    carry: Any  # initial decoder carry (leaves [B, ...]): the cell's, or a DecoderCarry
    final: jax.Array  # [B, He] final encoder state: forward at the last valid step, backward at 0


class DecoderCarry(NamedTuple):
    """The decoder's carry when its cell's carry has no ``h`` (the mLSTM's ``(c, n, m)``):
    the cell's carry and its last output ``h [B, Hd]``, the next attention query.

    >>> s2s = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=4, cell="mlstm")
    >>> enc = s2s.encode(s2s.init(jax.random.key(0)), jnp.zeros((3, 2), jnp.int32))
    >>> type(enc.carry).__name__, enc.carry.h.shape, enc.carry.cell.c.shape
    ('DecoderCarry', (2, 4), (2, 4, 1, 1))
    """

    cell: Any  # the decoder cell's carry
    h: jax.Array  # [B, Hd]: its last output (at the start: the bridge's tanh(W_b summary))


def _has_h(carry) -> bool:
    return "h" in getattr(carry, "_fields", ())


@dataclasses.dataclass(frozen=True)
class Seq2SeqAttention:
    """RNN encoder-decoder with additive (Bahdanau) attention (Bahdanau et al. 2015).

    Encoder: source embeddings -> a bidirectional (default) or forward cell ->
    states ``h_j`` ``[S, B, He]``. Decoder, for each target step ``t``::

        c_t, a_t = additive_attention(s_{t-1}, h)          # context [He], weights [S]
        s_t      = cell(s_{t-1}, [embed(y_{t-1}); c_t])
        logits_t = W_o [s_t; c_t] + b_o                     # [Vt]

    with ``s_0 = tanh(W_b mean_j h_j + b_b)`` (the cell state of an LSTM starts at 0).
    The query ``s_{t-1}`` is the carry's ``h``; a cell whose carry has no ``h``
    (the mLSTM) runs from a zero carry inside a :class:`DecoderCarry` that keeps
    its last output as the query (``s_0`` at the start).

    ``attention=False`` is the baseline without attention (Cho et al. 2014): the
    decoder sees only the final encoder state ``f`` (forward direction at the last
    valid step, backward direction at step 0), the same context at every step:
    ``c_t = f``, ``s_0 = tanh(W_b f + b_b)``; ``params.attention`` is None and the
    returned attention weights are None.

    Time-major with ONE batch dim: ``src: int[S, B]``, ``tgt_in: int[T, B]``
    (``apply(..., time_major=False)``: batch-major ``[B, S]``, ``[B, T]``).
    Generation: :func:`jaxseq.decoding.greedy_decode` (the decoding loop lives in
    :mod:`jaxseq.decoding`, above the models).

    Args:
      src_vocab_size, tgt_vocab_size: Vs, Vt.
      embedding_size: E, for source and target embeddings.
      hidden_size: H of the encoder cells (each direction) and of the decoder cell.
      attention_size: A.
      cell: a name of :data:`jaxseq.models.CELLS` ("gru" by default, "lstm", "rnn",
        "rglru", "mlstm", "slstm", ...), for encoder and decoder.
      bidirectional: encoder direction(s); He = 2H when True, else H.
      attention: False for the encoder-decoder without attention (see above).

    >>> s2s = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=6, attention_size=3)
    >>> params = s2s.init(jax.random.key(0))
    >>> src, tgt_in = jnp.zeros((4, 2), jnp.int32), jnp.zeros((3, 2), jnp.int32)
    >>> logits, weights = s2s.apply(params, src, tgt_in, src_lengths=jnp.array([4, 2]))
    >>> logits.shape, weights.shape, weights[0, 1].round(3).tolist()
    ((3, 2, 5), (3, 2, 4), [0.5, 0.5, 0.0, 0.0])
    >>> plain = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=6, attention=False)
    >>> logits, weights = plain.apply(plain.init(jax.random.key(0)), src, tgt_in)
    >>> logits.shape, weights
    ((3, 2, 5), None)
    """

    src_vocab_size: int
    tgt_vocab_size: int
    embedding_size: int = 64
    hidden_size: int = 128
    attention_size: int = 64
    cell: str = "gru"
    bidirectional: bool = True
    attention: bool = True

    def __post_init__(self):
        for name in (
            "src_vocab_size",
            "tgt_vocab_size",
            "embedding_size",
            "hidden_size",
            "attention_size",
        ):
            _checks.check_positive_int(name, getattr(self, name))
        _checks.check_choice("cell", self.cell, tuple(CELLS))
        for name in ("bidirectional", "attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    @property
    def encoder(self):
        """The encoder layer: a cell, or a :class:`jaxseq.Bidirectional` pair of cells."""
        c = CELLS[self.cell](self.hidden_size)
        return Bidirectional(c) if self.bidirectional else c

    @property
    def decoder(self):
        """The decoder cell (input ``E + He``, state ``H``)."""
        return CELLS[self.cell](self.hidden_size)

    @property
    def encoder_size(self) -> int:
        """He: the size of an encoder state."""
        return self.encoder.output_size

    def init(self, key, dtype=jnp.float32) -> Seq2SeqParams:
        """Parameters: embeddings N(0, 1), cells by their initialisers, LeCun-normal dense layers."""
        _checks.check_key("key", key)
        ks = jax.random.split(key, 7)
        e, h, he = self.embedding_size, self.hidden_size, self.encoder_size
        return Seq2SeqParams(
            src_embedding=Embedding(e).init(ks[0], self.src_vocab_size, dtype),
            tgt_embedding=Embedding(e).init(ks[1], self.tgt_vocab_size, dtype),
            encoder=self.encoder.init(ks[2], e, dtype),
            bridge=Dense(h).init(ks[3], he, dtype),
            attention=(
                AdditiveAttention(self.attention_size).init(ks[4], h, he, dtype=dtype)
                if self.attention
                else None
            ),
            decoder=self.decoder.init(ks[5], e + he, dtype),
            head=Dense(self.tgt_vocab_size).init(ks[6], h + he, dtype),
        )

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are :class:`Seq2SeqParams` of this model's sizes."""
        if not isinstance(params, Seq2SeqParams):
            raise TypeError(f"{name}: expected Seq2SeqParams, got {type(params).__name__}")
        e = self.embedding_size
        _checks.check_shape(
            f"{name}.src_embedding", params.src_embedding, (self.src_vocab_size, e), ("Vs", "E")
        )
        _checks.check_shape(
            f"{name}.tgt_embedding", params.tgt_embedding, (self.tgt_vocab_size, e), ("Vt", "E")
        )
        _checks.check_shape(
            f"{name}.head.w",
            params.head.w,
            (self.hidden_size + self.encoder_size, self.tgt_vocab_size),
            ("Hd+He", "Vt"),
        )
        if self.attention and not isinstance(params.attention, AdditiveAttentionParams):
            raise TypeError(
                f"{name}.attention: expected AdditiveAttentionParams (attention=True), "
                f"got {type(params.attention).__name__}"
            )
        if not self.attention and params.attention is not None:
            raise TypeError(
                f"{name}.attention: expected None (attention=False), "
                f"got {type(params.attention).__name__}"
            )

    def _tokens(self, name, x, batch=None):
        x = check_tokens(name, x, "[T, B] token ids (time-major, one batch dim)", ndim=2)
        if batch is not None and x.shape[1] != batch:
            raise ValueError(
                f"{name}: expected batch B={batch} (the batch of src), got {_checks.describe(x)}"
            )
        return x

    def encode(self, params: Seq2SeqParams, src, src_lengths=None) -> Encoded:
        """Runs the encoder over ``src: int[S, B]`` (``src_lengths: int[B]``, default S).

        Source ids at valid positions (``s < src_lengths``) must be in ``[0, Vs)``;
        padded positions may hold anything (``-100``): they are not looked up. Out
        of range: ``ValueError`` naming ``src``, the range and the value for concrete
        ids; under ``jax.jit`` only :func:`jaxseq.checked` raises (plain ``jit``
        looks up NaN for an id >= Vs or < -Vs and counts a negative id from the end).
        """
        self.check_params(params)
        src = self._tokens("src", src)
        s, b = src.shape
        explicit = src_lengths is not None
        if src_lengths is None:
            src_lengths = jnp.full((b,), s, jnp.int32)
        src_lengths = _checks.as_array("src_lengths", src_lengths)
        _checks.check_integer("src_lengths", src_lengths)
        _checks.check_shape("src_lengths", src_lengths, (b,), ("B",))
        src_lengths = src_lengths.astype(jnp.int32)
        valid = valid_steps(src_lengths, s) if explicit else None  # [S, B]
        src = token_ids("src", src, self.src_vocab_size, valid)
        x = embed(params.src_embedding, src)
        # js.rollout selects padded steps away and writes zeros there: exact zero states
        _, hs = rollout(self.encoder, params.encoder, x, lengths=src_lengths)
        states = jnp.swapaxes(hs, 0, 1)  # [B, S, He]
        final = self._final_state(states, src_lengths)
        if self.attention:
            # params.attention is set in the params of a model with attention
            keys = jax.vmap(lambda st: additive_attention_keys(params.attention, st))(states)  # type: ignore[arg-type]
            summary = jnp.sum(states.astype(jnp.float32), axis=1) / jnp.maximum(
                src_lengths.astype(jnp.float32), 1.0
            ).reshape(b, 1)
        else:
            keys, summary = None, final
        h0 = jnp.tanh(dense(params.bridge, summary.astype(states.dtype)))
        carry = self.decoder.initial_carry((b,), h0.dtype)
        carry = carry._replace(h=h0) if _has_h(carry) else DecoderCarry(carry, h0)
        return Encoded(states, keys, src_lengths, carry, final)

    def _final_state(self, states, lengths):
        """``[B, He]``: the forward states at step ``length - 1`` (and the backward ones
        at step 0); zeros for an empty source."""
        last = jnp.maximum(lengths - 1, 0)[:, None, None]
        fwd = jnp.take_along_axis(states, last, axis=1)[:, 0]  # [B, He]
        if self.bidirectional:
            h = self.hidden_size
            fwd = jnp.concatenate([fwd[:, :h], states[:, 0, h:]], axis=-1)
        return jnp.where((lengths > 0)[:, None], fwd, jnp.zeros_like(fwd))

    def _attend(self, params, enc: Encoded, query):
        if not self.attention:
            return enc.final, None

        def one(q, st, k, n):
            return additive_attention(params.attention, q, st, lengths=n, projected_keys=k)

        return jax.vmap(one)(query, enc.states, enc.keys, enc.lengths)

    def step(self, params: Seq2SeqParams, enc: Encoded, carry, y_prev):
        """One decoder step: ``y_prev: int[B]`` -> ``(carry, logits f32[B, Vt], weights f32[B, S])``
        (weights None without attention).

        ``y_prev`` ids must be in ``[0, Vt)`` (checked as ``tgt_in`` in :meth:`apply`).
        """
        y_prev = token_ids("y_prev", _checks.as_array("y_prev", y_prev), self.tgt_vocab_size)
        return self._step(params, enc, carry, y_prev)

    def _step(self, params, enc, carry, y_prev):
        ctx, w = self._attend(params, enc, carry.h)
        x = jnp.concatenate([embed(params.tgt_embedding, y_prev), ctx.astype(carry.h.dtype)], -1)
        if isinstance(carry, DecoderCarry):
            cell_carry, h = self.decoder.step(params.decoder, carry.cell, x)
            carry = DecoderCarry(cell_carry, h.astype(carry.h.dtype))
        else:
            carry, h = self.decoder.step(params.decoder, carry, x)
        logits = dense(params.head, jnp.concatenate([h, ctx.astype(h.dtype)], axis=-1))
        return carry, logits.astype(jnp.float32), w

    def apply(self, params: Seq2SeqParams, src, tgt_in, *, src_lengths=None, time_major=True):
        """Teacher forcing: the decoder reads ``tgt_in: int[T, B]`` (the target shifted
        right, starting with a BOS id) and predicts the next target token at every step.

        Returns ``(logits float32[T, B, Vt], attention weights float32[T, B, S])``
        (weights None without attention). With ``time_major=False``: ``src: int[B, S]``,
        ``tgt_in: int[B, T]``, logits ``[B, T, Vt]`` and weights ``[B, T, S]``.

        Raises ``ValueError`` for ids out of range: ``src`` at valid positions (see
        :meth:`encode`) and every ``tgt_in`` id outside ``[0, Vt)`` (pad it with a
        real id, and mask the loss). Under ``jax.jit`` these checks run only inside
        :func:`jaxseq.checked`; plain ``jit`` looks up NaN or a wrapped id instead.

        >>> s2s = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=6, attention_size=3)
        >>> src, tgt_in = jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 3), jnp.int32)  # [B, S], [B, T]
        >>> logits, weights = s2s.apply(s2s.init(jax.random.key(0)), src, tgt_in, time_major=False)
        >>> logits.shape, weights.shape
        ((2, 3, 5), (2, 3, 4))
        """
        if not check_time_major(time_major):  # checked in the layout given, then turned around
            what = "token ids (time_major=False, one batch dim)"
            src = check_tokens("src", src, f"[B, S] {what}", ndim=2).T
            tgt_in = check_tokens("tgt_in", tgt_in, f"[B, T] {what}", ndim=2).T
        enc = self.encode(params, src, src_lengths)
        tgt_in = self._tokens("tgt_in", tgt_in, enc.states.shape[0])
        tgt_in = token_ids("tgt_in", tgt_in, self.tgt_vocab_size)

        def body(carry, y):
            carry, logits, w = self._step(params, enc, carry, y)
            return carry, (logits, w)

        _, (logits, weights) = jax.lax.scan(body, enc.carry, tgt_in)
        if not time_major:
            logits = jnp.swapaxes(logits, 0, 1)
            weights = None if weights is None else jnp.swapaxes(weights, 0, 1)
        return logits, weights
