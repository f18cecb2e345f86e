"""Padded batches of variable-length sequences."""

from __future__ import annotations

import numpy as np

__all__ = [
    "pad_sequences",
]


def pad_sequences(seqs, pad_value=0, dtype=np.int32, length: int | None = None):
    """Right-pads a list of 1-D sequences into time-major ``[T, B]``; returns ``(padded, lengths)``."""
    seqs = [np.asarray(s) for s in seqs]
    if not seqs:
        raise ValueError("seqs: expected at least one sequence, got none")
    for i, s in enumerate(seqs):
        if s.ndim != 1:
            raise ValueError(f"seqs[{i}]: expected a rank-1 sequence, got shape {list(s.shape)}")
    lengths = np.array([len(s) for s in seqs], np.int32)
    t = int(lengths.max()) if length is None else int(length)
    if lengths.max() > t:
        raise ValueError(f"length: {t} is shorter than the longest sequence ({lengths.max()})")
    out = np.full((t, len(seqs)), pad_value, dtype)
    for b, s in enumerate(seqs):
        out[: len(s), b] = s
    return out, lengths
