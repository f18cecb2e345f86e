"""Character LM end to end: how fast does jaxseq train it next to the same model in PyTorch?

One process, one recipe, the same batches: a 2-layer LSTM character language
model (hidden 256, embedding 128) trained with truncated BPTT over B=32
streams, K=64 steps per chunk, the carry kept (detached) from one chunk to the
next, dropout 0.2 on the embeddings, between the layers and before the head,
AdamW (lr 3e-3, weight decay 0.1 on the matrices and the embedding), global
gradient norm clipped to 1.0.

* ``jaxseq`` -- ``js.models.char_lm`` + ``js.make_optimizer("adamw", ...)`` +
  ``js.training.lm_loss_fn`` + ``js.make_train_step``, fed by
  ``js.data.StreamBatcher`` (as ``examples/char_lm.py`` builds it);
* ``torch`` -- ``nn.Embedding`` + ``nn.LSTM(num_layers=2, dropout=0.2)`` +
  ``nn.Linear`` with ``nn.Dropout`` on the embeddings and before the head,
  ``torch.optim.AdamW`` (decay on the tensors of 2 or more dimensions, as
  jaxseq's), ``clip_grad_norm_``; threads pinned to JAX's thread count.

``--cell gru`` runs the same recipe with GRU layers on both sides (``nn.GRU``;
the weights converted by :func:`jaxseq.interop.stack_to_torch`).

Both start from the same weights (the jaxseq initialisation copied into the
torch modules; the gate order i, f, g, o is the same) and train on the same
chunks, converted to torch tensors. Before training, the loss of chunk 0
without dropout is computed on both sides: it must agree (the same model).
The training steps alternate (one jaxseq step, one torch step), so changes of
load hit both alike. After ``--warmup`` untimed steps (the jaxseq compile is
reported apart), ``--steps`` steps of each are timed; reported: median time
per step, total, tokens per second, the ratio jaxseq/torch of time per 1000
steps (below 1: jaxseq is faster), and the loss of every step (dropout masks
differ, so the curves track each other, they do not coincide).

Host memory: jaxseq's import sets glibc's ``malloc`` to keep XLA's per-call buffers
(``jaxseq.host_memory``), for the whole process; ``JAXSEQ_HOST_MEMORY=system`` in the
environment leaves it alone. The policy is recorded in the environment.

Data: ``--data PATH`` (a text file, e.g. tiny Shakespeare); without it a
deterministic synthetic text (a first-order Markov chain over 30 characters,
fixed seed). Nothing is downloaded.

Usage::

    python -m benchmarks.char_lm_e2e --out results/char_lm_e2e --data PATH/tinyshakespeare.txt
    python -m benchmarks.char_lm_e2e --out results/char_lm_e2e --quick   # tiny shapes

Writes ``char_lm_e2e.json``, ``char_lm_e2e.md`` and ``char_lm_e2e_loss.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._data import markov_ids
from benchmarks._environment import environment, jax_thread_count, module_available, package_version
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import skipped

NAME = "char_lm_e2e"
TORCH_MODULE = "torch"  # tests may point it at a missing name to simulate its absence


def synthetic_text(n: int = 200_000, seed: int = 0) -> str:
    """A deterministic text of ``n`` characters: a first-order Markov chain over 30 characters.

    Each character's successor distribution is a sparse Dirichlet draw, so the
    text is learnable (its entropy rate is well below ln(30)).
    """
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz .,\n"))
    return "".join(alphabet[markov_ids(n, len(alphabet), seed)])


def torch_available() -> bool:
    return module_available(TORCH_MODULE)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/char_lm_e2e")
    ap.add_argument("--data", default=None, help="a text file (default: synthetic text)")
    ap.add_argument("--steps", type=int, default=200, help="timed training steps of each side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="B, parallel streams")
    ap.add_argument("--seq", type=int, default=64, help="K, steps per chunk")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10, help="rows of the loss table")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (H=32, E=16, B=4, K=16)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.embed, args.batch, args.seq = 32, 16, 4, 16
        args.warmup = min(args.warmup, 1)
    for name in ("steps", "layers", "hidden", "embed", "batch", "seq", "log_every"):
        if getattr(args, name) < 1:
            ap.error(
                f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}"
            )
    if args.warmup < 0:
        ap.error(f"--warmup: expected a non-negative int, got {args.warmup}")
    if not 0.0 <= args.dropout < 1.0:
        ap.error(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
    return args


# ----------------------------------------------------------------------------- jaxseq side


def build_jaxseq(args, vocab_size: int, batcher):
    import jax

    import jaxseq as js

    model = js.models.char_lm(
        vocab_size, cell=args.cell, num_layers=args.layers, hidden_size=args.hidden,
        embedding_size=args.embed, dropout_rate=args.dropout,
    )  # fmt: skip
    opt = js.make_optimizer("adamw", args.lr, max_norm=args.clip, weight_decay=args.weight_decay)
    k_init, k_train = jax.random.split(jax.random.key(args.seed))
    params = model.init(k_init)
    state = js.init_state(params, opt, k_train, model.initial_carry((args.batch,)))
    step_fn = js.make_train_step(js.training.lm_loss_fn(model), opt)
    eval_step = js.training.make_eval_step(model)
    return model, params, state, step_fn, eval_step


# ----------------------------------------------------------------------------- torch side


def build_torch(args, vocab_size: int, params):
    """The same model in PyTorch, initialised with jaxseq's ``params``."""
    import torch
    from torch import nn

    import jaxseq as js

    torch.manual_seed(args.seed)
    torch.set_num_threads(jax_thread_count())

    rnn_type = {"lstm": nn.LSTM, "gru": nn.GRU}[args.cell]

    class CharRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, args.embed)
            self.drop = nn.Dropout(args.dropout)
            self.rnn = rnn_type(
                args.embed, args.hidden, num_layers=args.layers,
                dropout=args.dropout if args.layers > 1 else 0.0,
            )  # fmt: skip
            self.head = nn.Linear(args.hidden, vocab_size)

        def forward(self, tokens, carry=None):  # tokens int64[T, B] -> logits [T, B, V]
            x = self.drop(self.embedding(tokens))
            h, carry = self.rnn(x, carry)
            return self.head(self.drop(h)), carry

    model = CharRNN()
    with torch.no_grad():
        t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
        model.embedding.weight.copy_(t(params.embedding))
        # the stack's weights in torch's layout and gate order (jaxseq.interop)
        stack = js.Stack([{"lstm": js.LSTM, "gru": js.GRU}[args.cell](args.hidden)] * args.layers)
        for name, value in js.interop.stack_to_torch(stack, params.stack).items():
            getattr(model.rnn, name).copy_(t(value))
        model.head.weight.copy_(t(params.head.w).T)
        model.head.bias.copy_(t(params.head.b))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
    )  # fmt: skip
    return model, opt


