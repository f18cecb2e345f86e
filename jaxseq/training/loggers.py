"""Where :func:`jaxseq.training.fit` sends its metrics: the :class:`Logger` protocol and
two built-in loggers.

A logger is any object with three methods (see :class:`Logger`):
``log_metrics(step, metrics)`` after every training step, ``log_eval(step, metrics)``
after every evaluation and ``close()`` once when ``fit`` ends (also when it raises or
is preempted). ``fit(..., loggers=[...])`` calls them on process 0 only, with the
metrics already on the host as Python floats, so a logger adds no device transfer.

Built in:

- :class:`JsonlLogger` writes ``metrics.jsonl`` and ``eval.jsonl`` (one JSON object a
  line). ``fit`` always keeps one in ``out_dir`` when it is given (the curves plot is
  drawn from it); the ``loggers`` passed are added to it.
- :class:`TensorBoardLogger` writes TensorBoard scalars with ``tensorboardX`` (or
  ``torch.utils.tensorboard``, or TensorBoard's own event writer).

A tracking service (Weights & Biases, MLflow, ...) needs a class of a few lines
whose methods call the service's own ``log`` function.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "JsonlLogger",
    "Logger",
    "TensorBoardLogger",
]

_METHODS = ("log_metrics", "log_eval", "close")


@runtime_checkable
class Logger(Protocol):
    """What :func:`jaxseq.training.fit` needs of each entry of ``loggers``.

    Members:
      log_metrics(step, metrics): after every training step (``step`` 1-based, as
        ``state.step`` after it), in step order. ``metrics`` maps each scalar of the
        step to a Python float: the loss function's metrics, ``loss``,
        ``grad_norm``, ``lr``, ``finite`` (1.0 or 0.0), ``bad_streak``, then
        ``train_s``, ``steps_per_s`` and ``tokens_per_s`` (when the batch has a
        ``mask``). Non-scalar metrics are left out.
      log_eval(step, metrics): after every evaluation (every ``eval_every``
        steps and at the end), with ``train_s`` and the scalars ``eval_fn``
        returned, as floats.
      close(): once, when ``fit`` ends, whether it returns or raises (an error,
        an interrupt, a preemption). A logger used by several ``fit`` calls
        should reopen what it needs on its next ``log_*`` call.

    An optional ``on_start(step)`` is called first, with the step the run starts
    from (``state.step``: above 0 on a resume), before any ``log_*`` call: a logger
    that keeps files can drop what an earlier run logged after that step, so its
    log matches an uninterrupted run (both built-in loggers do). Steps after it
    are the only ones logged.

    ``fit`` calls loggers on process 0 only (with several processes the others
    never call them, ``close`` included), so a logger should open its files or
    connections on first use, not when it is made. An exception a logger raises
    propagates out of ``fit``, as one from ``on_step`` does.

    >>> import jax, jax.numpy as jnp, numpy as np, jaxseq as js
    >>> class Printer:
    ...     def log_metrics(self, step, metrics):
    ...         if step % 2 == 0:
    ...             print(step, round(metrics["loss"], 3))
    ...     def log_eval(self, step, metrics):
    ...         print("eval", step, metrics["val"])
    ...     def close(self):
    ...         print("closed")
    >>> isinstance(Printer(), js.training.Logger)
    True
    >>> def loss_fn(params, carry, batch, key):
    ...     return jnp.mean((batch * params["w"] - 2 * batch) ** 2), (carry, {})
    >>> opt = js.make_optimizer("sgd", 0.1, max_norm=None)
    >>> state = js.init_state({"w": jnp.zeros(())}, opt, jax.random.key(0))
    >>> step = js.make_train_step(loss_fn, opt)
    >>> _ = js.fit(step, state, lambda s: np.ones(4, np.float32), num_steps=4,
    ...            eval_fn=lambda st: {"val": 1.0}, loggers=[Printer()], progress=False)
    2 2.56
    4 1.049
    eval 4 1.0
    closed
    """

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _check_loggers(loggers) -> list:
    """``loggers`` as a list, each checked to have the three :class:`Logger` methods."""
    if loggers is None:
        return []
    if isinstance(loggers, str | bytes | dict) or not hasattr(loggers, "__iter__"):
        raise TypeError(
            f"loggers: expected a list of loggers (objects with {', '.join(_METHODS)}), got "
            f"{type(loggers).__name__}"
        )
    loggers = list(loggers)
    for i, logger in enumerate(loggers):
        missing = [m for m in _METHODS if not callable(getattr(logger, m, None))]
        if missing:
            raise TypeError(
                f"loggers[{i}]: a {type(logger).__name__} has no method "
                f"{', '.join(missing)}; a logger needs log_metrics(step, metrics), "
                "log_eval(step, metrics) and close() (see jaxseq.training.Logger)"
            )
    return loggers


def _scalars(record: dict) -> dict[str, float]:
    """The scalar entries of a record, as Python floats (bools as 1.0/0.0), ``step`` left out."""
    out = {}
    for k, v in record.items():
        if k == "step":
            continue
        if isinstance(v, numbers.Real | np.bool_):
            out[k] = float(v)
        elif getattr(v, "shape", None) == () and (
            np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.bool_)
        ):
            out[k] = float(v)
    return out


def _filter_jsonl(path, max_step: int) -> None:
    """Keeps the lines of a JSON-lines log whose ``step`` is <= max_step (for resumes)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= max_step:
                keep.append(json.dumps(rec))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


