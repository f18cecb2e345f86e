"""The fixed-window neural language model of Bengio et al. (2003).

:class:`WindowLM` predicts the next token from the last ``n`` tokens only: their
embeddings are concatenated, go through one tanh hidden layer, and a dense head
gives the logits over the vocabulary::

    x_t = [e(w_{t-n+1}); ...; e(w_t)]             # [n * E]
    h_t = tanh(x_t W_h + b_h)                      # [H]
    logits_t = h_t W_o + b_o                       # [V]: scores of w_{t+1}

Positions before the start of the text (or before a reset) hold a padding token
``V`` with its own learned embedding (row ``V`` of the ``[V + 1, E]`` table).
The carry is the last ``n - 1`` token ids (``int32[*B, n-1]``, ``V`` where there
is none yet), so the model meets :class:`jaxseq.protocols.LanguageModel` and trains, evaluates and samples through
the same functions (:func:`jaxseq.training.lm_loss_fn`,
:func:`jaxseq.training.evaluate_lm`, :func:`jaxseq.decoding.sample`).

Shapes: T time, B batch (any number of batch dims), n context, E embedding size,
H hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.models._body import check_tokens, time_major_tokens, token_ids, valid_steps
from jaxseq.nn.dense import Dense, DenseParams, dense
from jaxseq.nn.dropout import dropout
from jaxseq.nn.embedding import Embedding, embed

__all__ = [
    "WindowLM",
    "WindowLMParams",
    "window_lm",
]


class WindowLMParams(NamedTuple):
    """Window-LM parameters: ``embedding [V + 1, E]`` (row V: no token), ``hidden [n*E, H]``,
    ``head [H, V]``."""

    embedding: jax.Array  # [V + 1, E]
    hidden: DenseParams  # w [n * E, H], b [H]
    head: DenseParams  # w [H, V], b [V]


@dataclasses.dataclass(frozen=True)
class WindowLM:
    """Concatenated embeddings of the last ``context`` tokens -> tanh layer -> logits.

    Args:
      vocab_size: V.
      context: n, the number of tokens each prediction sees (the current one included).
      embedding_size: E.
      hidden_size: H.
      dropout_rate: dropout on the concatenated embeddings and on the hidden layer,
        only when ``apply`` gets a ``key``.

    >>> lm = WindowLM(11, context=3, embedding_size=4, hidden_size=8)
    >>> params = lm.init(jax.random.key(0))
    >>> carry, logits = lm.apply(params, None, jnp.array([[1], [2], [3], [4]]))  # [T, B]
    >>> logits.shape, carry.tolist()   # the carry: the last n - 1 = 2 ids
    ((4, 1, 11), [[3, 4]])
    """

    vocab_size: int
    context: int = 8
    embedding_size: int = 32
    hidden_size: int = 512
    dropout_rate: float = 0.0

    def __post_init__(self):
        _checks.check_positive_int("vocab_size", self.vocab_size)
        _checks.check_positive_int("context", self.context)
        _checks.check_positive_int("embedding_size", self.embedding_size)
        _checks.check_positive_int("hidden_size", self.hidden_size)
        _checks.check_rate("dropout_rate", self.dropout_rate)

    def init(self, key, dtype=jnp.float32) -> WindowLMParams:
        """Parameters: embedding N(0, 1) ``[V + 1, E]``, LeCun-normal hidden and head layers."""
        _checks.check_key("key", key)
        ke, kh, ko = jax.random.split(key, 3)
        e, h = self.embedding_size, self.hidden_size
        return WindowLMParams(
            Embedding(e).init(ke, self.vocab_size + 1, dtype),
            Dense(h).init(kh, self.context * e, dtype),
            Dense(self.vocab_size).init(ko, h, dtype),
        )

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        """``int32[*B, n-1]`` filled with ``V`` (no token yet); ``dtype`` is unused."""
        del dtype
        return jnp.full(tuple(batch_shape) + (self.context - 1,), self.vocab_size, jnp.int32)

    def config(self) -> dict:
        """A JSON-able description (compared when a checkpoint is restored)."""
        return {
            "type": "window",
            "vocab_size": self.vocab_size,
            "context": self.context,
            "embedding_size": self.embedding_size,
            "hidden_size": self.hidden_size,
            "dropout_rate": float(self.dropout_rate),
        }

    def check_tokens(self, tokens, name: str = "tokens"):
        """Validates token ids ``int[T, *B]`` and returns them as an array."""
        return check_tokens(name, tokens)

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are :class:`WindowLMParams` of this model's sizes."""
        if not isinstance(params, WindowLMParams):
            raise TypeError(f"{name}: expected WindowLMParams, got {type(params).__name__}")
        v, e, h = self.vocab_size, self.embedding_size, self.hidden_size
        _checks.check_shape(f"{name}.embedding", params.embedding, (v + 1, e), ("V+1", "E"))
        _checks.check_shape(
            f"{name}.hidden.w", params.hidden.w, (self.context * e, h), ("n*E", "H")
        )
        _checks.check_shape(f"{name}.head.w", params.head.w, (h, v), ("H", "V"))

    def step(self, params: WindowLMParams, carry, tokens, *, key=None):
        """One position: ``tokens: int[*B]`` -> ``(carry, logits float32[*B, V])``.

        >>> lm = window_lm(5, context=3, embedding_size=2, hidden_size=4)
        >>> carry, logits = lm.step(lm.init(jax.random.key(0)), lm.initial_carry((1,)), jnp.array([2]))
        >>> carry.tolist(), logits.shape
        ([[5, 2]], (1, 5))
        """
        tokens = check_tokens("tokens", tokens, "[*B]")
        carry, logits = self.apply(params, carry, tokens[None], key=key)
        return carry, logits[0]

    def apply(
        self,
        params: WindowLMParams,
        carry,
        tokens,
        *,
        reset=None,
        lengths=None,
        key=None,
        time_major: bool = True,
    ):
        """Runs the model over ``tokens: int[T, *B]`` after the ids in ``carry``.

        Args:
          params: :class:`WindowLMParams`.
          carry: ``int[*B, n-1]``, the ids before ``tokens`` (``V``: none; ``None``: all ``V``).
          tokens: ``int[T, *B]`` token ids in ``[0, V)``, time-major (with ``lengths``,
            padded steps may hold anything: they are not looked up).
          reset: optional ``bool[T, *B]``: forget the ids before step t (document starts).
          lengths: optional ``int[*B]``: steps past a sequence's length leave the carry
            unchanged (the returned carry holds the ids up to its last valid step).
          key: dropout key; dropout is off when None (evaluation).
          time_major: False for batch-major ``tokens: int[*B, T]``, ``reset: bool[*B, T]``
            and logits ``[*B, T, V]`` (the carry and ``lengths`` are the same either way).

        Returns:
          ``(carry, logits: float32[T, *B, V])`` (``[*B, T, V]`` with ``time_major=False``).

        Raises:
          ValueError: a token id (at a valid step) outside ``[0, V)`` or a carried id
            outside ``[0, V]``, naming the value and its index (under ``jax.jit`` only
            inside :func:`jaxseq.checked`).
        """
        self.check_params(params)
        tokens = self.check_tokens(time_major_tokens("tokens", tokens, time_major))
        reset = time_major_tokens("reset", reset, time_major)
        t = tokens.shape[0]
        batch = tuple(tokens.shape[1:])
        valid = valid_steps(lengths, t, batch, tokens)
        tokens = token_ids("tokens", tokens, self.vocab_size, valid)
        m = self.context - 1
        if carry is None:
            carry = self.initial_carry(batch)
        carry = _checks.as_array("carry", carry)
        _checks.check_integer("carry", carry)
        _checks.check_shape("carry", carry, batch + (m,))
        if carry.size:
            v = self.vocab_size
            _checks.check_in_range("carry", carry, 0, v, f" (token ids, or V={v} for none)")
        if reset is not None:
            reset = _checks.as_array("reset", reset)
            _checks.check_bool("reset", reset)
            if tuple(reset.shape) != (t, *batch):
                raise ValueError(
                    f"reset: expected shape {[t, *batch]} ([T, *B] of tokens "
                    f"{_checks.describe(tokens)}), got {_checks.describe(reset)}"
                )
        n = math.prod(batch)
        ti = jnp.arange(t, dtype=jnp.int32)
        tok = tokens.reshape(t, n).T.astype(jnp.int32)  # [N, T]
        n_valid = (
            jnp.full((n,), t, jnp.int32)
            if lengths is None
            else jnp.asarray(lengths).reshape(n).astype(jnp.int32)
        )
        ok = ti[None, :] < n_valid[:, None]
        if reset is None:
            last = jnp.full((n, t), -1, jnp.int32)
        else:  # the step of the last reset at or before t (-1: none in this chunk)
            last = jax.lax.cummax(jnp.where(reset.reshape(t, n).T & ok, ti[None, :], -1), axis=1)
        # history: the carried ids (before any reset: -1), then the chunk
        hist = jnp.concatenate([carry.reshape(n, m).astype(jnp.int32), tok], axis=1)  # [N, m+T]
        seg = jnp.concatenate([jnp.full((n, m), -1, jnp.int32), last], axis=1)
        win = ti[:, None] + jnp.arange(self.context, dtype=jnp.int32)[None, :]  # [T, n]
        ids = jnp.take(hist, win, axis=1)  # [N, T, n]
        same = jnp.take(seg, win, axis=1) == last[:, :, None]
        ids = jnp.where(same, ids, self.vocab_size)  # before a reset: no token
        x = embed(params.embedding, ids).reshape(n, t, self.context * self.embedding_size)
        use_dropout = key is not None and self.dropout_rate > 0.0
        if key is not None:
            _checks.check_key("key", key)
        if use_dropout:
            k_in, k_h = jax.random.split(key)
            x = dropout(k_in, x, self.dropout_rate)
        h = jnp.tanh(dense(params.hidden, x))
        if use_dropout:
            h = dropout(k_h, h, self.dropout_rate)
        logits = dense(params.head, h).astype(jnp.float32)  # [N, T, V]
        # the next carry: the n - 1 ids up to the last valid step, as its successor sees them
        start = n_valid[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]  # [N, m]
        idx_last = jnp.maximum(n_valid - 1, 0)[:, None]
        ref = jnp.where(n_valid[:, None] > 0, jnp.take_along_axis(last, idx_last, axis=1), -1)
        nxt = jnp.take_along_axis(hist, start, axis=1)
        nxt = jnp.where(jnp.take_along_axis(seg, start, axis=1) == ref, nxt, self.vocab_size)
        new_carry = nxt.reshape(batch + (m,)).astype(jnp.int32)
        if not time_major:
            return new_carry, logits.reshape((*batch, t, self.vocab_size))
        return new_carry, jnp.moveaxis(logits, 1, 0).reshape((t, *batch, self.vocab_size))


def window_lm(
    vocab_size: int,
    *,
    context: int = 8,
    embedding_size: int = 32,
    hidden_size: int = 512,
    dropout_rate: float = 0.0,
) -> WindowLM:
    """The fixed-window neural LM of Bengio et al. (2003) (see :class:`WindowLM`).

    >>> lm = window_lm(65, context=16, embedding_size=24, hidden_size=256)
    >>> lm.init(jax.random.key(0)).hidden.w.shape   # [n * E, H]
    (384, 256)
    """
    return WindowLM(
        vocab_size,
        context=context,
        embedding_size=embedding_size,
        hidden_size=hidden_size,
        dropout_rate=dropout_rate,
    )
