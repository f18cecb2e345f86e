"""The contracts the library is built on, written down as ``typing.Protocol`` s.

Three shapes of object carry the whole library (the way optax states
``GradientTransformation``):

* :class:`Cell`: one recurrent step, ``step(params, carry, x) -> (carry, y)``,
  plus ``init``/``initial_carry``/``output_size``. Every built-in cell
  (``js.RNN``, ``js.LSTM``, ``js.GRU``) is one; so is any user object with these
  members, and :func:`jaxseq.rollout` scans it.
* :class:`HoistableCell`: a cell whose step splits into ``project`` (the input
  projection, run for all steps at once) and ``recur`` (the recurrent part):
  :func:`jaxseq.rollout` then hoists the projection out of the time loop.
* :class:`SequenceLayer`: anything that runs over a whole sequence through its
  own ``rollout`` method (``js.Bidirectional``, ``js.Stack``, ``js.MinGRU``, user
  layers). :func:`jaxseq.rollout` checks the inputs once and calls that method
  with them already prepared, so every layer is run the same way.
* :class:`LossFn`: the training contract, ``loss_fn(params, carry, batch, key) ->
  (loss, (carry, metrics))``.
* :class:`LanguageModel`: a next-token model over token ids with an explicit
  carry, ``apply(params, carry, tokens) -> (carry, logits)``: what
  :func:`jaxseq.training.lm_loss_fn`, :func:`jaxseq.training.evaluate_lm` and
  :mod:`jaxseq.decoding` rely on. ``js.RecurrentLM``, ``js.TransformerLM`` and
  ``js.WindowLM`` are three.

Invariants every implementation keeps: functions are pure (no state outside
the arguments); params and carries are pytrees of arrays (NamedTuples for the
built-ins); sequences are time-major ``[T, *B, ...]`` (``T`` time, ``B`` any
number of batch dims, ``D`` input size, ``H`` output/hidden size); the order is
always ``(params, carry, x) -> (carry, y)``, the order ``jax.lax.scan`` uses.

The protocols are ``runtime_checkable``: ``isinstance`` checks that the members
exist (not their signatures).

>>> import jaxseq as js
>>> isinstance(js.LSTM(4), Cell), isinstance(js.LSTM(4), HoistableCell)
(True, True)
>>> isinstance(js.Stack([js.GRU(4)]), SequenceLayer), isinstance(js.GRU(4), SequenceLayer)
(True, False)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Cell",
    "HoistableCell",
    "LanguageModel",
    "LossFn",
    "SequenceLayer",
]

Params = Any  # a pytree of arrays
Carry = Any  # a pytree of arrays, leaves [*B, ...]


@runtime_checkable
class Cell(Protocol):
    """One recurrent step over a parameter pytree: ``x: [*B, D] -> y: [*B, H]``.

    Members:
      init(key, input_size, dtype=float32) -> params: fresh parameters for
        inputs of size ``D``; ``key`` first, as every function whose job is
        randomness.
      initial_carry(batch_shape=(), dtype=float32) -> carry: the zero carry,
        leaves ``[*batch_shape, ...]``; a reset sets the carry back to it.
      step(params, carry, x) -> (carry, y): one step, ``x: [*B, D]``,
        ``y: [*B, H]``; pure, with any number of leading batch dims (none under
        ``jax.vmap``).
      output_size: ``H``, the last dim of ``y``.

    :func:`jaxseq.rollout` runs a cell with ``lax.scan`` (lengths, resets,
    reverse and rematerialisation handled around the step). Optional members
    (see :class:`HoistableCell`) let it hoist the input projection; a fused
    kernel runs only for cell types that registered one
    (:func:`jaxseq.recurrent.dispatch.register_fused_rule`).

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> class Leaky:  # a user cell: h' = 0.5 h + tanh(x W)
    ...     output_size = 3
    ...     def init(self, key, input_size, dtype=jnp.float32):
    ...         return jax.random.normal(key, (input_size, 3), dtype)
    ...     def initial_carry(self, batch_shape=(), dtype=jnp.float32):
    ...         return jnp.zeros((*batch_shape, 3), dtype)
    ...     def step(self, params, carry, x):
    ...         h = 0.5 * carry + jnp.tanh(x @ params)
    ...         return h, h
    >>> isinstance(Leaky(), Cell)
    True
    >>> cell = Leaky()
    >>> carry, ys = js.rollout(cell, cell.init(jax.random.key(0), 2), jnp.ones((5, 4, 2)))
    >>> carry.shape, ys.shape
    ((4, 3), (5, 4, 3))
    """

    @property
    def output_size(self) -> int: ...

    def init(self, key, input_size: int, dtype=...) -> Params: ...

    def initial_carry(self, batch_shape=(), dtype=...) -> Carry: ...

    def step(self, params: Params, carry: Carry, x) -> tuple[Carry, Any]: ...


@runtime_checkable
class HoistableCell(Cell, Protocol):
    """A :class:`Cell` whose step is ``recur(params, carry, project(params, x))``.

    Members (beyond :class:`Cell`'s):
      project(params, xs) -> xp: the input projection on any leading shape,
        ``[..., D] -> [..., P]`` (for the built-ins ``P = G*H``, G gates); a
        rollout calls it once on ``xs: [T, *B, D]`` (one big matmul).
      recur(params, carry, xp_t) -> (carry, y): the rest of the step,
        ``xp_t: [*B, P]``.

    >>> import jaxseq as js
    >>> isinstance(js.GRU(4), HoistableCell)
    True
    """

    def project(self, params: Params, xs) -> Any: ...

    def recur(self, params: Params, carry: Carry, xp) -> tuple[Carry, Any]: ...


@runtime_checkable
class SequenceLayer(Protocol):
    """Anything :func:`jaxseq.rollout` runs over a whole sequence through its own method.

    Members:
      init(key, input_size, dtype=float32) -> params.
      initial_carry(batch_shape=(), dtype=float32) -> carry.
      output_size: ``H``, the last dim of the outputs.
      rollout(params, seq, carry, options, key=None) -> (carry, ys): the layer
        over ``seq.xs: [T, *B, D] -> ys: [T, *B, H]``, time-major. ``seq`` is a
        :class:`jaxseq.recurrent.Sequence` that :func:`jaxseq.rollout` has
        already checked (``xs`` zero at padded steps, the padding mask
        ``seq.valid: bool[T, *B]`` or None, ``seq.lengths``, ``seq.reset:
        bool[T, *B]`` episode starts); ``options`` a
        :class:`jaxseq.recurrent.RolloutOptions` (``reverse``: process from the
        end of each sequence's valid part, outputs in the original time order;
        ``unroll``, ``kernel`` and ``checkpoint_every`` for the cells inside);
        ``carry`` None for zeros; ``key`` the layer's randomness (dropout), None
        for a deterministic run. Outputs are zero at padded steps. A layer runs
        the cells or layers it is made of with :func:`jaxseq.recurrent.run`
        (no second round of checks), and may check what only it knows (its
        params' type) in ``check_params``/``check_input``/``check_carry``, which
        :func:`jaxseq.rollout` calls at the boundary when they exist.
        :func:`jaxseq.rollout` handles ``time_major=False`` itself.

    Cells take the same path through :func:`jaxseq.rollout`'s cell branch, so
    generic code calls ``js.rollout(layer, ...)`` for either.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> layer = js.Bidirectional(js.GRU(3))
    >>> isinstance(layer, SequenceLayer)
    True
    >>> params = layer.init(jax.random.key(0), 2)
    >>> carry, ys = js.rollout(layer, params, jnp.ones((5, 4, 2)))
    >>> ys.shape
    (5, 4, 6)
    """

    @property
    def output_size(self) -> int: ...

    def init(self, key, input_size: int, dtype=...) -> Params: ...

    def initial_carry(self, batch_shape=(), dtype=...) -> Carry: ...

    def rollout(
        self, params: Params, seq, carry: Carry, options, key=None
    ) -> tuple[Carry, Any]: ...


@runtime_checkable
class LossFn(Protocol):
    """The training contract: ``loss_fn(params, carry, batch, key) -> (loss, (carry, metrics))``.

    * ``params``: the model's parameter pytree (what the optimizer updates).
    * ``carry``: the recurrent state entering this batch (``None`` for tasks
      without one); the returned carry is passed to the next chunk of truncated
      BPTT, after ``jax.lax.stop_gradient``.
    * ``batch``: any pytree of arrays (time-major sequences ``[T, *B, ...]``).
    * ``key``: a PRNG key for dropout, or ``None`` for evaluation.
    * ``loss``: a float32 scalar, differentiated with respect to ``params``;
      ``metrics``: a dict of scalars for logging.

    Any function of that signature is one (``isinstance`` only checks that it is
    callable).

    >>> import jax.numpy as jnp
    >>> def loss_fn(params, carry, batch, key):
    ...     loss = jnp.mean((batch["x"] * params) ** 2)
    ...     return loss, (carry, {"loss": loss})
    >>> isinstance(loss_fn, LossFn)
    True
    >>> loss, (carry, metrics) = loss_fn(2.0, None, {"x": jnp.ones(3)}, None)
    >>> float(loss), carry
    (4.0, None)
    """

    def __call__(
        self, params: Params, carry: Carry, batch: Any, key: Any
    ) -> tuple[Any, tuple[Carry, dict]]: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A next-token model over token ids with an explicit carry.

    Members:
      vocab_size: ``V``, the number of token ids (and of logits per step).
      init(key, dtype=float32) -> params: fresh parameters.
      initial_carry(batch_shape=(), dtype=float32) -> carry: the state before any
        token (zeros, an empty cache, no previous ids), leaves ``[*batch_shape, ...]``.
      apply(params, carry, tokens, *, reset=None, lengths=None, key=None)
        -> (carry, logits): ``tokens: int[T, *B]`` ids in ``[0, V)``, time-major;
        ``logits: float32[T, *B, V]``, the scores of the token after each step;
        ``carry=None`` means ``initial_carry``. ``reset: bool[T, *B]`` forgets the
        past before step t (document starts); ``lengths: int[*B]`` right padding:
        padded steps may hold any id and leave the carry as it was after the last
        valid step; ``key`` is the dropout key (``None``: deterministic).
      check_params(params, name="params") -> None: raises ``TypeError`` or
        ``ValueError`` (naming ``name``) unless ``params`` fit the model.

    What relies on it:

    * :func:`jaxseq.training.lm_loss_fn` calls ``apply(params, carry,
      chunk.inputs, reset=..., lengths=..., key=key)`` and threads the carry from
      one chunk of truncated BPTT to the next;
      :func:`jaxseq.training.evaluate_lm` does the same without a key, from
      ``initial_carry((num_streams,))``.
    * :func:`jaxseq.decoding.sample` and :func:`jaxseq.decoding.lm_beam_search`
      read ``vocab_size``, call ``check_params``, start from
      ``initial_carry(batch_shape)`` and feed one token at a time as
      ``apply(params, carry, tokens[None])``, so ``apply`` on ``T = 1`` must
      equal a step of a longer ``apply``. They compile once per model: a model
      is a hashable, immutable settings object (a frozen dataclass).

    Models may take more keyword options (``time_major=False`` on
    ``js.RecurrentLM`` and ``js.WindowLM``), a ``step`` for one position and a
    ``config()`` for :class:`jaxseq.training.Checkpointer`; nothing above relies
    on them. ``isinstance`` checks that the members exist, not their signatures.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> lm = js.models.char_lm(5, num_layers=1, hidden_size=4, embedding_size=3)
    >>> isinstance(lm, LanguageModel), isinstance(js.LSTM(4), LanguageModel)
    (True, False)
    >>> class Bigram:  # a user LM: the logits depend on the current token only
    ...     vocab_size = 5
    ...     def init(self, key, dtype=jnp.float32):
    ...         return jax.random.normal(key, (5, 5), dtype)
    ...     def initial_carry(self, batch_shape=(), dtype=jnp.float32):
    ...         return None
    ...     def apply(self, params, carry, tokens, *, reset=None, lengths=None, key=None):
    ...         return carry, params[tokens].astype(jnp.float32)
    ...     def check_params(self, params, name="params"):
    ...         pass
    >>> model = Bigram()
    >>> isinstance(model, LanguageModel)
    True
    >>> js.decoding.sample(jax.random.key(1), model, model.init(jax.random.key(0)),
    ...                    jnp.array([[1, 2]]), 4).shape
    (4, 2)
    """

    @property
    def vocab_size(self) -> int: ...

    def init(self, key, dtype=...) -> Params: ...

    def initial_carry(self, batch_shape=(), dtype=...) -> Carry: ...

    def apply(
        self, params: Params, carry: Carry, tokens, *, reset=None, lengths=None, key=None
    ) -> tuple[Carry, Any]: ...

    def check_params(self, params: Params, name: str = "params") -> None: ...
