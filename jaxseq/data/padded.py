"""Padded batches of variable-length examples (classification, tagging, seq2seq).

:class:`PaddedBatcher` turns N examples, given as named fields, into batches
of exactly ``batch_size`` examples. A *sequence* field (by default every field
whose examples are arrays, whatever their lengths) is padded time-major to
``[T, B, ...]`` and comes with ``"<name>_lengths": int32[B]``; a field of
scalars (or one not named in ``sequence_fields``) is stacked batch-major
``[B, ...]``. Examples are bucketed by the length of the first sequence
field, and a batch is padded to its bucket's longest example, so the batches
have at most ``num_buckets`` shapes (one compilation each). The order of an
epoch is a function of ``(seed, epoch)`` only, so ``at_step(step)`` is
resumable.

Shapes: T time (padded length), B batch, N examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from jaxseq import _checks

__all__ = [
    "PaddedBatcher",
    "pad_sequences",
]


def pad_sequences(seqs, pad_value=0, dtype=np.int32, length: int | None = None):
    """Right-pads a list of 1-D sequences into time-major ``[T, B]``; returns ``(padded, lengths)``.

    >>> import jaxseq as js
    >>> padded, lengths = js.data.pad_sequences([[1, 2, 3], [4]], pad_value=-1)
    >>> padded.tolist(), lengths.tolist()
    ([[1, 4], [2, -1], [3, -1]], [3, 1])
    """
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


def _canonical_dtype(dtype):
    """float64 -> float32 and int64 -> int32 (what JAX uses without x64)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.dtype(np.float32)
    if dtype == np.int64:
        return np.dtype(np.int32)
    return dtype


def _collect_fields(fields) -> tuple[dict, int]:
    """``({name: [np.ndarray per example]}, N)``, checking names and counts."""
    if not isinstance(fields, Mapping) or not fields:
        raise TypeError(
            "fields: expected a non-empty mapping name -> sequence of per-example values, "
            f"got {type(fields).__name__}"
        )
    values: dict[str, list] = {}
    n: int | None = None
    for name, vals in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"fields: expected str names, got {name!r}")
        try:
            vals = [np.asarray(v) for v in vals]
        except TypeError:
            raise TypeError(
                f"fields[{name!r}]: expected a sequence of per-example values, got "
                f"{type(vals).__name__}"
            ) from None
        n = len(vals) if n is None else n
        if len(vals) != n:
            raise ValueError(
                f"fields[{name!r}]: expected {n} examples (as the first field), got {len(vals)}"
            )
        values[name] = vals
    if not n:
        raise ValueError("fields: expected at least one example, got 0")
    return values, n


def _sequence_names(values: dict, sequence_fields) -> list[str]:
    """The sequence fields, in the order of ``values``: declared, or every array field."""
    if sequence_fields is None:
        names = []
        for name, vals in values.items():
            ranks = {v.ndim for v in vals}
            if 0 in ranks and len(ranks) > 1:
                i = next(i for i, v in enumerate(vals) if (v.ndim == 0) != (vals[0].ndim == 0))
                raise ValueError(
                    f"fields[{name!r}][{i}]: expected a "
                    f"{'scalar' if vals[0].ndim == 0 else 'sequence'} as example 0, got shape "
                    f"{list(vals[i].shape)} (a field holds scalars or sequences, not both)"
                )
            if 0 not in ranks:
                names.append(name)
        return names
    if isinstance(sequence_fields, str):
        raise TypeError(
            f"sequence_fields: expected a list of field names, got the string {sequence_fields!r}"
        )
    declared = list(sequence_fields)
    for name in declared:
        if name not in values:
            raise ValueError(f"sequence_fields: {name!r} is not a field (fields: {sorted(values)})")
    return [name for name in values if name in declared]


def _check_numeric(name: str, i, dtype) -> None:
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        where = f"[{i}]" if i is not None else ""
        raise TypeError(f"fields[{name!r}]{where}: expected numbers, got dtype {dtype}")


def _prepare_sequences(name: str, vals: list) -> tuple[list, np.ndarray]:
    """``(values in one dtype, lengths int32[N])`` of a sequence field, shapes checked."""
    for i, v in enumerate(vals):
        if v.ndim < 1 or v.shape[1:] != vals[0].shape[1:]:
            raise ValueError(
                f"fields[{name!r}][{i}]: expected a sequence of shape [T"
                f"{''.join(', ' + str(d) for d in vals[0].shape[1:])}] (as example 0), "
                f"got shape {list(v.shape)}"
            )
        _check_numeric(name, i, v.dtype)
    dtype = _canonical_dtype(np.result_type(*[v.dtype for v in vals]))
    lengths = np.array([v.shape[0] for v in vals], np.int32)
    return [v.astype(dtype) for v in vals], lengths


