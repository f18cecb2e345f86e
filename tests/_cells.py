"""The library's cell for each kind of :mod:`tests._reference` (kept apart: the reference imports nothing from jaxseq)."""

import jax
import jax.numpy as jnp

import jaxseq as js


def make_cell(kind: str, hidden: int):
    """``kind`` in ``tests._reference.KINDS`` -> the jaxseq cell with ``hidden`` units."""
    return {
        "tanh": lambda: js.RNN(hidden),
        "relu": lambda: js.RNN(hidden, activation="relu"),
        "lstm": lambda: js.LSTM(hidden),
        "gru": lambda: js.GRU(hidden),
    }[kind]()


class ProtocolCell:
    """The example cell of ``js.protocols.Cell``'s docstring: a plain-array carry,
    ``output_size`` a class attribute, not a dataclass."""

    output_size = 3

    def init(self, key, input_size, dtype=jnp.float32):
        return jax.random.normal(key, (input_size, 3), dtype)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, 3), dtype)

    def step(self, params, carry, x):
        h = 0.5 * carry + jnp.tanh(x @ params)
        return h, h
