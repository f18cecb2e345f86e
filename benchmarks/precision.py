"""bf16 mixed precision against float32, for an LSTM and a Transformer char LM, next to
PyTorch's CPU bf16 autocast on the same models.

    python -m benchmarks.precision --out results/precision          # 500 steps per curve
    python -m benchmarks.precision --out results/precision --quick  # a smoke run

``make_train_step(..., precision="bf16")`` keeps float32 master weights and optimizer
state and runs the forward and backward on bfloat16 operands, every product
accumulating into float32. Two questions, per model:

* **Does it train alike?** ``--steps`` steps of fp32 and of bf16 from the same weights
  on the same batches (a first-order Markov text, or ``--data``); reported: the
  mean loss of each window of 50 steps and the largest relative gap between the
  two curves' windows.
* **Does it pay on this CPU?** One train step of each precision, timed interleaved
  (medians, compile apart), for jaxseq and for the same model in PyTorch (float32,
  and ``torch.autocast("cpu", torch.bfloat16)``), with the CPU's bf16-relevant
  features (AMX, AVX512-BF16) recorded beside the figures.

Models: ``lstm``, the 2-layer LSTM char LM (H=256, E=128) of
``benchmarks.char_lm_e2e`` without dropout; ``transformer``, the 4-layer Transformer
LM (d_model 256, 4 heads, T=64, learned positions) of ``benchmarks.transformer_e2e``.
B=32 streams, K=64 steps per chunk, Adam (lr 2e-3 LSTM, 1e-3 Transformer), clip 1.0.

Writes ``precision.json``, ``precision.md`` and ``precision_curve.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import jax
import numpy as np

import jaxseq as js
from benchmarks._data import markov_ids
from benchmarks._environment import cpu_features, environment, jax_thread_count, module_available
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import skipped
from benchmarks.transformer_e2e import build_torch_lm

TORCH_MODULE = "torch"  # tests may point it at a missing name to simulate its absence
MODELS = ("lstm", "transformer")
WINDOW = 50


def torch_available() -> bool:
    return module_available(TORCH_MODULE)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/precision")
    ap.add_argument("--models", default="lstm,transformer")
    ap.add_argument("--steps", type=int, default=500, help="steps of each loss curve")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps of each contender")
    ap.add_argument("--data", default=None, help="a text file (default: a Markov text)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 100 steps")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in MODELS:
            ap.error(f"--models: expected names from {MODELS}, got {m!r}")
    if a.quick:
        a.steps, a.repeats = min(a.steps, 100), min(a.repeats, 3)
    if a.steps < WINDOW or a.steps % WINDOW:
        ap.error(f"--steps: expected a positive multiple of {WINDOW}, got {a.steps}")
    return a


# ----------------------------------------------------------------------------- the models


def config(name: str, quick: bool) -> SimpleNamespace:
    if name == "lstm":
        c = dict(hidden=256, embed=128, layers=2, batch=32, seq=64, lr=2e-3)
        if quick:
            c.update(hidden=32, embed=16, batch=4, seq=16)
    else:
        c = dict(d_model=256, heads=4, layers=4, batch=32, seq=64, lr=1e-3)
        if quick:
            c.update(d_model=32, heads=2, layers=1, batch=4, seq=16)
    return SimpleNamespace(name=name, seed=0, **c)


def build_jaxseq(c: SimpleNamespace, vocab: int):
    if c.name == "lstm":
        lm = js.models.char_lm(
            vocab, cell="lstm", num_layers=c.layers, hidden_size=c.hidden, embedding_size=c.embed
        )
    else:
        lm = js.models.transformer_lm(
            vocab, num_layers=c.layers, d_model=c.d_model, num_heads=c.heads, max_len=c.seq,
            positions="learned",
        )  # fmt: skip
    return lm, lm.init(jax.random.key(c.seed))


def build_torch(c: SimpleNamespace, vocab: int, params):
    """``(model, step)``: the same model in PyTorch with jaxseq's weights; ``step(x, y,
    carry, bf16) -> (carry, loss)`` (Adam, clip 1.0; bf16 by CPU autocast)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(jax_thread_count())
    if c.name == "lstm":

        class CharLSTM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embedding = nn.Embedding(vocab, c.embed)
                self.rnn = nn.LSTM(c.embed, c.hidden, num_layers=c.layers)
                self.head = nn.Linear(c.hidden, vocab)

            def forward(self, tokens, carry=None):  # int64[T, B] -> [T, B, V]
                h, carry = self.rnn(self.embedding(tokens), carry)
                return self.head(h), carry

        model = CharLSTM()
        t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
        with torch.no_grad():
            model.embedding.weight.copy_(t(params.embedding))
            stack = js.Stack([js.LSTM(c.hidden)] * c.layers)
            for name, value in js.interop.stack_to_torch(stack, params.stack).items():
                getattr(model.rnn, name).copy_(t(value))
            model.head.weight.copy_(t(params.head.w).T)
            model.head.bias.copy_(t(params.head.b))
    else:
        args = SimpleNamespace(
            d_model=c.d_model, heads=c.heads, seq=c.seq, vocab=vocab, layers=c.layers, seed=c.seed
        )
        model = build_torch_lm(args, params)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(0.9, 0.999), eps=1e-8)

    def step(x, y, carry, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if c.name == "lstm":
                logits, carry = model(x, carry)
            else:
                logits = model(x.T).transpose(0, 1)  # nanoGPT-style: batch-major
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if carry is not None:
            carry = tuple(h.detach() for h in carry)
        return carry, float(loss.detach())

    return model, step


# ----------------------------------------------------------------------------- measurements


def _batcher(c, ids, vocab):
    return js.data.StreamBatcher(
        ids, c.batch, c.seq, vocab_size=vocab, reset_every_chunk=c.name == "transformer"
    )


def curves(c, ids, vocab, steps, quiet) -> dict[str, np.ndarray]:
    """The training loss of each step, fp32 and bf16, from the same weights and batches."""
    lm, params = build_jaxseq(c, vocab)
    batches = _batcher(c, ids, vocab)
    opt = js.make_optimizer("adam", c.lr, max_norm=1.0)
    out = {}
    for p in ("fp32", "bf16"):
        state = js.init_state(params, opt, jax.random.key(1), lm.initial_carry((c.batch,)))
        step = js.make_train_step(js.training.lm_loss_fn(lm), opt, chunks_per_call=WINDOW,
                                  precision=p)  # fmt: skip
        losses: list[float] = []
        js.fit(step, state, batches, num_steps=steps, progress=not quiet,
               on_step=lambda s, r, acc=losses: acc.append(r["loss"]))  # fmt: skip
        out[p] = np.asarray(losses, np.float64)
    return out


def step_times(c, ids, vocab, repeats, has_torch, quiet) -> dict[str, dict]:
    """Median seconds per train step: jaxseq fp32/bf16 and torch fp32/bf16, interleaved."""
    lm, params = build_jaxseq(c, vocab)
    batches = _batcher(c, ids, vocab)
    chunks = [batches.at_step(s) for s in range(repeats + 2)]
    opt = js.make_optimizer("adam", c.lr, max_norm=1.0)
    calls, compile_s = {}, {}
    for p in ("fp32", "bf16"):
        state = js.init_state(params, opt, jax.random.key(1), lm.initial_carry((c.batch,)))
        step = js.make_train_step(js.training.lm_loss_fn(lm), opt, precision=p)
        t0 = time.perf_counter()
        state, metrics = step(state, chunks[0])  # the step donates its input state
        jax.block_until_ready(metrics["loss"])
        compile_s[f"jaxseq {p}"] = time.perf_counter() - t0
        box = {"state": state}

        def call(i, step=step, box=box):
            box["state"], metrics = step(box["state"], chunks[i])
            jax.block_until_ready(metrics["loss"])

        calls[f"jaxseq {p}"] = call
    if has_torch:
        import torch

        as_t = lambda a: torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
        tchunks = [(as_t(ch.inputs), as_t(ch.targets)) for ch in chunks]
        for p in ("fp32", "bf16"):
            _, tstep = build_torch(c, vocab, params)
            box = {"carry": None}

            def call(i, tstep=tstep, box=box, bf16=p == "bf16"):
                box["carry"], _ = tstep(*tchunks[i], box["carry"], bf16)

            calls[f"torch {p}"] = call
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in progress(range(repeats + 1), f"{c.name} step timing", quiet=quiet):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[n](1 + r)
            if r:  # the first round warms up (torch's allocator, the first chunk)
                times[n].append(time.perf_counter() - t0)
    return {n: {"median_s": float(np.median(v)), "compile_s": compile_s.get(n)}
            for n, v in times.items()}  # fmt: skip


def main(argv=None) -> dict:
    a = parse_args(argv)
    has_torch = torch_available()
    if a.data:
        vocab_obj = js.data.CharVocab.from_text(open(a.data, encoding="utf-8").read())
        ids = vocab_obj.encode(open(a.data, encoding="utf-8").read())
        vocab, data_name = vocab_obj.size, os.path.basename(a.data)
    else:
        vocab = 65
        ids = markov_ids(400_000 if not a.quick else 20_000, vocab, 0)
        data_name = f"first-order Markov text over {vocab} symbols ({len(ids)} tokens)"
    records, all_curves = [], {}
    feats = cpu_features()
    for m in a.models:
        c = config(m, a.quick)
        cv = curves(c, ids, vocab, a.steps, a.quiet)
        all_curves[m] = cv
        win = {p: v.reshape(-1, WINDOW).mean(1) for p, v in cv.items()}
        rel = np.abs(win["bf16"] - win["fp32"]) / win["fp32"]
        for i, (f, b) in enumerate(zip(win["fp32"], win["bf16"])):
            records.append({"model": m, "what": f"loss, steps {WINDOW * i + 1}-{WINDOW * (i + 1)}",
                            "fp32": float(f), "bf16": float(b),
                            "bf16/fp32": float(b / f)})  # fmt: skip
        records.append({"model": m, "what": "largest relative gap of the 50-step windows",
                        "bf16/fp32": float(1 + rel.max()), "max_rel_gap": float(rel.max())})  # fmt: skip
        t = step_times(c, ids, vocab, a.repeats, has_torch, a.quiet)
        row = {"model": m, "what": "train step median ms", "cpu_features": feats}
        for side in ("jaxseq", "torch"):
            if f"{side} fp32" not in t:
                row["torch"] = skipped(f"{TORCH_MODULE} not installed")["reason"]
                continue
            f32, b16 = t[f"{side} fp32"]["median_s"], t[f"{side} bf16"]["median_s"]
            row[f"{side} fp32"], row[f"{side} bf16"] = 1e3 * f32, 1e3 * b16
            row[f"{side} bf16/fp32"] = b16 / f32
        if "torch bf16" in row:
            row["jaxseq/torch fp32"] = row["jaxseq fp32"] / row["torch fp32"]
            row["jaxseq/torch bf16"] = row["jaxseq bf16"] / row["torch bf16"]
        row["jaxseq bf16 compile_s"] = t["jaxseq bf16"]["compile_s"]
        records.append(row)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_curves), figsize=(6 * len(all_curves), 3.6), squeeze=False)
    for ax, (m, cv) in zip(axes[0], all_curves.items()):
        for p, v in cv.items():
            ax.plot(np.arange(1, len(v) + 1), v, label=p, lw=1)
        ax.set(xlabel="step", ylabel="train loss (nats/token)", title=f"{m}: bf16 vs fp32")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(a.out, exist_ok=True)
    png = os.path.join(a.out, "precision_curve.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    env = environment()
    env["data"] = data_name
    env["recipe"] = (
        f"{a.steps} steps per curve, windows of {WINDOW}; {a.repeats} interleaved timed steps; "
        "LSTM 2x256 (E=128), Transformer 4x256 (4 heads, T=64); B=32, K=64; Adam, clip 1.0"
        + (" (quick: tiny models)" if a.quick else "")
    )
    columns = [
        "model", "what", "fp32", "bf16", "bf16/fp32", "max_rel_gap", "jaxseq fp32",
        "jaxseq bf16", "jaxseq bf16/fp32", "torch fp32", "torch bf16", "torch bf16/fp32",
        "jaxseq/torch fp32", "jaxseq/torch bf16", "cpu_features", "jaxseq bf16 compile_s", "torch",
    ]  # fmt: skip
    if not a.quiet:
        print(format_table(records, columns))
    paths = write_results(a.out, "precision", records, env, columns,
                          title="bf16 mixed precision vs fp32, jaxseq and PyTorch",
                          extra_md=f"Plot: `{os.path.basename(png)}`.")  # fmt: skip
    return {"records": records, "paths": {**paths, "png": png}, "curves": all_curves}


if __name__ == "__main__":
    main()
