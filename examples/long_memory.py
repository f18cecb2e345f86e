"""Long-memory tasks from the literature: which recurrent cells can carry
information across T steps?

* **adding** (Hochreiter & Schmidhuber 1997; Le et al. 2015): the input is T
  pairs (value ~ U(0, 1), marker); exactly two markers are 1, one in each half.
  The target is the sum of the two marked values (MSE). Predicting 1 always
  gives MSE 1/6 = 0.167: a model has learned the task once it goes well below.
* **copy** (Arjovsky et al. 2016): 10 symbols from an alphabet of 8, then
  T-1 blanks, a delimiter, and 10 more blanks; the model must output the 10
  symbols after the delimiter (blanks elsewhere). A model without memory
  reaches cross-entropy 10 ln 8 / (T + 20) and 1/8 accuracy on the recalled symbols.
* **mqar**, multi-query associative recall (Zoology, Arora et al. 2023): ``--pairs``
  key-value pairs, then every key again in a random order; at each query the model
  must output the value paired with that key (recall = accuracy at the queries).
  Each model (``--cells`` among lstm, rglru, linattn, mlstm) reads the token and the
  previous token's embedding, then ONE recurrent layer, all of the same state size:
  the matrix memories (mLSTM, linear attention) have ``--heads`` heads of
  ``--head-dim`` keys and values, ``heads * head_dim**2`` numbers; the LSTM gets
  ``H = heads * head_dim**2 / 2`` (its state is ``(c, h)``), the RG-LRU ``H = heads *
  head_dim**2``. ``summary.json``: ``recall``, ``state_size`` and ``hidden_size`` per model::

      python examples/long_memory.py --task mqar --steps 1000 --eval-every 100 --out out/mqar

The same task is trained with a tanh RNN, an IRNN (ReLU RNN with identity
recurrent weights and zero bias, Le et al. 2015), an LSTM, a GRU and, where the
library has them, the parallel linear recurrences minGRU and minLSTM (Feng et
al. 2024), at one or more lengths (``--T 100,200``)::

    python examples/long_memory.py --out out/long_memory
    python examples/long_memory.py --T 100,200 --steps 1500 --eval-every 100 --out out/adding
    python examples/long_memory.py --task copy --T 50 --steps 2000 --out out/copy

Each cell trains with ``js.make_train_step`` and ``js.fit``. Writes into
``--out``: ``metrics.jsonl`` and ``eval.jsonl`` (every step and every
evaluation of every run, ``run`` = ``CELL_T<T>``), ``summary.json``,
``curves.png`` (test loss vs step against the memoryless baseline, one panel
per T) and ``grad_norms.png`` (``||dL/dh_t||`` over t at initialisation and
after training: the vanishing-gradient picture, one row per T).
``summary.json`` holds ``results`` (cell -> T -> test loss, loss over the
baseline, "learned" = below a tenth of it, recall accuracy for copy) and, for
the adding task, ``mse`` (cell -> T -> test MSE) and ``solved`` (cell -> T ->
MSE < 0.01). A run whose loss turns non-finite (``js.fit`` stops it) is recorded
with ``test_loss`` None and the reason under ``diverged``; the others go on.
"""

from __future__ import annotations

import itertools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    append_evals,
    environment,
    js,
    jsonable,
    parser,
    prepare_out,
    pyplot,
    run_logger,
    start,
    write_json,
)

# the parallel linear recurrences join the comparison wherever the library has them
CELLS = ("rnn", "irnn", "lstm", "gru") + tuple(
    c for c in ("mingru", "minlstm") if c in js.models.CELLS
)
SOLVED_MSE = 0.01
COPY_LEN, COPY_ALPHABET = 10, 8  # symbols 1..8; 0 blank; 9 delimiter
BLANK, DELIM = 0, COPY_ALPHABET + 1


