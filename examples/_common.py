"""Shared plumbing of the examples: arguments, output files, a jitted supervised
train step over jaxseq's optimizer factory, and a tqdm-driven loop.

Not part of the library: every example is a script (``python examples/NAME.py``)
that imports this module from its own directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

try:
    import jaxseq as js
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jaxseq as js


def parser(doc: str, *, steps: int, out: str, lr: float = 3e-3, batch: int = 32):
    """An ``argparse`` parser with the flags every example shares."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--batch", type=int, default=batch, help="sequences per step")
    p.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no printed summary")
    return p


def prepare_out(out: str) -> str:
    """Creates ``out`` and removes the metrics log of an earlier run."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        os.remove(path)
    return out


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def pyfloat(x):
    """A JSON-able Python number of a scalar array."""
    return float(np.asarray(x))


def make_step(loss_fn: Callable, optimizer: js.training.Optimizer):
    """A jitted supervised step ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, aux dict)``; metrics hold ``loss``,
    ``grad_norm`` (global norm before clipping) and the entries of ``aux``.
    """

    @jax.jit
    def step(params, opt_state, batch, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = optimizer.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    return step


def train(
    *,
    name: str,
    loss_fn: Callable,
    params,
    batch_fn: Callable[[int], object],
    steps: int,
    args,
    eval_fn: Callable[[object], dict] | None = None,
    log: Callable[[dict], None] | None = None,
):
    """Trains ``params`` for ``steps`` with Adam + clipping; returns ``(params, history)``.

    ``batch_fn(step)`` gives the batch of a step; ``eval_fn(params)`` a dict of
    evaluation metrics, every ``args.eval_every`` steps and at the end. Every step
    is written to ``args.out/metrics.jsonl`` as ``{"run": name, "step", "loss", ...}``;
    ``history`` is the list of evaluation records.
    """
    from tqdm.auto import tqdm

    opt = js.make_optimizer("adam", args.lr, max_norm=args.clip)
    step_fn = make_step(loss_fn, opt)
    opt_state = opt.tx.init(params)
    key = jax.random.key(args.seed + 1)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=name, disable=args.quiet, dynamic_ncols=True, unit="step")
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        for i in range(steps):
            batch = batch_fn(i)
            params, opt_state, m = step_fn(params, opt_state, batch, jax.random.fold_in(key, i))
            rec = {"run": name, "step": i + 1, **{k: pyfloat(v) for k, v in m.items()}}
            rec["train_s"] = round(time.perf_counter() - t0, 3)
            last = i + 1 == steps
            if eval_fn is not None and ((i + 1) % max(args.eval_every, 1) == 0 or last):
                ev = {k: (pyfloat(v) if np.ndim(v) == 0 else v) for k, v in eval_fn(params).items()}
                rec.update(ev)
                history.append({"step": i + 1, "train_s": rec["train_s"], **ev})
            f.write(json.dumps(rec) + "\n")
            if log is not None:
                log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
    bar.close()
    return params, history


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
