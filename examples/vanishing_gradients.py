"""Vanishing and exploding gradients in a ReLU RNN, and what the IRNN and the LSTM do instead.

The course's demonstration: a ReLU RNN ``h_t = relu(x_t W_ih + h_{t-1} W_hh + b)``
whose recurrent weights are drawn from N(0, c/n) carries its hidden state and
its gradient through T products with ``W_hh``. With ``c = 3`` both grow
geometrically with t (exploding); with ``c = 1.5`` the gradient, the influence
of an early step on the loss, shrinks geometrically (vanishing) while the
hidden state stays level, fed by the inputs. The identity-initialised IRNN
(Le et al. 2015) passes the gradient back undiminished (its hidden state sums
the inputs), and the LSTM at initialisation, with forget gates near
sigmoid(1), lets it decay. At initialisation, on the
inputs of the adding problem (T pairs (value, marker)), for each model:

* ``||h_t||`` against t (hidden-state norm, mean over the batch);
* ``||dL/dh_t||`` against t (:func:`jaxseq.training.grad_norm_per_step`), for the
  loss of a linear read-out of the last step: how much step t still matters.

Both are medians over ``--trials`` independent weight draws, plotted on a log
scale. Training these cells on the same task is ``examples/long_memory.py``::

    python examples/vanishing_gradients.py --out out/vanishing
    python examples/vanishing_gradients.py --T 200 --hidden 128 --trials 10

Writes ``summary.json`` (every plotted series and, per model, the factor
between t = 0 and t = T-1 of both norms), ``hidden_norms.png`` and
``grad_norms.png``.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import js, prepare_out, pyplot, write_json  # noqa: E402

MODELS = ("relu_3", "relu_1.5", "irnn", "lstm")
LABELS = {
    "relu_3": "ReLU RNN, W_hh ~ N(0, 3/n)",
    "relu_1.5": "ReLU RNN, W_hh ~ N(0, 1.5/n)",
    "irnn": "IRNN (identity W_hh, zero bias)",
    "lstm": "LSTM",
}


def make_cell(name: str, hidden: int):
    """The cell of model ``name`` (one of :data:`MODELS`)."""
    init = js.initializers
    if name == "relu_3":
        return js.RNN(hidden, activation="relu", recurrent_init=init.scaled_normal(3.0))
    if name == "relu_1.5":
        return js.RNN(hidden, activation="relu", recurrent_init=init.scaled_normal(1.5))
    if name == "irnn":
        return js.RNN(
            hidden, activation="relu", recurrent_init=init.identity(), bias_init=init.zeros()
        )
    if name == "lstm":
        return js.LSTM(hidden)
    raise ValueError(f"name: expected one of {MODELS}, got {name!r}")


def adding_inputs(rng: np.random.Generator, batch: int, t: int):
    """``(xs float32[T, B, 2], targets float32[B, 1])`` of the adding problem."""
    values = rng.uniform(0.0, 1.0, size=(t, batch)).astype(np.float32)
    markers = np.zeros((t, batch), np.float32)
    half = max(t // 2, 1)
    i = rng.integers(0, half, size=batch)
    j = rng.integers(half, t, size=batch) if t > 1 else i
    markers[i, np.arange(batch)] = 1.0
    markers[j, np.arange(batch)] = 1.0
    targets = np.sum(values * markers, axis=0)[:, None]
    return np.stack([values, markers], axis=-1), targets


def norms(cell, key, xs, targets):
    """``(||h_t|| [T], ||dL/dh_t|| [T])`` of a fresh draw of ``cell``'s weights and a read-out."""
    k_cell, k_head = jax.random.split(key)
    params = cell.init(k_cell, xs.shape[-1])
    head = js.nn.Dense(1).init(k_head, cell.hidden_size)
    _, ys = js.rollout(cell, params, xs)
    hidden = jnp.mean(jnp.linalg.norm(ys, axis=-1), axis=1)

    def loss(ys):
        return jnp.mean((js.nn.dense(head, ys[-1]) - targets) ** 2)

    return hidden, js.training.grad_norm_per_step(cell, params, xs, loss)


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--T", type=int, default=100, help="sequence length")
    p.add_argument("--hidden", type=int, default=64, help="hidden units n")
    p.add_argument("--batch", type=int, default=32, help="sequences per draw")
    p.add_argument("--trials", type=int, default=5, help="independent weight draws (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/vanishing_gradients", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no printed summary")
    args = p.parse_args(argv)
    for flag in ("T", "hidden", "batch", "trials"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected a positive int, got {getattr(args, flag)}")
    return args


def _plot(path, series: dict, ylabel: str, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in series.items():
        ax.semilogy(np.arange(len(s)), np.clip(s, 1e-30, None), label=LABELS[name])
    ax.set_xlabel("time step t")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    prepare_out(args.out)
    xs, targets = adding_inputs(np.random.default_rng(args.seed), args.batch, args.T)
    xs, targets = jnp.asarray(xs), jnp.asarray(targets)
    summary = {
        "T": args.T, "hidden": args.hidden, "batch": args.batch, "trials": args.trials,
        "seed": args.seed, "backend": jax.default_backend(), "device_count": jax.device_count(),
        "models": {},
    }  # fmt: skip
    hidden_series, grad_series = {}, {}
    for mi, name in enumerate(MODELS):
        cell = make_cell(name, args.hidden)
        run = jax.jit(lambda key, cell=cell: norms(cell, key, xs, targets))
        draws = [
            run(jax.random.fold_in(jax.random.key(args.seed), 1000 * mi + i))
            for i in range(args.trials)
        ]
        hidden = np.median(np.stack([np.asarray(h) for h, _ in draws]), axis=0)
        grad = np.median(np.stack([np.asarray(g) for _, g in draws]), axis=0)
        hidden_series[name], grad_series[name] = hidden, grad
        summary["models"][name] = {
            "label": LABELS[name],
            "hidden_norm": hidden.tolist(),
            "grad_norm": grad.tolist(),
            # > 1: h grows with t; < 1: it decays
            "hidden_norm_last_over_first": float(hidden[-1] / max(hidden[0], 1e-30)),
            # > 1: the gradient reaching t = 0 is larger than at t = T-1 (exploding)
            "grad_norm_first_over_last": float(grad[0] / max(grad[-1], 1e-30)),
        }
    _plot(
        os.path.join(args.out, "hidden_norms.png"), hidden_series, "||h_t|| (mean over batch)",
        f"hidden-state norm at initialisation, T={args.T}, n={args.hidden}",
    )  # fmt: skip
    _plot(
        os.path.join(args.out, "grad_norms.png"), grad_series, "||dL/dh_t||",
        f"gradient of the last step's loss w.r.t. h_t, T={args.T}, n={args.hidden}",
    )  # fmt: skip
    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        print(f"T={args.T}, n={args.hidden}, median of {args.trials} draws:")
        for r in summary["models"].values():
            print(
                f"  {r['label']:34s} ||h_T-1|| / ||h_0|| = {r['hidden_norm_last_over_first']:9.3g}"
                f"   ||dL/dh_0|| / ||dL/dh_T-1|| = {r['grad_norm_first_over_last']:9.3g}"
            )
    return summary


if __name__ == "__main__":
    main()
