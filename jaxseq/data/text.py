"""Character vocabularies and train/validation splits of a text."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = [
    "CharVocab",
    "split_text",
]


class CharVocab:
    """A character vocabulary: the sorted set of characters of a text.

    ``encode(str) -> int32[N]``, ``decode(ids) -> str``; ``size`` is V.

    >>> import jaxseq as js
    >>> vocab = js.data.CharVocab.from_text("hello")
    >>> vocab.chars, vocab.size, vocab.encode("hell").tolist(), vocab.decode([3, 0])
    ('ehlo', 4, [1, 0, 2, 2], 'oe')
    """

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("chars: expected at least one character, got an empty text")
        self.chars = "".join(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(text)

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(
                f"ids: expected values in [0, {self.size}), got {ids.min()}..{ids.max()}"
            )
        return "".join(self.chars[int(i)] for i in ids)


def split_text(text, fraction: float = 0.9):
    """First ``fraction`` for training, the rest for validation.

    >>> import jaxseq as js
    >>> js.data.split_text("abcdefghij", 0.8)
    ('abcdefgh', 'ij')
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a value in (0, 1), got {fraction!r}")
    n = int(len(text) * fraction)
    return text[:n], text[n:]
