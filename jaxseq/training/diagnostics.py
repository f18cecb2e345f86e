"""Diagnostics: how the gradient flows back through time, and training curves.

:func:`grad_norm_per_step` returns ``||dL/dh_t||`` for every step ``t`` of a
rollout: the vanishing/exploding-gradient picture (Bengio et al. 1994,
Pascanu et al. 2013). It adds a zero perturbation ``e_t`` to the hidden state
after each step and differentiates the loss with respect to it, so the
gradient at ``t`` is the *total* derivative: through the output at ``t`` and
through every later step.

Shapes: T time, B batch (any number of batch dims), D input, H hidden.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks

__all__ = [
    "grad_norm_per_step",
    "plot_grad_norms",
    "plot_training_curves",
    "read_jsonl",
]


def grad_norm_per_step(cell, params, xs, loss_fn, carry=None) -> jax.Array:
    """``||dL/dh_t||_2`` for ``t = 0 .. T-1``.

    Args:
      cell: a cell (``js.RNN``/``js.LSTM``/``js.GRU``) whose carry has a field ``h``.
      params: its parameters.
      xs: ``[T, *B, D]`` inputs, time-major.
      loss_fn: ``ys [T, *B, H] -> scalar`` loss of the outputs.
      carry: initial carry (zeros when None).

    Returns:
      ``float32[T]``: the norm over batch and hidden units of ``dL/dh_t``.

    >>> import jax.numpy as jnp, jaxseq as js
    >>> cell = js.RNN(3, activation="relu")
    >>> params = js.recurrent.RNNParams(jnp.zeros((2, 3)), jnp.eye(3), jnp.ones(3))  # h_t = h_{t-1} + 1
    >>> norms = js.training.grad_norm_per_step(cell, params, jnp.zeros((4, 2)), lambda ys: jnp.sum(ys[-1]))
    >>> norms.round(4).tolist()  # the identity passes dL/dh = 1 back unchanged
    [1.7321, 1.7321, 1.7321, 1.7321]
    """
    if not hasattr(xs, "shape"):
        raise TypeError(f"xs: expected an array [T, *B, D], got {type(xs).__name__}")
    _checks.check_floating("xs", xs)
    _checks.check_min_ndim("xs", xs, 2, "[T, *B, D]")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a function ys -> scalar, got {type(loss_fn).__name__}")
    cell.check_params(params)
    cell.check_input(params, xs, name="xs", min_ndim=2)
    batch_shape = tuple(xs.shape[1:-1])
    if carry is None:
        carry = cell.initial_carry(batch_shape, xs.dtype)
    cell.check_carry(carry, batch_shape)
    if "h" not in type(carry)._fields:
        raise TypeError(f"carry: expected a carry with a field 'h', got {type(carry).__name__}")
    xp = cell.project(params, xs)

    def loss_of(eps):
        def body(c, inp):
            xp_t, e_t = inp
            c, _ = cell.recur(params, c, xp_t)
            h = c.h + e_t.astype(c.h.dtype)
            c = c._replace(h=h)
            return c, h

        _, ys = jax.lax.scan(body, carry, (xp, eps))
        loss = loss_fn(ys)
        if jnp.shape(loss) != ():
            raise ValueError(f"loss_fn: expected a scalar loss, got shape {list(jnp.shape(loss))}")
        return loss

    eps = jnp.zeros(xs.shape[:-1] + (cell.hidden_size,), jnp.float32)
    g = jax.grad(loss_of)(eps)
    axes = tuple(range(1, g.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes))


def plot_grad_norms(norms, path, *, labels=None, title="gradient norm per time step"):
    """Writes a log-scale PNG of ``||dL/dh_t||`` against t; ``norms`` is ``[T]`` or a list of them.

    >>> import os, tempfile, numpy as np, jaxseq as js
    >>> path = js.training.plot_grad_norms(np.logspace(-3, 0, 10), os.path.join(tempfile.mkdtemp(), "g.png"))
    >>> os.path.getsize(path) > 1000
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [np.asarray(norms)] if np.ndim(norms[0]) == 0 else [np.asarray(n) for n in norms]
    labels = labels or [None] * len(series)
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, lab in zip(series, labels):
        ax.semilogy(np.arange(len(s)), np.maximum(s, 1e-30), label=lab)
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(title)
    if any(lab is not None for lab in labels):
        ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_jsonl(path) -> list[dict]:
    """Records of a JSON-lines file (a line cut short by a kill is skipped).

    >>> import os, tempfile, jaxseq as js
    >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
    >>> _ = open(path, "w").write('{"step": 1, "loss": 2.0}\\n{"step": 2, "lo')
    >>> js.training.read_jsonl(path)
    [{'step': 1, 'loss': 2.0}]
    """
    out: list[dict] = []
    if path is None or not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_training_curves(metrics_path, path, *, eval_path=None, runs=None, title=None):
    """PNG of training loss (and validation loss when ``eval_path`` has ``val_loss``).

    ``runs``: optional ``{label: (metrics_path, eval_path)}`` to overlay several
    runs against training time (then ``metrics_path`` may be None).

    >>> import os, tempfile, jaxseq as js
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "m.jsonl"), "w").write('{"step": 1, "loss": 2.0}\\n{"step": 2, "loss": 1.5}\\n')
    >>> path = js.training.plot_training_curves(os.path.join(d, "m.jsonl"), os.path.join(d, "c.png"))
    >>> os.path.getsize(path) > 1000
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = dict(runs or {})
    if metrics_path is not None:
        runs = {"": (metrics_path, eval_path), **runs}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, (mp, ep) in runs.items():
        recs = read_jsonl(mp)
        if recs:
            steps = np.array([r["step"] for r in recs])
            loss = np.array([r["loss"] for r in recs], dtype=float)
            w = max(1, len(loss) // 200)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            axes[0].plot(steps[w - 1 :], smooth, label=f"{label} train".strip(), alpha=0.8)
        evals = [r for r in read_jsonl(ep) if "val_loss" in r]
        if evals:
            t = np.array([r.get("train_s", 0.0) for r in evals]) / 60.0
            axes[1].plot(t, [r["val_loss"] for r in evals], "o-", label=f"{label} val".strip())
            if recs:
                axes[0].plot(
                    [r["step"] for r in evals],
                    [r["val_loss"] for r in evals],
                    "o-",
                    label=f"{label} val".strip(),
                )
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (nats/token)")
    axes[1].set_xlabel("training time (min)")
    axes[1].set_ylabel("validation loss (nats/token)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
