"""Data for sequence training: character vocabularies, stream batching for
truncated BPTT, padding, and a cached download with a checksum.

Stream batching (as in char-rnn and min-char-rnn): one long token sequence of
length N is cut into B contiguous streams of length L = N // B, stored
time-major ``int[L, B]`` (stream b is ``ids[b*L:(b+1)*L]``). An epoch walks
the streams in chunks of K steps: chunk i has inputs ``streams[iK : iK+K]``
and targets shifted by one; the last chunk, when ``L - 1`` is not a multiple
of K, is padded to K steps and masked, so every chunk has the same shape and
a training step compiles once.

Shapes: L stream length, B streams (batch), K chunk length, V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "Chunk",
    "StreamBatcher",
    "make_streams",
]


def make_streams(ids, num_streams: int, boundaries=None):
    """Cuts ``ids: int[N]`` into ``num_streams`` contiguous streams, time-major ``int[L, B]``.

    ``boundaries: bool[N]`` (optional) marks document starts; it is cut the
    same way. The last ``N % B`` tokens are dropped.

    Returns ``(streams int32[L, B], boundaries bool[L, B] or None)``.

    >>> import numpy as np, jaxseq as js
    >>> streams, _ = js.data.make_streams(np.arange(7), 2)
    >>> streams.tolist()
    [[0, 3], [1, 4], [2, 5]]
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids: expected a rank-1 token sequence [N], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids: expected integer token ids, got dtype {ids.dtype}")
    b = int(num_streams)
    if b <= 0:
        raise ValueError(f"num_streams: expected a positive int, got {num_streams!r}")
    n = ids.shape[0]
    if n < 2 * b:
        raise ValueError(
            f"num_streams: {b} streams need at least {2 * b} tokens (2 per stream), got N={n}"
        )
    length = n // b
    streams = ids[: length * b].reshape(b, length).T.astype(np.int32)
    bnd = None
    if boundaries is not None:
        boundaries = np.asarray(boundaries, dtype=bool)
        if boundaries.shape != ids.shape:
            raise ValueError(
                f"boundaries: expected shape {list(ids.shape)} (the shape of ids), "
                f"got {list(boundaries.shape)}"
            )
        bnd = boundaries[: length * b].reshape(b, length).T.copy()
    return np.ascontiguousarray(streams), bnd


class Chunk(NamedTuple):
    """One TBPTT chunk of token ids, time-major. All fields ``[K, B]``.

    >>> import numpy as np, jaxseq as js
    >>> ch = js.data.StreamBatcher(np.arange(20), 2, 4).chunk(0)
    >>> ch.inputs[:, 0].tolist(), ch.targets[:, 0].tolist(), bool(ch.reset[0].all())
    ([0, 1, 2, 3], [1, 2, 3, 4], True)
    """

    inputs: np.ndarray  # int32[K, B]
    targets: np.ndarray  # int32[K, B]
    mask: np.ndarray  # bool[K, B]: True where the target is real (False in the padded tail)
    reset: np.ndarray  # bool[K, B]: zero the carry before this step (epoch/document start)


