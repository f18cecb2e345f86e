"""Sequence taggers (one label per step) and classifiers (one label per sequence)
over padded batches with lengths.

Shapes: T time, B batch (any number of dims), D input features, E embedding size,
H hidden size, V vocabulary size, C classes (or tags). Time-major inputs by
default; ``apply(..., time_major=False)`` takes batch-major ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq.masks import lengths_to_mask
from jaxseq.models._body import (
    check_stack,
    check_tokens,
    describe_layer,
    init_body,
    pool_last,
    recurrent_stack,
    run_body,
    stack_norm,
    time_major_tokens,
    token_ids,
    valid_steps,
)
from jaxseq.nn.dense import DenseParams, dense
from jaxseq.nn.embedding import embed
from jaxseq.recurrent.layers import Stack

__all__ = ["SequenceClassifier", "SequenceParams", "SequenceTagger", "classifier", "tagger"]


class SequenceParams(NamedTuple):
    """Tagger/classifier parameters: ``embedding [V, E]`` (or None), ``stack``, ``head [H, C]``."""

    embedding: jax.Array | None  # [V, E] for token inputs; None for feature inputs
    stack: tuple  # per-layer cell params
    head: DenseParams  # w [H, C], b [C]


@dataclasses.dataclass(frozen=True)
class _SequenceModel:
    """Shared input handling of :class:`SequenceTagger` and :class:`SequenceClassifier`.

    Exactly one input kind: tokens (``vocab_size`` and ``embedding_size``: ``int[T, *B]``
    ids embedded to ``[T, *B, E]``) or features (``input_size``: ``[T, *B, D]``).
    """

    stack: Stack
    num_classes: int
    vocab_size: int | None = None
    embedding_size: int | None = None
    input_size: int | None = None
    dropout_rate: float = 0.0
    unroll: Any = "auto"

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
            _checks.check_positive_int("embedding_size", self.embedding_size)
        else:
            _checks.check_positive_int("input_size", self.input_size)
        _checks.check_rate("dropout_rate", self.dropout_rate)
        check_stack(self.stack, self._rnn_input_size)

    @property
    def _rnn_input_size(self) -> int:
        # __post_init__ checked that the one this reads is set
        return self.embedding_size if self.vocab_size is not None else self.input_size  # type: ignore[return-value]

    def init(self, key, dtype=jnp.float32) -> SequenceParams:
        """Parameters: the embedding (token inputs), the stack's and a head ``[H, C]``."""
        emb, stack, head = init_body(
            key, self.stack, self._rnn_input_size, self.num_classes, self.vocab_size, dtype
        )
        return SequenceParams(emb, stack, head)

    def config(self) -> dict:
        """A JSON-able description (for :class:`jaxseq.training.Checkpointer`'s ``model_config``).

        Layers are described as in :meth:`jaxseq.models.RecurrentLM.config` (user
        cells too).

        >>> cfg = tagger(3, input_size=2, hidden_size=4, cell="gru").config()
        >>> cfg["type"], cfg["layers"][0]["type"], cfg["layers"][0]["forward"]["hidden_size"]
        ('SequenceTagger', 'Bidirectional', 4)
        """
        settings = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "stack" and isinstance(getattr(self, f.name), int | float | str | None)
        }
        layers = [describe_layer(f"stack.layers[{i}]", x) for i, x in enumerate(self.stack.layers)]
        return {
            "type": type(self).__name__,
            **settings,
            "layers": layers,
            "residual": bool(self.stack.residual),
            "stack_dropout": float(self.stack.dropout_rate),
            "stack_variational_dropout": bool(self.stack.variational_dropout),
            **stack_norm(self.stack),
        }

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are :class:`SequenceParams` of this model's sizes."""
        if not isinstance(params, SequenceParams):
            raise TypeError(f"{name}: expected SequenceParams, got {type(params).__name__}")
        if self.vocab_size is not None:
            _checks.check_shape(
                f"{name}.embedding",
                params.embedding,
                (self.vocab_size, self.embedding_size),
                ("V", "E"),
            )
        _checks.check_shape(
            f"{name}.head.w", params.head.w, (self.stack.output_size, self.num_classes), ("H", "C")
        )

    def _inputs(self, params, xs, lengths, time_major=True):
        """Validated inputs ``[T, *B, E or D]``: token ids embedded (padded ids read as 0).

        With ``time_major=False`` ``xs`` is ``int[*B, T]`` or ``[*B, T, D]``, turned
        time-major here.

        Padded steps (``t >= lengths``) may hold anything (token id ``-100``, NaN
        features): :func:`jaxseq.rollout` selects them away before any arithmetic,
        so they reach neither the outputs, the pooled features nor the gradients.
        Token ids at valid steps must be in ``[0, V)``.
        """
        feature_dims = 0 if self.vocab_size is not None else 1
        xs = time_major_tokens("xs", _checks.as_array("xs", xs), time_major, feature_dims)
        if self.vocab_size is not None:
            xs = check_tokens("xs", xs, "[T, *B] token ids")
            batch_shape = tuple(xs.shape[1:])
        else:
            _checks.check_floating("xs", xs)
            _checks.check_min_ndim("xs", xs, 2, "[T, *B, D] features")
            if xs.shape[-1] != self.input_size:
                raise ValueError(
                    f"xs: expected last dim D={self.input_size} (input_size), "
                    f"got {_checks.describe(xs)}"
                )
            batch_shape = tuple(xs.shape[1:-1])
        if lengths is not None:
            lengths = _checks.check_lengths(lengths, batch_shape, xs)
        valid = valid_steps(lengths, xs.shape[0], batch_shape, xs)
        if self.vocab_size is None:  # padded feature steps: js.rollout selects them away
            return xs, lengths
        return embed(params.embedding, token_ids("xs", xs, self.vocab_size, valid)), lengths

    def _run(self, params, xs, lengths, key, time_major=True):
        """-> (per-layer final carries, last-layer outputs ``[T, *B, H]``, lengths)."""
        self.check_params(params)
        x, lengths = self._inputs(params, xs, lengths, time_major)
        carries, h = run_body(
            self.stack,
            params.stack,
            x,
            dropout_rate=self.dropout_rate,
            lengths=lengths,
            unroll=self.unroll,
            key=key,
        )
        return carries, h, lengths


