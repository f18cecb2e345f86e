"""The recurrent language model.

:class:`RecurrentLM`: token embedding, a :class:`jaxseq.Stack` of recurrent
layers and a dense head over the vocabulary. It meets
:class:`jaxseq.protocols.LanguageModel`, the contract
:func:`jaxseq.training.lm_loss_fn`, :func:`jaxseq.training.evaluate_lm` and
:mod:`jaxseq.decoding` rely on. Time-major by default::

    model = js.models.char_lm(vocab_size=65, cell="lstm", num_layers=2, hidden_size=256)
    params = model.init(key)                      # LMParams(embedding, stack, head)
    carry = model.initial_carry((B,))             # tuple of per-layer carries
    carry, logits = model.apply(params, carry, tokens)   # int[T, B] -> [T, B, V]
    carry, logits = model.apply(params, carry, tokens_bt, time_major=False)  # [B, T] -> [B, T, V]

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
from jaxseq.models._body import (
    CELLS,
    check_sequence_parallel,
    check_stack,
    check_tokens,
    describe_layer,
    init_body,
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

__all__ = [
    "CELLS",
    "LMParams",
    "RecurrentLM",
    "char_lm",
]


class LMParams(NamedTuple):
    """Language-model parameters: ``embedding [V, E]``, per-layer ``stack`` params, ``head [H, V]``."""

    embedding: jax.Array  # [V, E]
    stack: tuple  # per-layer cell params
    head: DenseParams  # w [H, V], b [V]


@dataclasses.dataclass(frozen=True)
class RecurrentLM:
    """Embedding -> stacked recurrent layers -> dense head over the vocabulary.

    A :class:`jaxseq.protocols.LanguageModel`: it trains, evaluates and samples
    through :func:`jaxseq.training.lm_loss_fn`, :func:`jaxseq.training.evaluate_lm`
    and :func:`jaxseq.decoding.sample`.

    Args:
      vocab_size: V.
      embedding_size: E, the embedding size (input size of the first layer).
      stack: a :class:`jaxseq.Stack` (its ``dropout_rate`` applies between layers)
        of any cells or layers meeting :class:`jaxseq.protocols.Cell` or
        :class:`jaxseq.protocols.SequenceLayer`; each one's ``output_size`` is
        checked when the model is built (``TypeError`` when missing,
        ``ValueError`` when its outputs disagree).
      dropout_rate: dropout on the embeddings and on the last layer's outputs
        (before the head); like the stack's, it is on only when ``apply`` gets a ``key``.
      unroll: the ``lax.scan`` unroll passed to :func:`jaxseq.rollout` (default "auto").
      variational_dropout: share each dropout mask over the time axis (one mask per
        sequence and chunk, as the stack's ``variational_dropout``).
      mesh, sequence_axis: sequence parallelism (both or neither): the stack runs with
        ``T`` split over the mesh axis named ``sequence_axis`` (:func:`jaxseq.rollout`
        with ``mesh``/``sequence_axis``; ``T`` of each call a multiple of that axis's
        size). Only stacks of layers that can split ``T`` (MinGRU, MinLSTM, RG-LRU and
        Stacks/Bidirectionals of them) take it: any other is a ``ValueError`` naming
        ``sequence_axis`` when the model is built. The embedding, head and loss are
        pointwise over ``T`` and need nothing: under ``jit`` with inputs split along
        ``T`` (e.g. ``js.fit(..., mesh=mesh, split="time")``) XLA splits them too. The
        carry stays whole (replicated). Not part of :meth:`config` (a run setting).

    >>> import jaxseq as js
    >>> lm = RecurrentLM(11, 4, js.Stack([js.GRU(8)]))
    >>> params = lm.init(jax.random.key(0))
    >>> carry, logits = lm.apply(params, None, jnp.zeros((5, 2), jnp.int32))  # [T, B]
    >>> logits.shape, carry[0].h.shape
    ((5, 2, 11), (2, 8))
    """

    vocab_size: int
    embedding_size: int
    stack: Stack
    dropout_rate: float = 0.0
    unroll: Any = "auto"
    variational_dropout: bool = False
    mesh: Any = None
    sequence_axis: Any = None

    def __post_init__(self):
        _checks.check_positive_int("vocab_size", self.vocab_size)
        _checks.check_positive_int("embedding_size", self.embedding_size)
        if not isinstance(self.stack, Stack):
            raise TypeError(f"stack: expected js.Stack, got {type(self.stack).__name__}")
        _checks.check_rate("dropout_rate", self.dropout_rate)
        check_stack(self.stack, self.embedding_size)
        check_sequence_parallel(self.stack, self.mesh, self.sequence_axis)

    def init(self, key, dtype=jnp.float32) -> LMParams:
        """Parameters: ``embedding [V, E]`` N(0, 1), the stack's, a LeCun-normal head ``[H, V]``."""
        emb, stack, head = init_body(
            key, self.stack, self.embedding_size, self.vocab_size, self.vocab_size, dtype
        )
        return LMParams(emb, stack, head)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> tuple:
        """Zeros for every layer: a tuple of per-layer carries, each the cell's own
        (``LSTMCarry(c [*B, H], h [*B, H])``, ``MLSTMState(c [*B, K, Dk, Dv], n, m)``, ...)."""
        return self.stack.initial_carry(batch_shape, dtype)

    def config(self) -> dict:
        """A JSON-able description (compared when a checkpoint is restored).

        Each layer is described by its type and its JSON-able settings: its own
        ``config()`` dict when it has one, else its dataclass fields, else its
        public attributes and ``output_size`` (so user cells work too). Settings
        that are not JSON scalars (initializer functions, arrays) are left out:
        give a cell a ``config() -> dict`` method to record them.

        >>> layer = char_lm(5, num_layers=1, hidden_size=4, cell="gru").config()["layers"][0]
        >>> layer["type"], layer["hidden_size"]
        ('GRU', 4)
        """
        layers = [
            describe_layer(f"stack.layers[{i}]", lay) for i, lay in enumerate(self.stack.layers)
        ]
        return {
            "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size,
            "layers": layers,
            "residual": bool(self.stack.residual),
            "stack_dropout": float(self.stack.dropout_rate),
            "dropout_rate": float(self.dropout_rate),
            "variational_dropout": bool(self.variational_dropout),
            "stack_variational_dropout": bool(self.stack.variational_dropout),
            **stack_norm(self.stack),
        }

    def check_tokens(self, tokens, name: str = "tokens"):
        """Validates token ids ``int[T, *B]`` and returns them as an array."""
        return check_tokens(name, tokens)

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are :class:`LMParams` of this model's sizes."""
        if not isinstance(params, LMParams):
            raise TypeError(f"{name}: expected LMParams, got {type(params).__name__}")
        _checks.check_shape(
            f"{name}.embedding",
            params.embedding,
            (self.vocab_size, self.embedding_size),
            ("V", "E"),
        )
        _checks.check_shape(
            f"{name}.head.w", params.head.w, (self.stack.output_size, self.vocab_size), ("H", "V")
        )

    def apply(
        self,
        params: LMParams,
        carry,
        tokens,
        *,
        reset=None,
        lengths=None,
        key=None,
        time_major: bool = True,
    ):
        """Runs the model over ``tokens: int[T, *B]`` (``[*B, T]`` with ``time_major=False``).

        Args:
          params: :class:`LMParams`.
          carry: per-layer carries for batch ``*B`` (``None``: zeros).
          tokens: ``int[T, *B]`` token ids in ``[0, V)``, time-major (with ``lengths``,
            padded steps may hold anything, e.g. ``-100``: they are not looked up).
          reset: optional ``bool[T, *B]``: zero the carry before step t (document starts).
          lengths: optional ``int[*B]``: steps past a sequence's length leave its carry
            unchanged (the returned carry is the one after its last valid step).
          key: dropout key; dropout is off when None (evaluation).
          time_major: False for batch-major ``tokens: int[*B, T]``, ``reset: bool[*B, T]``
            and logits ``[*B, T, V]`` (the carry and ``lengths`` are the same either way).

        Returns:
          ``(carry, logits: float32[T, *B, V])`` (``[*B, T, V]`` with ``time_major=False``).

        Raises:
          ValueError: a token id (at a valid step) outside ``[0, V)``, naming the value
            and its index. Under ``jax.jit`` this check runs only inside
            :func:`jaxseq.checked`; plain ``jit`` does not raise: the embedding lookup
            gives NaN for an id >= V or < -V and counts a negative id from the end.

        >>> lm = char_lm(7, num_layers=1, hidden_size=4, embedding_size=3)
        >>> params = lm.init(jax.random.key(0))
        >>> carry, logits = lm.apply(params, None, jnp.zeros((2, 5), jnp.int32), time_major=False)
        >>> logits.shape   # [B, T, V]
        (2, 5, 7)
        """
        self.check_params(params)
        tokens = self.check_tokens(time_major_tokens("tokens", tokens, time_major))
        reset = time_major_tokens("reset", reset, time_major)
        batch_shape = tuple(tokens.shape[1:])
        valid = valid_steps(lengths, tokens.shape[0], batch_shape, tokens)
        tokens = token_ids("tokens", tokens, self.vocab_size, valid)
        carry, h = run_body(
            self.stack,
            params.stack,
            embed(params.embedding, tokens),
            None if carry is None else tuple(carry),  # None: zeros in the params' dtype
            dropout_rate=self.dropout_rate,
            shared_axes=(0,) if self.variational_dropout else (),  # one mask per chunk
            mask=valid,  # built once, above, from lengths
            reset=reset,
            unroll=self.unroll,
            mesh=self.mesh,
            sequence_axis=self.sequence_axis,
            key=key,
        )
        if not time_major:
            h = jnp.moveaxis(h, 0, -2)  # [*B, T, H]: the head writes batch-major logits
        return carry, dense(params.head, h).astype(jnp.float32)


def char_lm(
    vocab_size: int,
    *,
    cell: str = "lstm",
    num_layers: int = 2,
    hidden_size: int = 256,
    embedding_size: int = 128,
    dropout_rate: float = 0.0,
    layer_dropout_rate: float | None = None,
    variational_dropout: bool = False,
    weight_dropout: float = 0.0,
    unroll: Any = "auto",
    cell_kwargs=None,
    sequence_parallel=None,
) -> RecurrentLM:
    """A character language model (a :class:`RecurrentLM`): ``num_layers`` cells of type ``cell``.

    ``cell`` names a cell of :data:`CELLS` ("lstm", "gru", "rnn", "mingru", "minlstm",
    "rglru", "mlstm", "slstm") or ``"xlstm"``: mLSTM layers with an sLSTM at index 1
    of every eight (:func:`jaxseq.models.xlstm_stack`, ``xLSTM[7:1]``).
    ``dropout_rate`` applies to the embeddings and the head input;
    ``layer_dropout_rate`` (default: ``dropout_rate``) between the recurrent layers;
    ``variational_dropout`` shares every mask over time (one per stream and chunk);
    ``weight_dropout`` drops recurrent weights (DropConnect on every ``w_hh``, one
    mask per chunk: :class:`jaxseq.Stack`; cells "rnn", "lstm", "gru", "slstm");
    ``cell_kwargs`` go to every cell (e.g. ``{"num_heads": 2}`` for "mlstm", "slstm",
    "xlstm"). ``sequence_parallel=(mesh, axis_name)`` runs the stack with ``T`` split
    over that mesh axis (the model's ``mesh`` and ``sequence_axis``; cells "mingru",
    "minlstm", "rglru" only).

    >>> lm = char_lm(65, num_layers=2, hidden_size=16, embedding_size=8)
    >>> [type(c).__name__ for c in lm.stack.layers], lm.stack.output_size
    (['LSTM', 'LSTM'], 16)
    >>> xl = char_lm(65, cell="xlstm", num_layers=2, hidden_size=8, cell_kwargs={"num_heads": 2})
    >>> [type(c).__name__ for c in xl.stack.layers]
    ['MLSTM', 'SLSTM']
    """
    mesh = sequence_axis = None
    if sequence_parallel is not None:
        if not isinstance(sequence_parallel, tuple | list) or len(sequence_parallel) != 2:
            raise TypeError(
                "sequence_parallel: expected (mesh, sequence_axis), a jax.sharding.Mesh and "
                f"one of its axis names, got {sequence_parallel!r}"
            )
        mesh, sequence_axis = sequence_parallel
    ld = dropout_rate if layer_dropout_rate is None else layer_dropout_rate
    stack = recurrent_stack(
        cell,
        hidden_size,
        num_layers,
        dropout_rate=ld,
        variational_dropout=variational_dropout,
        weight_dropout=weight_dropout,
        cell_kwargs=cell_kwargs,
    )
    return RecurrentLM(
        vocab_size,
        embedding_size,
        stack,
        dropout_rate=dropout_rate,
        unroll=unroll,
        variational_dropout=variational_dropout,
        mesh=mesh,
        sequence_axis=sequence_axis,
    )