def adding_batch(rng: np.random.Generator, batch: int, t: int):
    """``(xs float32[T, B, 2], targets float32[B, 1])``."""
    values = rng.uniform(0.0, 1.0, size=(t, batch)).astype(np.float32)
    markers = np.zeros((t, batch), np.float32)
    half = max(t // 2, 1)
    i = rng.integers(0, half, size=batch)
    j = rng.integers(half, t, size=batch)
    cols = np.arange(batch)
    markers[i, cols] = 1.0
    markers[j, cols] = 1.0
    target = (values[i, cols] + values[j, cols]).reshape(batch, 1)
    return np.stack([values, markers], axis=-1), target


def copy_batch(rng: np.random.Generator, batch: int, t: int):
    """``(inputs int32[T+20, B], targets int32[T+20, B])`` for delay ``T``."""
    n = COPY_LEN
    total = t + 2 * n
    symbols = rng.integers(1, COPY_ALPHABET + 1, size=(n, batch))
    inputs = np.full((total, batch), BLANK, np.int32)
    targets = np.full((total, batch), BLANK, np.int32)
    inputs[:n] = symbols
    inputs[n + t - 1] = DELIM
    targets[-n:] = symbols
    return inputs, targets


def baseline(task: str, t: int) -> float:
    """The loss of the best model without memory."""
    if task == "adding":
        return 1.0 / 6.0
    return COPY_LEN * math.log(COPY_ALPHABET) / (t + 2 * COPY_LEN)


def make_model(task: str, cell: str, hidden_size: int):
    kw = {}
    if cell == "irnn":
        kw = dict(
            activation="relu",
            recurrent_init=js.initializers.identity(),
            bias_init=js.initializers.zeros(),
        )
    base = "rnn" if cell == "irnn" else cell
    if task == "adding":
        return js.models.classifier(1, input_size=2, cell=base, hidden_size=hidden_size, **kw)
    return js.models.tagger(
        COPY_ALPHABET + 2, vocab_size=COPY_ALPHABET + 2, embedding_size=16, cell=base,
        hidden_size=hidden_size, bidirectional=False, **kw,
    )  # fmt: skip


def make_loss(task: str, model):
    """``loss_fn(params, carry, batch, key) -> (loss, (carry, metrics))`` (no carry: None)."""
    if task == "adding":

        def loss_fn(params, carry, batch, key):
            xs, y = batch
            pred = model.apply(params, xs)
            return js.training.mse(pred, y), (carry, {})

    else:

        def loss_fn(params, carry, batch, key):
            xs, y = batch
            logits = model.apply(params, xs)
            recall = logits[-COPY_LEN:]
            acc = js.training.accuracy(recall, y[-COPY_LEN:])
            return js.cross_entropy(logits, y), (carry, {"recall_acc": acc})

    return loss_fn


def grad_norms(task: str, model, params, batch):
    """``||dL/dh_t||`` of the (single) recurrent layer, ``float32[T]``."""
    xs, y = batch
    cell = model.stack.layers[0]
    x = xs if task == "adding" else js.nn.embed(params.embedding, xs)
    if task == "adding":

        def loss_of(ys):
            return js.training.mse(js.nn.dense(params.head, ys[-1]), y)

    else:

        def loss_of(ys):
            return js.cross_entropy(js.nn.dense(params.head, ys).astype(jnp.float32), y)

    return np.asarray(js.training.diagnostics.grad_norm_per_step(cell, params.stack[0], x, loss_of))


def parse_args(argv=None):
    p = parser(__doc__, steps=400, out="out/long_memory", lr=2e-3, batch=64)
    p.add_argument("--task", choices=("adding", "copy", "mqar"), default="adding")
    p.add_argument(
        "--T", default="100",
        help="sequence length (adding) or delay (copy); a comma-separated list runs each",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument(
        "--cells", default=None,
        help=f"comma-separated subset of {CELLS} (mqar: of {MQAR_MODELS}); default all",
    )  # fmt: skip
    p.add_argument("--test-size", type=int, default=512)
    q = p.add_argument_group("mqar")
    q.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence (T = 3N)")
    q.add_argument("--keys", type=int, default=64, help="key tokens to draw the N keys from")
    q.add_argument("--values", type=int, default=64, help="value tokens")
    q.add_argument("--heads", type=int, default=2, help="matrix memory heads (mLSTM, linattn)")
    q.add_argument("--head-dim", type=int, default=16, help="keys and values per head")
    q.add_argument("--embed", type=int, default=32, help="token embedding size")
    args = p.parse_args(argv)
    choices = MQAR_CHOICES if args.task == "mqar" else CELLS
    if args.cells is None:
        args.cells = ",".join(choices)
    args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in args.cells:
        if c not in choices:
            p.error(f"--cells: unknown model {c!r} for --task {args.task}; choose from {choices}")
    if args.task == "mqar" and args.pairs > args.keys:
        p.error(f"--pairs: at most --keys ({args.keys}) distinct keys, got {args.pairs}")
    try:
        args.T = [int(t) for t in str(args.T).split(",") if t.strip()]
    except ValueError:
        p.error(f"--T: expected integers separated by commas, got {args.T!r}")
    if not args.T or min(args.T) < 2:
        p.error(f"--T: expected lengths of at least 2, got {args.T}")
    return args


def train_cell(args, cell, ci, t, test):
    """Trains one cell at length ``t`` through js.fit; returns its record, curve and norms."""
    make_batch = adding_batch if args.task == "adding" else copy_batch
    base = baseline(args.task, t)
    run = f"{cell}_T{t}"
    model = make_model(args.task, cell, args.hidden)
    params = model.init(jax.random.key(args.seed * 100 + ci))
    loss_fn = make_loss(args.task, model)
    eval_loss = jax.jit(lambda p, b: loss_fn(p, None, b, None))

    hist = []  # every evaluation, kept here too in case training diverges

    def eval_fn(st):
        loss, (_, aux) = eval_loss(st.params, test)
        rec = jsonable({"test_loss": loss, **{f"test_{k}": v for k, v in aux.items()}})
        hist.append({"step": int(st.step), **rec})
        return rec

    rng = np.random.default_rng(args.seed * 7919 + ci)
    xs_t, y_t = test  # a 64-sequence slice for the gradient-norm picture
    small = (xs_t[:, :64], y_t[:64] if args.task == "adding" else y_t[:, :64])
    before = grad_norms(args.task, model, params, small)
    batches = (make_batch(rng, args.batch, t) for _ in itertools.count())
    opt = js.make_optimizer("adam", args.lr, max_norm=args.clip)
    state = js.init_state(params, opt, jax.random.key(args.seed + 1))
    try:
        state, info = js.fit(
            js.make_train_step(loss_fn, opt, precision=args.precision), state, batches, num_steps=args.steps,
            eval_fn=eval_fn, eval_every=args.eval_every, on_step=run_logger(args.out, run),
            progress=not args.quiet,
        )  # fmt: skip
    except js.NonFiniteError as e:  # diverged: reported as such, the comparison goes on
        append_evals(args.out, run, hist)
        if not args.quiet:
            print(f"{run}: {e}", file=sys.stderr)
        rec = {"test_loss": None, "diverged": str(e), "learned": False}
        rec["last_finite_eval"] = hist[-1] if hist else None
        if args.task == "adding":
            rec["solved"] = False
        else:
            rec["recall_acc"] = None
        rec["grad_ratio_first_last_at_init"] = float(before[0] / max(before[-1], 1e-30))
        return rec, hist, (before, np.full_like(before, np.nan))
    append_evals(args.out, run, info["evals"])
    hist = info["evals"]
    after = grad_norms(args.task, model, state.params, small)
    final = hist[-1]
    rec = {
        "test_loss": final["test_loss"],
        "loss_vs_baseline": final["test_loss"] / base,
        "learned": bool(final["test_loss"] < 0.1 * base),
        "train_s": round(info["train_s"], 3),
        "grad_ratio_first_last_at_init": float(before[0] / max(before[-1], 1e-30)),
    }
    if args.task == "adding":
        rec["solved"] = bool(final["test_loss"] < SOLVED_MSE)
    if "test_recall_acc" in final:
        rec["recall_acc"] = final["test_recall_acc"]
    return rec, hist, (before, after)


# -- multi-query associative recall ------------------------------------------------------------

MQAR_MODELS = ("lstm", "rglru", "linattn", "mlstm")
# the models of the comparison the library has (the mLSTM once js.models.CELLS names it)
MQAR_CHOICES = tuple(m for m in MQAR_MODELS if m == "linattn" or m in js.models.CELLS)


class PairModel:
    """Token embedding, the previous token's embedding beside it, a recurrent layer, a head.

    The previous token (a causal convolution of width 2 over the embeddings, as
    the short convolution every model of the Zoology study starts with) lets a
    value's position see its key; every model of the comparison gets it alike.
    ``layer`` is a cell or sequence layer; ``linattn`` is linear attention
    (``js.recurrent.linear_attention``, no decay) on q/k/v projections.
    """

    def __init__(self, kind, vocab, embed, layer=None, heads=1, head_dim=16):
        self.kind, self.vocab, self.embed, self.layer = kind, vocab, embed, layer
        self.heads, self.head_dim = heads, head_dim
        self.width = heads * head_dim if kind == "linattn" else layer.output_size

    def init(self, key):
        ke, kl, kh = jax.random.split(key, 3)
        emb = js.nn.Embedding(self.embed).init(ke, self.vocab)
        if self.kind == "linattn":
            core = js.nn.Dense(3 * self.width).init(kl, 2 * self.embed)
        else:
            core = self.layer.init(kl, 2 * self.embed)
        return emb, core, js.nn.Dense(self.vocab).init(kh, self.width)

    def apply(self, params, tokens):
        """``tokens: int[T, B] -> logits float32[T, B, V]``."""
        emb, core, head = params
        e = js.nn.embed(emb, tokens)
        x = jnp.concatenate([e, jnp.concatenate([jnp.zeros_like(e[:1]), e[:-1]])], -1)
        if self.kind == "linattn":
            q, k, v = jnp.split(js.nn.dense(core, x), 3, -1)
            shape = x.shape[:-1] + (self.heads, self.head_dim)
            q, k = (a.reshape(shape) / jnp.sqrt(self.head_dim) for a in (q, k))
            _, h = js.recurrent.linear_attention(q, k, v.reshape(shape))
            h = h.reshape(x.shape[:-1] + (self.width,))
        else:
            _, h = js.rollout(self.layer, core, x)
        return js.nn.dense(head, h).astype(jnp.float32)


def mqar_batch(rng: np.random.Generator, batch: int, pairs: int, keys: int, values: int):
    """``(tokens int32[3N, B], targets int32[3N, B], mask bool[3N, B])``.

    N key-value pairs ``k_1 v_1 ... k_N v_N`` (distinct keys among ``1..keys``,
    values among ``keys+1..keys+values``), then the N keys again in a random
    order: at each query the target is the value its key was paired with."""
    k = np.stack([rng.choice(keys, pairs, replace=False) for _ in range(batch)], 1) + 1
    v = rng.integers(keys + 1, keys + values + 1, size=(pairs, batch))
    order = np.argsort(rng.random((pairs, batch)), axis=0)
    qk = np.take_along_axis(k, order, 0)
    qv = np.take_along_axis(v, order, 0)
    tokens = np.concatenate([np.stack([k, v], 1).reshape(2 * pairs, batch), qk]).astype(np.int32)
    targets = np.zeros_like(tokens)
    targets[2 * pairs :] = qv
    mask = np.zeros(tokens.shape, bool)
    mask[2 * pairs :] = True
    return tokens, targets, mask


def mqar_models(args):
    """``{name: (PairModel, state size per layer)}`` at equal state sizes.

    A matrix memory of ``--heads`` heads of ``--head-dim`` keys and values holds
    ``heads * head_dim**2`` numbers (+ the mLSTM's normaliser and stabiliser); the
    LSTM's state is ``(c, h)``, ``2H``: ``H = heads * head_dim**2 / 2``; the RG-LRU's
    is ``h``: ``H = heads * head_dim**2``."""
    k, d = args.heads, args.head_dim
    state = k * d * d
    vocab = 1 + args.keys + args.values
    out = {}
    for name in args.cells:
        if name == "linattn":
            out[name] = (PairModel(name, vocab, args.embed, heads=k, head_dim=d), state)
        elif name == "mlstm":
            cell = js.recurrent.MLSTM(k * d, num_heads=k)
            out[name] = (PairModel(name, vocab, args.embed, cell), state + k * d + k)
        elif name == "lstm":
            out[name] = (PairModel(name, vocab, args.embed, js.LSTM(state // 2)), state)
        else:
            out[name] = (PairModel(name, vocab, args.embed, js.models.CELLS[name](state)), state)
    return out


def train_mqar(args, name, model, test, seed):
    """Trains one model through js.fit; returns its record and its evaluations."""
    params = model.init(jax.random.key(seed))

    def loss_fn(params, carry, batch, key):
        tokens, targets, mask = batch
        logits = model.apply(params, tokens)
        metrics = {"recall": js.training.accuracy(logits, targets, mask)}
        return js.cross_entropy(logits, targets, mask), (carry, metrics)

    eval_loss = jax.jit(lambda p, b: loss_fn(p, None, b, None))

    def eval_fn(st):
        loss, (_, aux) = eval_loss(st.params, test)
        return jsonable({"test_loss": loss, "test_recall": aux["recall"]})

    rng = np.random.default_rng(seed)
    batches = (
        mqar_batch(rng, args.batch, args.pairs, args.keys, args.values) for _ in itertools.count()
    )
    opt = js.make_optimizer("adam", args.lr, max_norm=args.clip)
    state = js.init_state(params, opt, jax.random.key(seed + 1))
    state, info = js.fit(
        js.make_train_step(loss_fn, opt, precision=args.precision), state, batches,
        num_steps=args.steps, eval_fn=eval_fn, eval_every=args.eval_every,
        on_step=run_logger(args.out, name), progress=not args.quiet,
    )  # fmt: skip
    append_evals(args.out, name, info["evals"])
    final = info["evals"][-1]
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(state.params))
    rec = {"recall": final["test_recall"], "test_loss": final["test_loss"]}
    rec.update(train_s=round(info["train_s"], 3), parameters=n_params)
    return rec, info["evals"]


def main_mqar(args) -> dict:
    """``--task mqar``: each model of ``--cells`` at equal state size; recall on a test set."""
    prepare_out(args.out)
    models = mqar_models(args)
    test = mqar_batch(
        np.random.default_rng(10_000 + args.seed), args.test_size, args.pairs, args.keys,
        args.values,
    )  # fmt: skip
    summary = {
        "task": "mqar", "pairs": args.pairs, "keys": args.keys, "values": args.values,
        "T": 3 * args.pairs, "heads": args.heads, "head_dim": args.head_dim,
        "embed": args.embed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "chance_recall": 1.0 / args.values, **environment(),
        "state_size": {n: s for n, (_, s) in models.items()},
        "hidden_size": {n: m.width for n, (m, _) in models.items()}, "results": {},
    }  # fmt: skip
    curves = {}
    for i, (name, (model, size)) in enumerate(models.items()):
        if not args.quiet:
            print(f"{name}: state {size} numbers per layer, width {model.width}")
        summary["results"][name], curves[name] = train_mqar(
            args, name, model, test, args.seed * 100 + i
        )
    res = summary["results"]
    summary["recall"] = {n: r["recall"] for n, r in res.items()}
    summary["train_s"] = round(sum(r["train_s"] for r in res.values()), 3)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hist in curves.items():
        ax.plot([h["step"] for h in hist], [h["test_recall"] for h in hist], "-o", ms=3,
                label=f"{name} (state {summary['state_size'][name]})")  # fmt: skip
    ax.axhline(1.0 / args.values, color="k", ls="--", lw=1, label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("recall (accuracy at the queries)")
    ax.set_title(f"MQAR, {args.pairs} pairs, {args.keys} keys, {args.values} values")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=100)
    plt.close(fig)
    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        for name, r in res.items():
            print(
                f"  {name:8s} state {summary['state_size'][name]:6d}  recall {r['recall']:.3f}  "
                f"test loss {r['test_loss']:.3f}  {r['train_s']:.0f} s"
            )
    return summary


def main(argv=None) -> dict:
    args = start(parse_args(argv))
    if args.task == "mqar":
        return main_mqar(args)
    prepare_out(args.out)
    summary = {
        "task": args.task, "T": args.T, "cells": args.cells, "hidden": args.hidden,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "baseline_loss": {str(t): baseline(args.task, t) for t in args.T},
        **environment(), "results": {c: {} for c in args.cells},
    }  # fmt: skip
    curves, norms = {}, {}
    for t in args.T:
        make_batch = adding_batch if args.task == "adding" else copy_batch
        test = make_batch(np.random.default_rng(10_000 + args.seed), args.test_size, t)
        for ci, cell in enumerate(args.cells):
            rec, curves[cell, t], norms[cell, t] = train_cell(args, cell, ci, t, test)
            summary["results"][cell][str(t)] = rec
    res = summary["results"]
    summary["train_s"] = round(
        sum(r["train_s"] for c in res.values() for r in c.values() if "train_s" in r), 3
    )  # every run's training seconds together
    if args.task == "adding":
        summary["mse"] = {c: {t: r["test_loss"] for t, r in res[c].items()} for c in res}
        summary["solved"] = {c: {t: r["solved"] for t, r in res[c].items()} for c in res}
        summary["solved_below_mse"] = SOLVED_MSE
    else:
        summary["cross_entropy"] = {c: {t: r["test_loss"] for t, r in res[c].items()} for c in res}
        summary["recall_acc"] = {c: {t: r["recall_acc"] for t, r in res[c].items()} for c in res}

    plt = pyplot()
    nt = len(args.T)
    fig, axes = plt.subplots(1, nt, figsize=(7 * nt, 4.5), squeeze=False)
    for ax, t in zip(axes[0], args.T):
        for cell in args.cells:
            hist = curves[cell, t]
            ax.plot([h["step"] for h in hist], [h["test_loss"] for h in hist], "-o", ms=3,
                    label=cell)  # fmt: skip
        ax.axhline(baseline(args.task, t), color="k", ls="--", lw=1, label="no memory")
        if args.task == "adding":
            ax.axhline(SOLVED_MSE, color="g", ls=":", lw=1, label="solved")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("test MSE" if args.task == "adding" else "test cross-entropy (nats)")
        ax.set_title(f"{args.task} task, T={t}, H={args.hidden}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(nt, 2, figsize=(11, 4 * nt), sharey=True, squeeze=False)
    for row, t in zip(axes, args.T):
        for cell in args.cells:
            before, after = norms[cell, t]
            row[0].plot(np.maximum(before, 1e-30), label=cell)
            row[1].plot(np.maximum(after, 1e-30), label=cell)
        for ax, when in zip(row, ("at initialisation", "after training")):
            ax.set_yscale("log")
            ax.set_xlabel("time step t")
            ax.set_title(f"||dL/dh_t|| {when}, T={t}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        row[0].set_ylabel("gradient norm")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "grad_norms.png"), dpi=100)
    plt.close(fig)

    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        for t in args.T:
            print(f"{args.task}, T={t}: baseline (no memory) loss {baseline(args.task, t):.4f}")
            for cell in args.cells:
                r = res[cell][str(t)]
                if r["test_loss"] is None:
                    print(f"  {cell:7s} diverged (non-finite loss)")
                    continue
                extra = f", recall acc {r['recall_acc']:.3f}" if "recall_acc" in r else ""
                mark = (
                    "solved" if r.get("solved") else ("learned" if r["learned"] else "not learned")
                )
                print(
                    f"  {cell:7s} test loss {r['test_loss']:.4f} "
                    f"({r['loss_vs_baseline']:.3f} x baseline){extra}, {mark}, {r['train_s']:.0f} s"
                )
    return summary


if __name__ == "__main__":
    main()
