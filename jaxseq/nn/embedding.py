"""Token embeddings: a table ``[V, E]`` and its lookup."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "Embedding",
    "embed",
]


@dataclasses.dataclass(frozen=True)
class Embedding:
    """Token embeddings: a table ``[V, E]`` and its lookup ``int[...] -> [..., E]``.

    Args:
      embedding_size: ``E``.
      stddev: the table is drawn from ``N(0, stddev^2)`` (default 1).

    ``init(key, vocab_size, dtype)`` returns the table ``[V, E]`` (the vocabulary is
    the input size, as ``Dense(O).init(key, D)``); ``apply(table, ids)`` is :func:`embed`.

    >>> layer = Embedding(4)
    >>> table = layer.init(jax.random.key(0), 10)
    >>> table.shape, layer.apply(table, jnp.array([[1, 2, 3]])).shape
    ((10, 4), (1, 3, 4))
    """

    embedding_size: int
    stddev: float = 1.0

    def __post_init__(self):
        _checks.check_positive_int("embedding_size", self.embedding_size)

    def init(self, key, vocab_size: int, dtype=jnp.float32) -> jax.Array:
        """The table ``[V, E]`` for ``V = vocab_size``, drawn from ``N(0, stddev^2)``."""
        _checks.check_key("key", key)
        v = _checks.check_positive_int("vocab_size", vocab_size)
        shape = (v, self.embedding_size)
        if self.stddev == 1.0:
            return jax.random.normal(key, shape, dtype)
        return (self.stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    def apply(self, table, ids):
        """``ids: int[...] -> [..., E]`` (:func:`embed`)."""
        _checks.check_ndim("table", table, 2, "[V, E]")
        _checks.check_shape("table", table, (None, self.embedding_size), ("V", "E"))
        return embed(table, ids)


def embed(table, ids):
    """Looks up ``ids: int[...]`` in ``table: [V, E]`` -> ``[..., E]`` (the pure function
    under :meth:`Embedding.apply`).

    >>> table = jnp.arange(6.0).reshape(3, 2)
    >>> embed(table, jnp.array([[2], [0]])).tolist()
    [[[4.0, 5.0]], [[0.0, 1.0]]]
    """
    _checks.check_ndim("table", table, 2, "[V, E]")
    ids = _checks.as_array("ids", ids)
    _checks.check_integer("ids", ids)
    return jnp.take(table, ids, axis=0)