def torch_chunk(chunk):
    """A StreamBatcher chunk as torch tensors: ``(inputs, targets)`` of its valid steps, reset."""
    import torch

    valid = int(chunk.mask[:, 0].sum())
    if not (chunk.mask[:valid].all() and not chunk.mask[valid:].any()):
        raise ValueError("chunk: expected the same valid prefix in every stream")
    if chunk.reset[1:].any() or (chunk.reset[0].any() and not chunk.reset[0].all()):
        raise ValueError("chunk: expected resets only at the first step of every stream")
    inputs = torch.from_numpy(np.asarray(chunk.inputs[:valid], np.int64))
    targets = torch.from_numpy(np.asarray(chunk.targets[:valid], np.int64))
    return inputs, targets, bool(chunk.reset[0].all())


def make_torch_step(model, opt, clip: float):
    import torch
    import torch.nn.functional as F

    def step(carry, inputs, targets, reset):
        if reset:
            carry = None
        model.train()
        logits, carry = model(inputs, carry)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if isinstance(carry, tuple):  # LSTM (h, c); GRU h
            return tuple(c.detach() for c in carry), float(loss.detach())
        return carry.detach(), float(loss.detach())

    return step


# ----------------------------------------------------------------------------- run


def _side_record(impl, times, first_s, losses, tokens_per_step, eval_loss):
    med = float(np.median(times))
    total = float(np.sum(times))
    return {
        "impl": impl,
        "status": "ok",
        "timed_steps": len(times),
        "median_ms": 1e3 * med,
        "p10_ms": 1e3 * float(np.percentile(times, 10)),
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
        "total_s": total,
        "s_per_1000_steps": 1e3 * med,
        "tokens_per_s": tokens_per_step / med,
        "first_step_s": first_s,
        "loss_step0_no_dropout": eval_loss,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
    }


