"""Shared plumbing of the examples: command-line flags, input files and output files.

Not part of the library: every example is a script (``python examples/NAME.py``)
that imports this module from its own directory. Training itself is the
library's: ``js.make_optimizer``, ``js.init_state``, ``js.make_train_step`` and
``js.fit``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

try:
    import jaxseq as js
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jaxseq as js

__all__ = [
    "append_evals",
    "environment",
    "is_writer",
    "js",
    "jsonable",
    "parser",
    "prepare_out",
    "pyplot",
    "read_data",
    "start",
    "run_logger",
    "trim_run_logs",
    "write_json",
]


def parser(
    doc: str,
    *,
    steps: int,
    out: str,
    lr: float = 3e-3,
    batch: int = 32,
    eval_every: int = 50,
    batch_help: str = "sequences per step",
):
    """An ``argparse`` parser with the flags every example shares.

    ``--steps --batch --lr --clip --seed --out --eval-every --quiet``; a script
    adds its own flags to the parser it gets.
    """
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--batch", type=int, default=batch, help=batch_help)
    p.add_argument("--lr", type=float, default=lr, help="learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument(
        "--eval-every", type=int, default=eval_every, help="evaluate every N steps (0: at the end)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, no printed summary")
    js.training.add_precision_arg(p)
    js.training.add_distributed_args(p)
    return p


def start(args):
    """Starts JAX's distributed runtime when the flags or the environment ask for it
    (``--coordinator/--num-processes/--process-id`` or ``--distributed``; one process
    otherwise). Call it right after parsing, before anything else touches JAX."""
    js.training.init_from_args(args)
    return args


def is_writer() -> bool:
    """Whether this process writes the outputs: process 0 (the only one, usually)."""
    import jax

    return jax.process_index() == 0


def read_data(path: str | None, what: str) -> str:
    """The text of ``--data PATH``; a ``SystemExit`` naming ``--data`` when it is missing.

    ``what`` says what the file should be, for the message when no path was given.
    """
    if not path:
        raise SystemExit(f"no data: pass --data PATH, {what}")
    if not os.path.exists(path):
        raise SystemExit(f"--data: no such file: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()


LOGS = ("metrics.jsonl", "eval.jsonl")


def prepare_out(out: str) -> str:
    """Creates ``out`` and removes the logs (``metrics.jsonl``, ``eval.jsonl``) of an earlier run
    (process 0 only: it alone writes them)."""
    os.makedirs(out, exist_ok=True)
    if not is_writer():
        return out
    for name in LOGS:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    return out


def run_logger(out: str, run: str):
    """An ``on_step`` callback for ``js.fit`` that appends each step's record to
    ``out/metrics.jsonl`` as ``{"run": run, "step", "loss", ...}``.

    For scripts that train several models side by side into one log.
    """
    path = os.path.join(out, "metrics.jsonl")

    def on_step(step: int, rec: dict) -> None:
        if not is_writer():
            return
        with open(path, "a") as f:
            f.write(json.dumps({"run": run, **rec}) + "\n")

    return on_step


def trim_run_logs(out: str, run: str, step: int) -> None:
    """Drops the lines of run ``run`` past ``step`` from ``out/metrics.jsonl`` and
    ``out/eval.jsonl`` (and any line cut short by a kill); other runs' lines stay.

    For a run resumed from a checkpoint at ``step``: the logs then hold exactly
    what an uninterrupted run would have written up to there.
    """
    for name in LOGS:
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("run") != run or rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def append_evals(out: str, run: str, evals: list[dict]) -> None:
    """Appends ``js.fit``'s evaluation records to ``out/eval.jsonl``, tagged ``"run": run``."""
    if not is_writer():
        return
    with open(os.path.join(out, "eval.jsonl"), "a") as f:
        for rec in evals:
            f.write(json.dumps({"run": run, **rec}) + "\n")


def jsonable(metrics: dict) -> dict:
    """Scalar arrays as Python floats (what ``js.fit``'s ``eval_fn`` returns)."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def environment() -> dict:
    """Where a run ran, for its ``summary.json``: ``backend`` (``"cpu"``, ``"gpu"``,
    ``"tpu"``), ``device_count``, ``process_count``, the JAX version and the CPU model."""
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "cpu": cpu,
        "host_memory": js.host_memory.state()["policy"],
    }


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON (process 0 only)."""
    if not is_writer():
        return
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