class JsonlLogger:
    """Writes ``metrics.jsonl`` (one line a step) and ``eval.jsonl`` (one line an
    evaluation) in ``out_dir``: ``{"step": step, **metrics}`` per line.

    :func:`jaxseq.training.fit` keeps one in its ``out_dir`` (whatever ``loggers``
    holds) and gives it each step's whole record: flags stay ``true``/``false`` and
    non-scalar metrics stay lists, as they always have in ``metrics.jsonl``. Every
    line is flushed as it is written, so a killed run keeps all its steps. On a
    resume from step ``s`` (:meth:`on_start`), lines after ``s`` are dropped first, so
    the log matches an uninterrupted run. The directory is made on first use.
    :func:`jaxseq.training.read_jsonl` reads the files back.

    >>> import os, tempfile, jaxseq as js
    >>> d = tempfile.mkdtemp()
    >>> log = js.training.JsonlLogger(d)
    >>> for s in (1, 2, 3):
    ...     log.log_metrics(s, {"loss": 1.0 / s})
    >>> log.log_eval(3, {"val_loss": 0.5})
    >>> log.close()
    >>> [r["step"] for r in js.training.read_jsonl(os.path.join(d, "metrics.jsonl"))]
    [1, 2, 3]
    >>> log.on_start(2)  # a run resumed from step 2: step 3 is dropped
    >>> js.training.read_jsonl(os.path.join(d, "metrics.jsonl"))[-1]
    {'step': 2, 'loss': 0.5}
    >>> js.training.read_jsonl(os.path.join(d, "eval.jsonl"))
    []
    """

    def __init__(self, out_dir):
        self.out_dir = os.fspath(out_dir)
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        self.eval_path = os.path.join(self.out_dir, "eval.jsonl")
        self._file = None

    def __repr__(self) -> str:
        return f"JsonlLogger({self.out_dir!r})"

    def on_start(self, step: int) -> None:
        """Makes ``out_dir`` and drops the lines of both files after ``step``."""
        os.makedirs(self.out_dir, exist_ok=True)
        for p in (self.metrics_path, self.eval_path):
            _filter_jsonl(p, step)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self.log_records([{"step": step, **metrics}])

    def log_records(self, records: list[dict]) -> None:
        """Appends whole records (each with its ``step``) to ``metrics.jsonl`` in one write."""
        if self._file is None:
            os.makedirs(self.out_dir, exist_ok=True)
            self._file = open(self.metrics_path, "a")  # noqa: SIM115 - closed by close()
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.eval_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except ValueError:  # closed meanwhile
                pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _writer_class():
    """A ``SummaryWriter``-like class: tensorboardX's, PyTorch's or one over
    TensorBoard's event file writer, the first installed."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ImportError(
            "TensorBoardLogger needs a TensorBoard event writer: pip install tensorboardX "
            "(or torch, or tensorboard)"
        ) from None

    class _EventWriter:
        """The part of ``SummaryWriter`` the logger uses, over TensorBoard's own writer."""

        def __init__(self, log_dir, purge_step=None, filename_suffix=""):
            self._writer = EventFileWriter(log_dir, filename_suffix=filename_suffix)
            if purge_step is not None:  # TensorBoard hides the events at or after it
                start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                self._writer.add_event(
                    event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start)
                )

        def add_scalar(self, tag, value, global_step):
            value = summary_pb2.Summary.Value(tag=tag, simple_value=value)
            summary = summary_pb2.Summary(value=[value])
            event = event_pb2.Event(wall_time=time.time(), step=global_step, summary=summary)
            self._writer.add_event(event)

        def flush(self):
            self._writer.flush()

        def close(self):
            self._writer.close()

    return _EventWriter


class TensorBoardLogger:
    """Writes every metric as a TensorBoard scalar in ``log_dir``: training metrics
    under ``train/<name>``, evaluation metrics under ``eval/<name>``, at their step.

    The writer is ``tensorboardX``'s ``SummaryWriter``; without tensorboardX,
    ``torch.utils.tensorboard``'s, else TensorBoard's own event file writer. When
    none is installed, making the logger raises an ``ImportError`` that says what
    to install (``pip install tensorboardX``). The event file is opened on first
    use (so a logger made on every process writes nothing off process 0) and
    flushed by :meth:`close`; each ``fit`` call writes a new one. On a resume from
    step ``s`` (:meth:`on_start`), TensorBoard is told to hide what an earlier run
    wrote after ``s``. View with ``tensorboard --logdir LOG_DIR``.

    >>> import glob, tempfile, jaxseq as js
    >>> d = tempfile.mkdtemp()
    >>> tb = js.training.TensorBoardLogger(d)
    >>> for s in (1, 2, 3):
    ...     tb.log_metrics(s, {"loss": 1.0 / s})
    >>> tb.log_eval(3, {"val_loss": 0.5})
    >>> tb.close()
    >>> len(glob.glob(d + "/events.out.tfevents.*"))
    1
    """

    def __init__(self, log_dir):
        self.log_dir = os.fspath(log_dir)
        self._writer_class = _writer_class()  # the ImportError comes now, not mid-run
        self._writer = None
        self._purge_step = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"

    def on_start(self, step: int) -> None:
        """Notes the start step: a resumed run hides an earlier run's events after it."""
        self._purge_step = step + 1 if step > 0 else None

    def _get_writer(self):
        if self._writer is None:
            # the writers name a file by the second it is opened in: a suffix that sorts
            # by the nanosecond keeps a second file of the same second apart, and after
            suffix = f".{time.time_ns():020d}.{os.getpid()}"
            self._writer = self._writer_class(
                self.log_dir, purge_step=self._purge_step, filename_suffix=suffix
            )
            self._purge_step = None
        return self._writer

    def _add(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        writer = self._get_writer()
        for name, value in metrics.items():
            writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._add("train", step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._add("eval", step, metrics)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