def _plot(path, losses_by_impl):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for impl, losses in losses_by_impl.items():
        ax.plot(np.arange(len(losses)), losses, label=impl, lw=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats/char)")
    ax.set_title("char LM: jaxseq and PyTorch, same recipe and batches")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    import jaxseq as js

    if args.data:
        text = Path(args.data).read_text(encoding="utf-8")
        data_name = os.path.basename(args.data)
    else:
        text = synthetic_text(20_000 if args.quick else 200_000, args.seed)
        data_name = f"synthetic Markov text ({len(text)} chars, seed {args.seed})"
    vocab = js.data.CharVocab.from_text(text)
    ids = vocab.encode(text)
    batcher = js.data.StreamBatcher(ids, args.batch, args.seq, vocab_size=vocab.size)
    model, params0, state, jstep, eval_step = build_jaxseq(args, vocab.size, batcher)
    has_torch = torch_available()
    if has_torch:
        import torch

        tmodel, topt = build_torch(args, vocab.size, params0)
        tstep = make_torch_step(tmodel, topt, args.clip)
    tokens_per_step = args.batch * args.seq

    # The same model: chunk 0 without dropout on both sides.
    ch0 = batcher.chunk(0)
    _, nats, count = eval_step(params0, model.initial_carry((args.batch,)), ch0)
    j_eval = float(nats) / float(count)
    t_eval = None
    if has_torch:
        with torch.no_grad():
            tmodel.eval()
            inp, tgt, _ = torch_chunk(ch0)
            logits, _ = tmodel(inp)
            t_eval = float(
                torch.nn.functional.cross_entropy(logits.reshape(-1, vocab.size), tgt.reshape(-1))
            )

    total = args.warmup + args.steps
    j_losses, t_losses, j_times, t_times = [], [], [], []
    j_first = t_first = None
    carry = None
    for s in progress(range(total), "train steps", quiet=args.quiet, total=total):
        chunk = batcher.at_step(s)
        t0 = time.perf_counter()
        state, metrics = jstep(state, chunk)
        loss = float(jax.block_until_ready(metrics["loss"]))
        dt = time.perf_counter() - t0
        j_losses.append(loss)
        if s == 0:
            j_first = dt
        if s >= args.warmup:
            j_times.append(dt)
        if has_torch:
            inp, tgt, reset = torch_chunk(chunk)
            t0 = time.perf_counter()
            carry, tloss = tstep(carry, inp, tgt, reset)
            dt = time.perf_counter() - t0
            t_losses.append(tloss)
            if s == 0:
                t_first = dt
            if s >= args.warmup:
                t_times.append(dt)

    jrec = _side_record("jaxseq", j_times, j_first, j_losses, tokens_per_step, j_eval)
    jrec["compile_s_approx"] = j_first - float(np.median(j_times))
    records = [jrec]
    comparison = {"impl": "jaxseq/torch", "status": "ok"}
    if has_torch:
        trec = _side_record("torch", t_times, t_first, t_losses, tokens_per_step, t_eval)
        trec["compile_s_approx"] = None
        records.append(trec)
        comparison.update(
            ratio_time_per_1000_steps=jrec["s_per_1000_steps"] / trec["s_per_1000_steps"],
            ratio_total_time=jrec["total_s"] / trec["total_s"],
            loss_last_diff=jrec["loss_last"] - trec["loss_last"],
            loss_step0_no_dropout_abs_diff=abs(j_eval - t_eval),
        )
    else:
        records.append({"impl": "torch", **skipped(f"{TORCH_MODULE} not installed")})
        comparison = {"impl": "jaxseq/torch", **skipped(f"{TORCH_MODULE} not installed")}
    comparison["ratio_time_per_1000_steps"] = comparison.get("ratio_time_per_1000_steps")
    records.append(comparison)

    env = environment()
    env["torch"] = package_version("torch")
    env["torch_threads"] = torch.get_num_threads() if has_torch else None
    env["data"] = data_name
    env["vocab_size"] = vocab.size
    env["recipe"] = (
        f"{args.layers}-layer {args.cell.upper()} H={args.hidden} E={args.embed}, B={args.batch} K={args.seq}, "
        f"dropout {args.dropout}, AdamW lr {args.lr} wd {args.weight_decay}, clip {args.clip}, "
        f"warmup {args.warmup} + {args.steps} timed steps"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}_loss.png"
    curves = {"jaxseq": j_losses}
    if has_torch:
        curves["torch"] = t_losses
    _plot(png, curves)

    rows = ["| step | jaxseq loss | torch loss |", "|---|---|---|"]
    logged = list(range(0, total, args.log_every))
    if logged[-1] != total - 1:
        logged.append(total - 1)
    for s in logged:
        tl = f"{t_losses[s]:.4f}" if has_torch else "skipped"
        rows.append(f"| {s} | {j_losses[s]:.4f} | {tl} |")
    extra = "\n".join(
        ["## Training loss (nats/char, with dropout)", "", *rows, "", f"Plot: `{png.name}`."]
    )
    columns = [
        "impl", "status", "timed_steps", "median_ms", "p10_ms", "p90_ms", "total_s",
        "tokens_per_s", "first_step_s", "compile_s_approx", "loss_step0_no_dropout",
        "loss_first", "loss_last", "ratio_time_per_1000_steps", "ratio_total_time",
        "loss_last_diff", "loss_step0_no_dropout_abs_diff", "reason",
    ]  # fmt: skip
    paths = write_results(
        out, NAME, records, env, columns, extra_md=extra,
        title="Character LM end to end: jaxseq vs PyTorch",
    )  # fmt: skip
    if not args.quiet:
        print(format_table(records, columns))
        tl = f"{t_losses[-1]:.4f}" if has_torch else "skipped"
        print(f"last step {total - 1}: jaxseq loss {j_losses[-1]:.4f}, torch loss {tl}")
        r = comparison.get("ratio_time_per_1000_steps")
        print(f"jaxseq/torch time per 1000 steps: {r if r is None else round(r, 3)}")
        print(f"wrote {paths['json']}, {paths['md']}, {png}")
    return {"records": records, "paths": {**paths, "png": str(png)}, "finite": all(
        math.isfinite(v) for v in j_losses + t_losses
    )}  # fmt: skip


if __name__ == "__main__":
    main()
    sys.exit(0)