def _prepare_fixed(name: str, vals: list) -> np.ndarray:
    """The values of a fixed-shape field stacked ``[N, ...]``, shapes checked."""
    for i, v in enumerate(vals):
        if v.shape != vals[0].shape:
            raise ValueError(
                f"fields[{name!r}][{i}]: expected shape {list(vals[0].shape)} (as example 0; "
                f"name a field of varying lengths in sequence_fields), got shape {list(v.shape)}"
            )
    stacked = np.stack(vals)
    _check_numeric(name, None, stacked.dtype)
    return stacked.astype(_canonical_dtype(stacked.dtype))


class PaddedBatcher:
    """Batches of exactly ``batch_size`` examples, sequences padded per length bucket.

    Args:
      fields: ``{name: sequence of N per-example values}`` (lists, arrays, anything
        ``np.asarray`` takes per example).
      batch_size: B, the number of examples in every batch.
      num_buckets: examples sorted by the length of the first sequence field are
        split into this many buckets of (nearly) equal counts; every batch of a
        bucket is padded to the bucket's longest example (per sequence field).
      shuffle: shuffle the examples within each bucket and the order of the
        batches, anew each epoch (from ``seed`` and the epoch number).
      seed: the seed of the shuffles.
      pad_value: the value of the padding.
      sequence_fields: the names of the sequence fields. Default: every field
        whose per-example values are arrays (rank >= 1); fields of scalars are
        the others. Name them to stack a fixed-shape array field (say a feature
        vector ``[D]`` per example) batch-major instead.

    The layout depends on the declaration only, never on the lengths the data
    happens to have (equal lengths, all zero, one example: the same layout):

    - a sequence field ``name`` (values ``[T_i, ...]``) is padded with
      ``pad_value`` and batched time-major ``[T, B, ...]``, with
      ``"<name>_lengths": int32[B]``;
    - any other field (values of one shape ``[...]``) is stacked batch-major
      ``[B, ...]``;
    - ``"example_mask": bool[B]``: False for the duplicates that fill a last
      batch. A bucket whose count is not a multiple of ``batch_size`` has its
      last batch filled up with examples of the same bucket drawn a second time,
      so that every batch has B examples; each epoch holds every example exactly
      once where ``example_mask`` is True (weight a metric with it, as
      :func:`jaxseq.training.evaluate` does).

    Integers become int32 and floats float32 (what JAX uses without x64).
    ``len(batcher)`` and ``num_batches`` are the batches per epoch; iterating
    gives the batches of epoch 0 in order (``epoch(e)`` those of epoch ``e``);
    ``position(step) = (epoch, index)``; ``at_step(step)`` the batch of global
    step ``step`` (resumable: the order of an epoch is a function of
    ``(seed, epoch)`` only); ``batch_axes`` the batch axis of each key (for
    :func:`jaxseq.training.shard_batch`).

    >>> import numpy as np, jaxseq as js
    >>> tokens = [np.arange(n) for n in (3, 5, 2, 4, 6, 1)]
    >>> bt = js.data.PaddedBatcher({"tokens": tokens, "label": [0, 1, 0, 1, 1, 0]},
    ...                            batch_size=2, num_buckets=2, seed=0)
    >>> len(bt), bt.bucket_lengths
    (4, [3, 6])
    >>> batch = bt.at_step(0)
    >>> sorted(batch)
    ['example_mask', 'label', 'tokens', 'tokens_lengths']
    >>> batch["tokens"].shape[1], batch["label"].shape, batch["tokens_lengths"].dtype
    (2, (2,), dtype('int32'))
    >>> same = js.data.PaddedBatcher({"tokens": [np.arange(4)] * 3, "label": [0, 1, 1]}, 2,
    ...                              shuffle=False)
    >>> [(b["tokens"].shape, b["example_mask"].tolist()) for b in same]  # [T, B], one duplicate
    [((4, 2), [True, True]), ((4, 2), [True, False])]
    """

    def __init__(
        self,
        fields: Mapping,
        batch_size: int,
        *,
        num_buckets: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pad_value=0,
        sequence_fields=None,
    ):
        self.batch_size = _checks.check_positive_int("batch_size", batch_size)
        num_buckets = _checks.check_positive_int("num_buckets", num_buckets)
        values, n = _collect_fields(fields)
        self.sequence_fields = _sequence_names(values, sequence_fields)
        self._data: dict[str, list | np.ndarray] = {}
        self._lengths: dict[str, np.ndarray] = {}
        for name, vals in values.items():
            if name in self.sequence_fields:
                self._data[name], self._lengths[name] = _prepare_sequences(name, vals)
            else:
                self._data[name] = _prepare_fixed(name, vals)
        for name in self.sequence_fields:
            if f"{name}_lengths" in values:
                raise ValueError(
                    f"fields: {name + '_lengths'!r} clashes with the lengths of {name!r}"
                )
        if "example_mask" in values:
            raise ValueError("fields: 'example_mask' is a key the batcher adds; rename that field")
        if not self.sequence_fields and num_buckets > 1:
            raise ValueError(
                f"num_buckets: {num_buckets} buckets need a sequence field to sort by, got none"
            )
        if num_buckets > n:
            raise ValueError(
                f"num_buckets: expected at most N={n} (one example each), got {num_buckets}"
            )
        self.num_examples = n
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.pad_value = pad_value
        self._make_buckets(num_buckets)
        self.batch_axes = {name: 1 if name in self.sequence_fields else 0 for name in values}
        self.batch_axes.update({f"{name}_lengths": 0 for name in self.sequence_fields})
        self.batch_axes["example_mask"] = 0
        self._plan_cache: tuple[int | None, list | None] = (None, None)

    def _make_buckets(self, num_buckets: int) -> None:
        """Buckets: contiguous runs of the examples sorted by length (ties by index)."""
        if self.sequence_fields:
            order = np.argsort(self._lengths[self.sequence_fields[0]], kind="stable")
        else:
            order = np.arange(self.num_examples)
        self.buckets = [np.sort(b) for b in np.array_split(order, num_buckets)]
        self._max_len = [
            {name: int(self._lengths[name][b].max()) for name in self.sequence_fields}
            for b in self.buckets
        ]
        self._batches_per_bucket = [math.ceil(len(b) / self.batch_size) for b in self.buckets]
        self.num_batches = sum(self._batches_per_bucket)

    def __len__(self) -> int:
        """The number of batches per epoch (``num_batches``)."""
        return self.num_batches

    def __iter__(self):
        """The batches of epoch 0, in order (see :meth:`epoch`)."""
        return self.epoch(0)

    def epoch(self, epoch: int):
        """Iterator over the ``num_batches`` batches of epoch ``epoch``, in order."""
        epoch = int(epoch)
        return (self.batch(epoch, i) for i in range(self.num_batches))

    @property
    def bucket_lengths(self) -> list[int]:
        """The padded length T of each bucket (of the first sequence field)."""
        if not self.sequence_fields:
            return []
        return [m[self.sequence_fields[0]] for m in self._max_len]

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index)`` of global step ``step``."""
        return divmod(int(step), self.num_batches)

    def _plan(self, epoch: int):
        """``[(bucket, example ids [B], first-time mask [B])]`` of one epoch."""
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        b = self.batch_size
        plan = []
        for bi, members in enumerate(self.buckets):
            ids = rng.permutation(members) if self.shuffle else members
            short = -len(ids) % b
            fill = rng.choice(members, short) if self.shuffle else np.resize(members, short)
            mask = np.concatenate([np.ones(len(ids), bool), np.zeros(short, bool)])
            ids = np.concatenate([ids, fill]).astype(np.int64)
            for j in range(0, len(ids), b):
                plan.append((bi, ids[j : j + b], mask[j : j + b]))
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        self._plan_cache = (epoch, plan)
        return plan

    def batch(self, epoch: int, index: int) -> dict:
        """Batch ``index`` (``0 <= index < num_batches``) of epoch ``epoch``."""
        if not 0 <= int(index) < self.num_batches:
            raise IndexError(
                f"index: expected a batch index in [0, {self.num_batches}), got {index!r}"
            )
        bucket, ids, mask = self._plan(int(epoch))[int(index)]
        out = {}
        for name, data in self._data.items():
            if name in self.sequence_fields:
                t = self._max_len[bucket][name]
                seqs = [data[i] for i in ids]
                arr = np.full((t, len(ids)) + seqs[0].shape[1:], self.pad_value, seqs[0].dtype)
                for j, s in enumerate(seqs):
                    arr[: len(s), j] = s
                out[name] = arr
                out[f"{name}_lengths"] = self._lengths[name][ids]
            else:
                out[name] = data[ids]
        out["example_mask"] = mask
        return out

    def at_step(self, step: int) -> dict:
        """The batch that global step ``step`` trains on."""
        return self.batch(*self.position(step))

    def stacked(self, step: int, n: int) -> dict:
        """Batches of steps ``step .. step+n-1`` stacked on a leading axis ``[n, ...]``.

        Only batches of one shape stack: with several buckets of different lengths
        use ``chunks_per_call=1``.
        """
        batches = [self.at_step(step + j) for j in range(n)]
        out = {}
        for name in batches[0]:
            shapes = {x[name].shape for x in batches}
            if len(shapes) > 1:
                raise ValueError(
                    f"n: steps {step}..{step + n - 1} come from buckets of different lengths "
                    f"({name!r} shapes {sorted(shapes)}); stack batches of one bucket only "
                    f"(num_buckets=1, or chunks_per_call=1)"
                )
            out[name] = np.stack([x[name] for x in batches])
        return out
