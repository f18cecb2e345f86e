"""Real-valued series batched for truncated BPTT (forecasting, regression).

The layout of :class:`jaxseq.data.StreamBatcher`, for floats: one series of
N steps with F features is cut into B contiguous streams of L = N // B steps,
time-major ``[L, B, F]`` (stream b is ``series[b*L:(b+1)*L]``). An epoch
walks the streams in chunks of K steps; the target of step t is the value
``horizon`` steps ahead, ``series[t + horizon]``, so a stream has
``L - horizon`` (input, target) steps and chunk i covers steps
``iK .. iK+K-1``. The last chunk is padded to K steps and masked, so every
chunk has one shape and a train step compiles once. Every stream's carry is
reset at the epoch start (chunk 0), at document starts (``boundaries``) and,
with ``reset_every_chunk``, at every chunk start. A target that lies past
the next document start is masked (it belongs to another document).

Shapes: N series length, L stream length, B streams, K chunk length, F features.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from jaxseq import _checks

__all__ = [
    "SeriesBatcher",
    "SeriesChunk",
]


class SeriesChunk(NamedTuple):
    """One chunk of a real-valued series, time-major.

    >>> import numpy as np, jaxseq as js
    >>> ch = js.data.SeriesBatcher(np.arange(20.0), 2, 4).chunk(0)
    >>> ch.inputs.shape, ch.targets.shape, ch.mask.shape, ch.reset.shape
    ((4, 2, 1), (4, 2, 1), (4, 2), (4, 2))
    """

    inputs: np.ndarray  # float[K, B, F]: the series at steps t
    targets: np.ndarray  # float[K, B, F]: the series at steps t + horizon
    mask: np.ndarray  # bool[K, B]: True where the target is real (False in padding)
    reset: np.ndarray  # bool[K, B]: zero the carry before this step


class SeriesBatcher:
    """Chunks of K steps over B parallel streams of a real-valued series.

    Args:
      series: ``float[N, F]``, or ``float[N]`` (one feature: F = 1).
      num_streams: B.
      chunk_len: K.
      horizon: how many steps ahead the target lies (>= 1).
      boundaries: optional ``bool[N]`` document starts: the carry of a stream is
        reset before a step that starts a document, and targets past it are masked.
      reset_every_chunk: reset every stream's carry at every chunk start.

    ``chunk(i)`` returns :class:`SeriesChunk`; ``num_chunks`` (``len(batcher)``)
    per epoch, and iterating gives them in order (one epoch);
    ``at_step(step)`` the chunk of global step ``step``, whose data position is
    ``position(step) = (epoch, chunk) = divmod(step, num_chunks)``;
    ``stacked(step, n)`` n consecutive steps' chunks ``[n, K, B, ...]``.
    ``batch_axes = 1``: every field is time-major (for :func:`jaxseq.training.shard_batch`).

    >>> import numpy as np, jaxseq as js
    >>> series = np.sin(np.arange(100) / 5).astype(np.float32)
    >>> bt = js.data.SeriesBatcher(series, num_streams=4, chunk_len=8, horizon=2)
    >>> bt.num_chunks, bt.position(9)   # 25 steps per stream, 23 (input, target) steps
    (3, (3, 0))
    >>> ch = bt.at_step(2)              # the last chunk: 7 valid steps of 8
    >>> ch.inputs.shape, int(ch.mask.sum(0)[0])
    ((8, 4, 1), 7)
    >>> bool(np.allclose(ch.targets[0, 0], series[16 + 2]))  # stream 0, step 16, 2 ahead
    True
    """

    batch_axes = 1

    def __init__(
        self,
        series,
        num_streams: int,
        chunk_len: int,
        *,
        horizon: int = 1,
        boundaries=None,
        reset_every_chunk: bool = False,
    ):
        series = np.asarray(series)
        if not np.issubdtype(series.dtype, np.floating):
            raise TypeError(
                f"series: expected a floating series [N, F] or [N], got dtype {series.dtype}"
            )
        if series.ndim == 1:
            series = series[:, None]
        if series.ndim != 2:
            raise ValueError(
                f"series: expected shape [N, F] or [N], got shape {list(series.shape)}"
            )
        if series.dtype == np.float64:
            series = series.astype(np.float32)
        b = _checks.check_positive_int("num_streams", num_streams)
        k = _checks.check_positive_int("chunk_len", chunk_len)
        h = _checks.check_positive_int("horizon", horizon)
        n = series.shape[0]
        length = n // b
        if length - h < k:
            raise ValueError(
                f"num_streams: {b} streams of N={n} steps are {length} steps long, which gives "
                f"{max(length - h, 0)} (input, target) steps at horizon={h}, fewer than one "
                f"chunk (K={k}); use fewer streams, a shorter chunk_len or a longer series"
            )
        self.streams = np.ascontiguousarray(
            series[: length * b].reshape(b, length, -1).swapaxes(0, 1)
        )
        self.boundaries = None
        if boundaries is not None:
            boundaries = np.asarray(boundaries)
            if boundaries.shape != (n,):
                raise ValueError(
                    f"boundaries: expected shape [{n}] (one flag per step of series), got "
                    f"shape {list(boundaries.shape)}"
                )
            self.boundaries = np.ascontiguousarray(
                boundaries.astype(bool)[: length * b].reshape(b, length).T
            )
        self.num_streams, self.chunk_len, self.horizon = b, k, h
        self.reset_every_chunk = bool(reset_every_chunk)
        self.num_steps_per_stream = length - h
        self.num_chunks = math.ceil((length - h) / k)

    def __len__(self) -> int:
        """The number of chunks per epoch (``num_chunks``)."""
        return self.num_chunks

    def __iter__(self):
        """The chunks of one epoch, in order: ``chunk(0)``, ..., ``chunk(num_chunks - 1)``."""
        return (self.chunk(i) for i in range(self.num_chunks))

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, chunk index)`` of global step ``step``."""
        return divmod(int(step), self.num_chunks)

    def chunk(self, i: int) -> SeriesChunk:
        """Chunk ``i`` (``0 <= i < num_chunks``), padded to K steps and masked."""
        if (
            isinstance(i, bool)
            or not isinstance(i, int | np.integer)
            or not 0 <= i < self.num_chunks
        ):
            raise IndexError(f"i: expected a chunk index in [0, {self.num_chunks}), got {i!r}")
        k, b, h = self.chunk_len, self.num_streams, self.horizon
        f = self.streams.shape[-1]
        start = int(i) * k
        valid = min(k, self.num_steps_per_stream - start)
        inputs = np.zeros((k, b, f), self.streams.dtype)
        targets = np.zeros((k, b, f), self.streams.dtype)
        mask = np.zeros((k, b), bool)
        reset = np.zeros((k, b), bool)
        inputs[:valid] = self.streams[start : start + valid]
        targets[:valid] = self.streams[start + h : start + h + valid]
        mask[:valid] = True
        if self.boundaries is not None:
            bnd = self.boundaries
            reset[:valid] = bnd[start : start + valid]
            # a target past the next document start belongs to another document
            starts = np.cumsum(bnd, axis=0)
            crossed = starts[start + h : start + h + valid] > starts[start : start + valid]
            mask[:valid] &= ~crossed
        if i == 0 or self.reset_every_chunk:
            reset[0] = True
        return SeriesChunk(inputs, targets, mask, reset)

    def at_step(self, step: int) -> SeriesChunk:
        """The chunk that global step ``step`` trains on."""
        return self.chunk(self.position(step)[1])

    def stacked(self, step: int, n: int) -> SeriesChunk:
        """Chunks of steps ``step .. step+n-1`` stacked on a leading axis: ``[n, K, B, ...]``."""
        chunks = [self.at_step(step + j) for j in range(n)]
        return SeriesChunk(*(np.stack(f) for f in zip(*chunks)))
