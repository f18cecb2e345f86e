"""Language-model loss and evaluation over token streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq.data.streams import StreamBatcher
from jaxseq.training import losses
from jaxseq.training.sharding import _shard_tree, shard_batch

__all__ = [
    "evaluate_lm",
    "lm_loss_fn",
    "make_eval_step",
]


def lm_loss_fn(model, *, use_lengths: bool = True):
    """The loss of a language model on a :class:`jaxseq.data.Chunk`, for :func:`make_train_step`.

    ``loss_fn(params, carry, chunk, key) -> (loss, (new_carry, aux))``: mean
    masked cross-entropy (nats/token) of ``model.apply`` over the chunk from
    ``carry``, with ``chunk.reset`` applied. With ``use_lengths`` the carry
    after a padded (partial) chunk is the one after its last valid step.

    Masked steps (``chunk.mask`` False) may hold any input and target id (e.g.
    ``-100``) without touching the loss or its gradient (with ``use_lengths``,
    which assumes the mask is a prefix of each stream). Ids at valid steps must
    be in ``[0, V)``; inside the jitted train step that is checked only under
    :func:`jaxseq.checked`.

    >>> import jax, numpy as np, jaxseq as js
    >>> model = js.models.char_lm(5, num_layers=1, hidden_size=4, embedding_size=3)
    >>> params = model.init(jax.random.key(0))
    >>> chunk = js.data.StreamBatcher(np.arange(30) % 5, 2, 4).chunk(0)
    >>> loss, (carry, metrics) = js.lm_loss_fn(model)(params, model.initial_carry((2,)), chunk, None)
    >>> loss.shape, metrics
    ((), {})
    """

    def loss_fn(params, carry, chunk, key):
        lengths = None
        if use_lengths:
            lengths = jnp.sum(chunk.mask.astype(jnp.int32), axis=0)
        carry, logits = model.apply(
            params, carry, chunk.inputs, reset=chunk.reset, lengths=lengths, key=key
        )
        loss = losses.cross_entropy(logits, chunk.targets, chunk.mask)
        return loss, (carry, {})

    return loss_fn


def make_eval_step(model):
    """Jitted ``(params, carry, chunk) -> (carry, nats_sum, count)`` for a language model (no dropout).

    ``nats_sum`` is the summed cross-entropy of the valid tokens of the chunk
    ``[K, B]``, ``count`` their number (float32 scalars). Masked steps may hold
    any id (e.g. ``-100``): they never reach the sum.

    >>> import jax, numpy as np, jaxseq as js
    >>> model = js.models.char_lm(5, num_layers=1, hidden_size=4, embedding_size=3)
    >>> params = model.init(jax.random.key(0))
    >>> chunk = js.data.StreamBatcher(np.arange(30) % 5, 2, 4).chunk(0)
    >>> _, nats, count = js.training.make_eval_step(model)(params, model.initial_carry((2,)), chunk)
    >>> float(count)
    8.0
    """

    @jax.jit
    def ev(params, carry, chunk):
        lengths = jnp.sum(chunk.mask.astype(jnp.int32), axis=0)
        carry, logits = model.apply(params, carry, chunk.inputs, reset=chunk.reset, lengths=lengths)
        mask = chunk.mask.astype(jnp.bool_)
        # masked steps are selected away before the log-softmax and the gather
        logits, targets = losses._select_valid(mask, logits, chunk.targets)
        tok = losses.token_cross_entropy(logits, targets)
        return carry, jnp.sum(jnp.where(mask, tok, 0.0)), jnp.sum(mask.astype(jnp.float32))

    return ev


def evaluate_lm(model, params, batcher: StreamBatcher, *, eval_step=None, mesh=None) -> float:
    """Mean nats/token of ``model`` over one pass of ``batcher`` (carry threaded across chunks).

    With ``batcher.reset_every_chunk`` the carry starts from zeros at every chunk.

    >>> import jax, numpy as np, jaxseq as js
    >>> model = js.models.char_lm(5, num_layers=1, hidden_size=4, embedding_size=3)
    >>> params = model.init(jax.random.key(0))
    >>> nats = js.evaluate_lm(model, params, js.data.StreamBatcher(np.arange(30) % 5, 2, 4))
    >>> 0.0 < nats < 3.0
    True
    """
    ev = eval_step or make_eval_step(model)
    carry = model.initial_carry((batcher.num_streams,))
    if mesh is not None:
        carry = _shard_tree(carry, mesh, 0)
    total, count = 0.0, 0.0
    for i in range(batcher.num_chunks):
        chunk = batcher.chunk(i)
        if mesh is not None:
            chunk = shard_batch(chunk, mesh)
        carry, s, c = ev(params, carry, chunk)
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)
