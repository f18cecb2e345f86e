"""Token embeddings: a table ``[V, E]`` and its lookup."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "embed",
    "embedding_init",
]


def embedding_init(key, vocab_size: int, embedding_size: int, dtype=jnp.float32):
    """An embedding table ``[V, E]`` drawn from N(0, 1) (``V = vocab_size``, ``E = embedding_size``).

    >>> embedding_init(jax.random.key(0), 10, 4).shape
    (10, 4)
    """
    _checks.check_key("key", key)
    v = _checks.check_positive_int("vocab_size", vocab_size)
    e = _checks.check_positive_int("embedding_size", embedding_size)
    return jax.random.normal(key, (v, e), dtype)


def embed(table, ids):
    """Looks up ``ids: int[...]`` in ``table: [V, E]`` -> ``[..., E]``.

    >>> table = jnp.arange(6.0).reshape(3, 2)
    >>> embed(table, jnp.array([[2], [0]])).tolist()
    [[[4.0, 5.0]], [[0.0, 1.0]]]
    """
    _checks.check_ndim("table", table, 2, "[V, E]")
    ids = _checks.as_array("ids", ids)
    _checks.check_integer("ids", ids)
    return jnp.take(table, ids, axis=0)