class StreamBatcher:
    """Chunks of K steps over B parallel streams for truncated BPTT.

    Args:
      ids: ``int[N]`` the token sequence.
      num_streams: B.
      chunk_len: K.
      boundaries: optional ``bool[N]`` document starts; the carry of a stream
        is reset before a token that starts a document.
      reset_every_chunk: reset every stream's carry at every chunk start
        (training without carrying the state: plain BPTT over K-step windows).
      vocab_size: when given, token ids are checked to be in ``[0, V)``.

    The carry of every stream is reset at the start of each epoch (chunk 0).
    ``chunk(i)`` returns :class:`Chunk`; ``num_chunks`` (``len(batcher)``) per
    epoch, and iterating gives them in order (one epoch); the data
    position of global step ``s`` is ``(epoch, chunk) = divmod(s, num_chunks)``.
    ``batch_axes = 1``: every field is time-major (for :func:`jaxseq.training.shard_batch`).

    >>> import numpy as np, jaxseq as js
    >>> bt = js.data.StreamBatcher(np.arange(33) % 5, num_streams=3, chunk_len=4, vocab_size=5)
    >>> bt.num_chunks, bt.position(7)   # 11 tokens per stream: 10 steps = 4 + 4 + 2
    (3, (2, 1))
    >>> last = bt.chunk(2)
    >>> last.inputs.shape, last.mask[:, 0].tolist()
    ((4, 3), [True, True, False, False])
    >>> bt.stacked(0, 2).inputs.shape
    (2, 4, 3)
    >>> len(bt), [int(c.mask.sum()) for c in bt]   # one epoch, in order
    (3, [12, 12, 6])
    """

    batch_axes = 1

    def __init__(
        self,
        ids,
        num_streams: int,
        chunk_len: int,
        *,
        boundaries=None,
        reset_every_chunk: bool = False,
        vocab_size: int | None = None,
    ):
        ids = np.asarray(ids)
        k = int(chunk_len)
        if isinstance(chunk_len, bool) or k <= 0:
            raise ValueError(f"chunk_len: expected a positive int, got {chunk_len!r}")
        if ids.ndim != 1:
            raise ValueError(
                f"ids: expected a rank-1 token sequence [N], got shape {list(ids.shape)}"
            )
        n = ids.shape[0]
        if k >= n:
            raise ValueError(
                f"chunk_len: K={k} is larger than the data: N={n} tokens give at most "
                f"{n - 1} (input, target) steps"
            )
        if vocab_size is not None and n:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= int(vocab_size):
                raise ValueError(
                    f"ids: token ids must lie in [0, vocab_size={vocab_size}) of the model, got "
                    f"{lo}..{hi} (vocabulary and model sizes do not match)"
                )
        self.streams, self.boundaries = make_streams(ids, num_streams, boundaries)
        length = self.streams.shape[0]
        if length - 1 < k:
            raise ValueError(
                f"num_streams: {num_streams} streams of N={n} tokens are {length} tokens long, "
                f"shorter than one chunk (K={k} steps need {k + 1} tokens); use fewer streams "
                f"or a shorter chunk_len"
            )
        self.chunk_len = k
        self.num_streams = int(num_streams)
        self.reset_every_chunk = bool(reset_every_chunk)
        self.num_chunks = math.ceil((length - 1) / k)

    @property
    def tokens_per_epoch(self) -> int:
        """(input, target) pairs per epoch: ``(L - 1) * B``."""
        return (self.streams.shape[0] - 1) * self.num_streams

    def __len__(self) -> int:
        """The number of chunks per epoch (``num_chunks``)."""
        return self.num_chunks

    def __iter__(self):
        """The chunks of one epoch, in order: ``chunk(0)``, ..., ``chunk(num_chunks - 1)``."""
        return (self.chunk(i) for i in range(self.num_chunks))

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, chunk index)`` of global step ``step``."""
        return divmod(int(step), self.num_chunks)

    def chunk(self, i: int) -> Chunk:
        """Chunk ``i`` (``0 <= i < num_chunks``), padded to K steps and masked."""
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"i: expected a chunk index in [0, {self.num_chunks}), got {i}")
        k, b = self.chunk_len, self.num_streams
        length = self.streams.shape[0]
        start = i * k
        valid = min(k, length - 1 - start)
        inputs = np.zeros((k, b), np.int32)
        targets = np.zeros((k, b), np.int32)
        mask = np.zeros((k, b), bool)
        reset = np.zeros((k, b), bool)
        inputs[:valid] = self.streams[start : start + valid]
        targets[:valid] = self.streams[start + 1 : start + 1 + valid]
        mask[:valid] = True
        if self.boundaries is not None:
            reset[:valid] = self.boundaries[start : start + valid]
        if i == 0 or self.reset_every_chunk:
            reset[0] = True
        return Chunk(inputs, targets, mask, reset)

    def at_step(self, step: int) -> Chunk:
        """The chunk that global step ``step`` trains on."""
        return self.chunk(self.position(step)[1])

    def stacked(self, step: int, n: int) -> Chunk:
        """Chunks of steps ``step .. step+n-1`` stacked on a leading axis: ``[n, K, B]``."""
        chunks = [self.at_step(step + j) for j in range(n)]
        return Chunk(*(np.stack(f) for f in zip(*chunks)))
