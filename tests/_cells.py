"""The library's cell for each kind of :mod:`tests._reference` (kept apart: the reference imports nothing from jaxseq)."""

import jaxseq as js


def make_cell(kind: str, hidden: int):
    """``kind`` in ``tests._reference.KINDS`` -> the jaxseq cell with ``hidden`` units."""
    return {
        "tanh": lambda: js.RNN(hidden),
        "relu": lambda: js.RNN(hidden, activation="relu"),
        "lstm": lambda: js.LSTM(hidden),
        "gru": lambda: js.GRU(hidden),
    }[kind]()
