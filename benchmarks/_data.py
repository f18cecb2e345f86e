"""Synthetic data the benchmarks share: learnable, deterministic, no download."""

from __future__ import annotations

import numpy as np


def markov_ids(n: int, vocab: int, seed: int) -> np.ndarray:
    """``int32[n]`` token ids of a first-order Markov chain over ``vocab`` symbols.

    Each symbol's successor distribution is a sparse Dirichlet draw, so the
    sequence is learnable (its entropy rate is well below ``ln(vocab)``).

    >>> ids = markov_ids(1000, 30, seed=0)
    >>> ids.shape, int(ids.min()) >= 0, int(ids.max()) < 30
    ((1000,), True, True)
    >>> bool((markov_ids(50, 30, seed=0) == ids[:50]).all())
    True
    """
    rng = np.random.default_rng(seed)
    cum = np.cumsum(rng.dirichlet(np.full(vocab, 0.2), size=vocab), axis=1)
    u = rng.random(n)
    out = np.empty(n, np.int32)
    s = 0
    for i in range(n):
        s = min(int(np.searchsorted(cum[s], u[i], side="right")), vocab - 1)
        out[i] = s
    return out