@dataclasses.dataclass(frozen=True)
class SequenceTagger(_SequenceModel):
    """One prediction per time step: inputs -> :class:`jaxseq.Stack` -> dense head.

    With a bidirectional stack (see :func:`tagger`) every step's prediction sees
    the whole sequence. Args as :class:`SequenceClassifier` (``num_classes`` is the
    number of tags).

    >>> tg = tagger(4, vocab_size=10, embedding_size=3, hidden_size=5)
    >>> params = tg.init(jax.random.key(0))
    >>> tg.apply(params, jnp.zeros((6, 2), jnp.int32), lengths=jnp.array([6, 3])).shape
    (6, 2, 4)
    """

    def apply(self, params: SequenceParams, xs, *, lengths=None, key=None, time_major=True):
        """``xs: int[T, *B]`` (tokens) or ``[T, *B, D]`` (features) -> ``float32[T, *B, C]``.

        ``lengths: int[*B]`` right padding: the backward direction starts at each
        sequence's last valid step, and padded steps get the head's bias only
        (mask them in the loss, e.g. ``js.cross_entropy(..., lengths=lengths)``);
        padded steps of ``xs`` may hold anything (``-100`` ids, NaN features).
        ``key``: dropout key (dropout off when None). ``time_major=False``:
        batch-major ``xs: int[*B, T]`` or ``[*B, T, D]`` and outputs ``[*B, T, C]``.

        Token ids at valid steps must be in ``[0, V)``: ``ValueError`` (naming ``xs``,
        the range and the value) for concrete ids; under ``jax.jit`` only
        :func:`jaxseq.checked` raises, plain ``jit`` looks up NaN for an id >= V
        or < -V and counts a negative id from the end.

        >>> tg = tagger(4, input_size=2, hidden_size=3)
        >>> tg.apply(tg.init(jax.random.key(0)), jnp.ones((5, 6, 2)), time_major=False).shape
        (5, 6, 4)
        """
        _, h, _ = self._run(params, xs, lengths, key, time_major)
        if not time_major:
            h = jnp.moveaxis(h, 0, -2)  # [*B, T, H]: the head writes batch-major outputs
        return dense(params.head, h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SequenceClassifier(_SequenceModel):
    """One prediction per sequence: inputs -> :class:`jaxseq.Stack` -> pooling -> dense head.

    Args:
      stack: the recurrent layers: cells and/or :class:`jaxseq.Bidirectional`, built-in
        or any meeting :class:`jaxseq.protocols.Cell` or
        :class:`jaxseq.protocols.SequenceLayer` (each ``output_size`` is checked
        when the model is built).
      num_classes: C, the head's outputs (class logits, or C regression outputs).
      vocab_size, embedding_size: token inputs ``int[T, *B]`` through an embedding ``[V, E]``;
      input_size: or feature inputs ``[T, *B, D]`` (give one of the two kinds).
      dropout_rate: dropout on the inputs and on the pooled features (with a ``key``).
      pool: ``"last"`` the stack's output at each sequence's last valid step (for a
        bidirectional last layer, the forward half there and the backward half at
        step 0, where that direction ends), or ``"mean"`` the mean of its outputs
        over valid steps. Both read the outputs, so any cell works.
      unroll: the ``lax.scan`` unroll passed to :func:`jaxseq.rollout` (default "auto").

    >>> import jaxseq as js
    >>> clf = SequenceClassifier(js.Stack([js.GRU(5)]), 3, input_size=2, pool="mean")
    >>> params = clf.init(jax.random.key(0))
    >>> clf.apply(params, jnp.ones((4, 7, 2)), lengths=jnp.full((7,), 2)).shape  # [T, B, D]
    (7, 3)
    """

    pool: str = "last"

    def __post_init__(self):
        super().__post_init__()
        _checks.check_choice("pool", self.pool, ("last", "mean"))

    def apply(self, params: SequenceParams, xs, *, lengths=None, key=None, time_major=True):
        """``xs: int[T, *B]`` or ``[T, *B, D]`` -> ``float32[*B, C]``; ``lengths: int[*B]``.

        Padded steps (``t >= lengths``) may hold anything (``-100`` ids, NaN or inf
        features): they are selected away before the stack, and both poolings read
        valid steps only, so they reach neither the pooled features nor the
        gradients. Token ids out of range raise as in :meth:`SequenceTagger.apply`
        (under ``jit``: only inside :func:`jaxseq.checked`). ``time_major=False``:
        batch-major ``xs: int[*B, T]`` or ``[*B, T, D]`` (same outputs).

        >>> clf = classifier(2, input_size=3, hidden_size=4)
        >>> clf.apply(clf.init(jax.random.key(0)), jnp.ones((5, 7, 3)), time_major=False).shape
        (5, 2)
        """
        _, h, lengths = self._run(params, xs, lengths, key, time_major)
        if self.pool == "last":
            feat = pool_last(self.stack.layers[-1], h, lengths)
        else:
            if lengths is None:
                feat = jnp.mean(h.astype(jnp.float32), axis=0)
            else:
                valid = lengths_to_mask(lengths, h.shape[0])[..., None]  # [T, *B, 1]
                total = jnp.sum(jnp.where(valid, h.astype(jnp.float32), 0.0), axis=0)
                count = jnp.sum(valid, axis=0, dtype=jnp.float32)
                feat = total / jnp.maximum(count, 1.0)
            feat = feat.astype(h.dtype)
        return dense(params.head, feat).astype(jnp.float32)


def _build(
    model_cls,
    num_outputs,
    *,
    vocab_size,
    embedding_size,
    input_size,
    cell,
    hidden_size,
    num_layers,
    bidirectional,
    dropout_rate,
    cell_kwargs,
    **model_kwargs,
):
    """The one builder behind :func:`tagger` and :func:`classifier`."""
    stack = recurrent_stack(
        cell,
        hidden_size,
        num_layers,
        bidirectional=bidirectional,
        dropout_rate=dropout_rate,
        cell_kwargs=cell_kwargs,
    )
    return model_cls(
        stack,
        num_outputs,
        vocab_size=vocab_size,
        embedding_size=embedding_size if vocab_size else None,
        input_size=input_size,
        dropout_rate=dropout_rate,
        **model_kwargs,
    )


def tagger(
    num_tags: int,
    *,
    vocab_size: int | None = None,
    embedding_size: int = 64,
    input_size: int | None = None,
    cell: str = "lstm",
    hidden_size: int = 128,
    num_layers: int = 1,
    bidirectional: bool = True,
    dropout_rate: float = 0.0,
    **cell_kwargs,
) -> SequenceTagger:
    """A (by default bidirectional) recurrent sequence tagger.

    ``cell`` names a cell of :data:`jaxseq.models.CELLS` ("lstm", "gru", "rnn",
    "rglru", "mlstm", "slstm", ...) or ``"xlstm"`` (:func:`jaxseq.models.xlstm_stack`,
    which takes the ``cell_kwargs``); ``cell_kwargs`` go to every cell (e.g.
    ``activation="relu"``, ``recurrent_init=...`` for an IRNN). Token inputs when
    ``vocab_size`` is given, else feature inputs of size ``input_size``.
    ``dropout_rate`` applies to the inputs, between layers and before the head.

    >>> tg = tagger(5, input_size=3, cell="gru", hidden_size=4, num_layers=2)
    >>> len(tg.stack.layers), tg.stack.output_size
    (2, 8)
    """
    return _build(
        SequenceTagger, num_tags, vocab_size=vocab_size, embedding_size=embedding_size,
        input_size=input_size, cell=cell, hidden_size=hidden_size, num_layers=num_layers,
        bidirectional=bidirectional, dropout_rate=dropout_rate, cell_kwargs=cell_kwargs,
    )  # fmt: skip


def classifier(
    num_classes: int,
    *,
    vocab_size: int | None = None,
    embedding_size: int = 64,
    input_size: int | None = None,
    cell: str = "lstm",
    hidden_size: int = 128,
    num_layers: int = 1,
    bidirectional: bool = False,
    pool: str = "last",
    dropout_rate: float = 0.0,
    **cell_kwargs,
) -> SequenceClassifier:
    """A recurrent sequence classifier (or regressor: train its C outputs with MSE).

    Arguments as :func:`tagger` (forward-only by default); ``pool`` as
    :class:`SequenceClassifier`.

    >>> clf = classifier(2, vocab_size=10, embedding_size=3, hidden_size=4, pool="mean")
    >>> params = clf.init(jax.random.key(0))
    >>> clf.apply(params, jnp.zeros((6, 3), jnp.int32)).shape
    (3, 2)
    """
    return _build(
        SequenceClassifier, num_classes, vocab_size=vocab_size, embedding_size=embedding_size,
        input_size=input_size, cell=cell, hidden_size=hidden_size, num_layers=num_layers,
        bidirectional=bidirectional, dropout_rate=dropout_rate, cell_kwargs=cell_kwargs,
        pool=pool,
    )  # fmt: skip
