"""The Transformer against PyTorch: the char-LM train step end to end, and the attention core.

**Part 1, the train step.** One process, the same model on both sides, the same
batches, steps interleaved (one jaxseq step, one torch step), both precisions:

* ``jaxseq``: ``js.models.transformer_lm(V, num_layers=4, d_model=256, num_heads=4,
  max_len=64, positions="learned")`` + ``js.make_optimizer("adam", 1e-3, max_norm=1.0)``
  + ``js.training.lm_loss_fn`` + ``js.make_train_step(..., precision=p)``, fed by
  ``js.data.StreamBatcher(..., reset_every_chunk=True)`` (B=32 streams, T=64);
* ``torch``: the same model written nanoGPT-style (token and learned position
  embeddings, pre-LN blocks with one fused ``q, k, v`` projection,
  ``F.scaled_dot_product_attention(is_causal=True)``, tanh-GELU MLP, final layer
  norm, linear head), ``torch.optim.Adam`` and ``clip_grad_norm_(1.0)``; bf16 is
  ``torch.autocast("cpu", torch.bfloat16)``; threads pinned to JAX's count.

Both start from the same weights (jaxseq's initialisation copied into the torch
modules), and before training the loss of chunk 0 is computed on both sides: it
must agree (the same model). After ``--warmup`` untimed steps (jaxseq's compile
reported apart), ``--steps`` steps of each are timed; reported: the median time
per step, tokens per second and the ratio jaxseq/torch (below 1: jaxseq is faster).

**Part 2, the attention core**, causal, forward and forward+backward (the gradient
of ``sum(out**2)`` with respect to the inputs), over T in ``--lengths`` with
``B = max(1, 2048 // T)``, K=4 heads of 64 (interleaved rounds):

* ``core``: ``js.batched_dot_product_attention`` (dense), ``js.blockwise_attention``
  and ``jax.nn.dot_product_attention`` against ``F.scaled_dot_product_attention``
  on ``[B, K, T, 64]``, each given its inputs in its own layout (laid out before
  timing): ``[B, T, K, 64]`` for the dense ones, ``[B, K, T, 64]`` for blockwise
  and SDPA;
* ``mha``: multi-head attention with its projections (D=256): ``js.MultiHeadAttention``
  written for one example and vmapped over the batch, dense and blockwise,
  against a torch module (fused ``q, k, v`` projection, SDPA, output projection).

Dense attention past ``--dense-max`` is skipped (its ``[T, T]`` scores).

Usage::

    python -m benchmarks.transformer_e2e --out results/transformer_e2e
    python -m benchmarks.transformer_e2e --out results/transformer_e2e --quick   # tiny shapes

Writes ``transformer_e2e.json``, ``transformer_e2e.md`` and ``transformer_e2e.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._data import markov_ids
from benchmarks._environment import environment, jax_thread_count, module_available
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import compile_jitted, skipped, time_interleaved

NAME = "transformer_e2e"
TORCH_MODULE = "torch"  # tests may point it at a missing name to simulate its absence
PRECISIONS = ("fp32", "bf16")
LENGTHS = "64,256,1024,4096"  # T of the attention part (the quick run's: 16,32)


def torch_available() -> bool:
    return module_available(TORCH_MODULE)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/transformer_e2e")
    ap.add_argument("--steps", type=int, default=30, help="timed train steps of each side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed train steps first")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64, help="T of the LM (also its max_len)")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--lengths", default=None, help=f"T of the attention part (default {LENGTHS})")
    ap.add_argument("--tokens", type=int, default=2048, help="B = max(1, tokens // T)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds of the attention part")
    ap.add_argument("--dense-max", type=int, default=4096, help="longest T for dense attention")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few steps")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.batch, args.seq = 1, 32, 2, 4, 16
        args.lengths = args.lengths or "16,32"
        args.tokens, args.repeats = 64, 3
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    for name in ("steps", "layers", "d_model", "heads", "batch", "seq", "vocab", "tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive int")
    if args.d_model % args.heads:
        ap.error(f"--heads: expected a divisor of --d-model={args.d_model}, got {args.heads}")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in args.precisions:
        if p not in PRECISIONS:
            ap.error(f"--precisions: expected names from {PRECISIONS}, got {p!r}")
    args.lengths = [int(t) for t in (args.lengths or LENGTHS).split(",") if t.strip()]
    return args


# ----------------------------------------------------------------------------- part 1: LM


def build_torch_lm(args, params):
    """The jaxseq Transformer LM in plain PyTorch (nanoGPT-style), with jaxseq's weights."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, nh, t_max, v = args.d_model, args.heads, args.seq, args.vocab

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, vv = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, vv = (a.view(b, t, nh, d // nh).transpose(1, 2) for a in (q, k, vv))
            y = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(v, d), nn.Embedding(t_max, d)
            self.blocks = nn.ModuleList([Block() for _ in range(args.layers)])
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, v)

        def forward(self, idx):  # int64[B, T] -> logits [B, T, V]
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(args.seed)
    torch.set_num_threads(jax_thread_count())
    model = GPT()
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    with torch.no_grad():
        model.tok.weight.copy_(t(params.embedding))
        model.pos.weight.copy_(t(params.positions))
        for blk, bp in zip(model.blocks, params.blocks):
            a = bp.attn
            w = np.concatenate([np.asarray(x).reshape(d, d) for x in (a.w_q, a.w_k, a.w_v)], 1)
            blk.qkv.weight.copy_(t(w).T)
            blk.qkv.bias.copy_(
                t(np.concatenate([np.asarray(x).reshape(d) for x in (a.b_q, a.b_k, a.b_v)]))
            )
            blk.proj.weight.copy_(t(np.asarray(a.w_o).reshape(d, d)).T)
            blk.proj.bias.copy_(t(a.b_o))
            for ln, lp in ((blk.ln1, bp.ln1), (blk.ln2, bp.ln2)):
                ln.weight.copy_(t(lp.scale))
                ln.bias.copy_(t(lp.bias))
            blk.fc.weight.copy_(t(bp.mlp_in.w).T)
            blk.fc.bias.copy_(t(bp.mlp_in.b))
            blk.out.weight.copy_(t(bp.mlp_out.w).T)
            blk.out.bias.copy_(t(bp.mlp_out.b))
        model.ln_f.weight.copy_(t(params.ln_f.scale))
        model.ln_f.bias.copy_(t(params.ln_f.bias))
        model.head.weight.copy_(t(params.head.w).T)
        model.head.bias.copy_(t(params.head.b))
    return model


def make_torch_step(model, precision: str, lr: float):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def step(inputs, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def run_lm(args, has_torch: bool) -> list[dict]:
    import jax

    import jaxseq as js

    lm = js.models.transformer_lm(
        args.vocab, num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
        max_len=args.seq, positions="learned",
    )  # fmt: skip
    ids = markov_ids(max(20_000, 40 * args.batch * args.seq), args.vocab, args.seed)
    batcher = js.data.StreamBatcher(
        ids, args.batch, args.seq, vocab_size=args.vocab, reset_every_chunk=True
    )
    params0 = lm.init(jax.random.key(args.seed))
    opt = js.make_optimizer("adam", args.lr, max_norm=1.0)
    total = args.warmup + args.steps
    chunks = [batcher.at_step(s) for s in range(total)]
    tokens_per_step = args.batch * args.seq
    records = []

    # The same model: the loss of chunk 0 on both sides (float32, before training).
    _, nats, count = js.training.make_eval_step(lm)(
        params0, lm.initial_carry((args.batch,)), chunks[0]
    )
    j_loss0 = float(nats) / float(count)
    t_loss0 = None
    if has_torch:
        import torch

        tmodel = build_torch_lm(args, params0)
        as_torch = lambda a: torch.from_numpy(np.asarray(a, np.int64).T.copy())  # noqa: E731
        t_batches = [(as_torch(c.inputs), as_torch(c.targets)) for c in chunks]
        with torch.no_grad():
            logits = tmodel(t_batches[0][0])
            t_loss0 = float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, args.vocab), t_batches[0][1].reshape(-1)
                )
            )

    for precision in args.precisions:
        state = js.init_state(params0, opt, jax.random.key(1), lm.initial_carry((args.batch,)))
        jstep = js.make_train_step(js.training.lm_loss_fn(lm), opt, precision=precision)
        if has_torch:
            tstep = make_torch_step(build_torch_lm(args, params0), precision, args.lr)
        times = {"jaxseq": [], "torch": []}
        losses = {"jaxseq": [], "torch": []}
        first = {}
        desc = f"train steps ({precision})"
        for s in progress(range(total), desc, quiet=args.quiet, total=total):
            t0 = time.perf_counter()
            state, metrics = jstep(state, chunks[s])
            losses["jaxseq"].append(float(jax.block_until_ready(metrics["loss"])))
            dt = time.perf_counter() - t0
            first.setdefault("jaxseq", dt)
            if s >= args.warmup:
                times["jaxseq"].append(dt)
            if has_torch:
                t0 = time.perf_counter()
                losses["torch"].append(tstep(*t_batches[s]))
                dt = time.perf_counter() - t0
                first.setdefault("torch", dt)
                if s >= args.warmup:
                    times["torch"].append(dt)
        recs = {}
        for impl in ("jaxseq", "torch"):
            if impl == "torch" and not has_torch:
                recs[impl] = {"part": "lm", "impl": impl, "precision": precision,
                              **skipped(f"{TORCH_MODULE} not installed")}  # fmt: skip
                continue
            med = float(np.median(times[impl]))
            recs[impl] = {
                "part": "lm", "impl": impl, "precision": precision, "status": "ok",
                "T": args.seq, "median_ms": 1e3 * med,
                "p10_ms": 1e3 * float(np.percentile(times[impl], 10)),
                "p90_ms": 1e3 * float(np.percentile(times[impl], 90)),
                "tokens_per_s": tokens_per_step / med,
                "first_step_s": first[impl],
                "loss_step0_fp32": j_loss0 if impl == "jaxseq" else t_loss0,
                "loss_first": losses[impl][0], "loss_last": losses[impl][-1],
                "losses": losses[impl],
            }  # fmt: skip
        recs["jaxseq"]["compile_s_approx"] = first["jaxseq"] - float(np.median(times["jaxseq"]))
        if has_torch:
            recs["jaxseq"]["ratio_vs_torch"] = (
                recs["jaxseq"]["median_ms"] / recs["torch"]["median_ms"]
            )
        records += [recs["jaxseq"], recs["torch"]]
    return records


# ----------------------------------------------------------------------------- part 2: attention


def _time_torch(fn, repeats):
    """Warm-up, then ``repeats`` timed calls of ``fn()`` (synchronous on CPU)."""
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def attention_contenders(t: int, b: int, nh: int, dh: int, dense_max: int, seed: int):
    """``{(part, impl): (jax_fn | None, args)}`` for one length: jitted fwd and fwd+bwd."""
    import jax
    import jax.numpy as jnp

    import jaxseq as js

    rng = np.random.default_rng(seed)
    d = nh * dh
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, nh, dh), np.float32)) for _ in range(3))
    x = jnp.asarray(rng.standard_normal((b, t, d), np.float32))
    mha = js.MultiHeadAttention(nh, dh)
    mp = mha.init(jax.random.key(seed), d)
    sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, T, K, D] <-> [B, K, T, D]
    # each implementation gets q, k, v in its own layout, laid out before timing, as
    # SDPA gets [B, K, T, D]: [B, T, K, D] for the dense ones, [B, K, T, D] (heads as a
    # leading batch dim) for blockwise; the outputs are compared in [B, T, K, D]
    heads_first = tuple(sw(a) for a in (q, k, v))
    core = {
        "jaxseq dense": (
            lambda q, k, v: js.batched_dot_product_attention(q, k, v, causal=True),
            (q, k, v),
            None,
        ),
        "jaxseq blockwise": (
            lambda q, k, v: js.blockwise_attention(q, k, v, causal=True),
            heads_first,
            sw,
        ),
        "jax.nn": (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
            (q, k, v),
            None,
        ),
    }
    multi = {
        "jaxseq dense": lambda p, x: jax.vmap(lambda x1: mha.apply(p, x1, causal=True))(x),
        "jaxseq blockwise": lambda p, x: jax.vmap(
            lambda x1: mha.apply(p, x1, causal=True, blockwise=True)
        )(x),
    }
    out = {}
    for name, (f, args, to_btkd) in core.items():
        if "dense" in name and t > dense_max or name == "jax.nn" and t > dense_max:
            out[("core", name)] = None
            continue
        loss = lambda q, k, v, f=f: jnp.sum(jnp.square(f(q, k, v).astype(jnp.float32)))
        out[("core", name)] = ((f, jax.grad(loss, argnums=(0, 1, 2))), args, to_btkd)
    for name, f in multi.items():
        if "dense" in name and t > dense_max:
            out[("mha", name)] = None
            continue
        loss = lambda p, x, f=f: jnp.sum(jnp.square(f(p, x).astype(jnp.float32)))
        out[("mha", name)] = ((f, jax.grad(loss, argnums=(0, 1))), (mp, x), None)
    return out, (q, k, v, x, mp)


def torch_attention(q, k, v, x, mp, nh, dh):
    """``{(part, "torch"): (fwd(), fwd_bwd())}`` on the same inputs and weights."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    tq, tk, tv = (t(a).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
    d = nh * dh
    w_qkv = torch.cat([t(a).reshape(d, d) for a in (mp.w_q, mp.w_k, mp.w_v)], 1).T.contiguous()
    b_qkv = torch.cat([t(a).reshape(d) for a in (mp.b_q, mp.b_k, mp.b_v)])
    qkv = torch.nn.Linear(d, 3 * d)
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        qkv.weight.copy_(w_qkv)
        qkv.bias.copy_(b_qkv)
        proj.weight.copy_(t(mp.w_o).reshape(d, d).T)
        proj.bias.copy_(t(mp.b_o))
    tx = t(x).requires_grad_()

    def mha(xx):
        bb, tt, _ = xx.shape
        a, b_, c = qkv(xx).split(d, dim=2)
        a, b_, c = (z.view(bb, tt, nh, dh).transpose(1, 2) for z in (a, b_, c))
        y = F.scaled_dot_product_attention(a, b_, c, is_causal=True)
        return proj(y.transpose(1, 2).reshape(bb, tt, d))

    def core_f():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    def core_fb():
        for a in (tq, tk, tv):
            a.grad = None
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).square().sum().backward()

    def mha_f():
        with torch.no_grad():
            return mha(tx)

    def mha_fb():
        for a in (tx, *qkv.parameters(), *proj.parameters()):
            a.grad = None
        mha(tx).square().sum().backward()

    out_t = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).transpose(1, 2)
    return {("core", "torch"): (core_f, core_fb), ("mha", "torch"): (mha_f, mha_fb)}, {
        "core": out_t.detach().numpy(),
        "mha": mha(tx).detach().numpy(),
    }


def run_attention(args, has_torch: bool) -> list[dict]:
    import jax

    nh, dh = args.heads, args.d_model // args.heads
    records = []
    for t in progress(args.lengths, "attention lengths", quiet=args.quiet):
        b = max(1, args.tokens // t)
        contenders, (q, k, v, x, mp) = attention_contenders(t, b, nh, dh, args.dense_max, args.seed)
        torch_calls, torch_out = (
            ({}, {}) if not has_torch else torch_attention(q, k, v, x, mp, nh, dh)
        )
        for mode in ("fwd", "fwd+bwd"):
            calls, info, errs = {}, {}, {}
            for key, spec in contenders.items():
                if spec is None:
                    continue
                (f, g), fargs, to_btkd = spec
                call, info[key] = compile_jitted(f if mode == "fwd" else g, *fargs)
                calls[key] = call
                if mode == "fwd" and key[0] in torch_out:
                    got = call() if to_btkd is None else to_btkd(call())
                    got = np.asarray(jax.device_get(got))
                    errs[key] = float(np.max(np.abs(got - torch_out[key[0]])))
            for key, (tf, tfb) in torch_calls.items():
                calls[key] = tf if mode == "fwd" else tfb
            res = time_interleaved(calls, repeats=args.repeats, warmup=2, info=info)
            for key, spec in [*contenders.items(), *((k, 1) for k in torch_calls)]:
                part, impl = key
                base = {"part": part, "impl": impl, "mode": mode, "T": t, "B": b, "heads": nh}
                if spec is None:
                    records.append(
                        {**base, **skipped(f"dense attention past --dense-max={args.dense_max}")}
                    )
                    continue
                r = res[key]
                rec = {**base, "status": "ok", "median_ms": 1e3 * r["median_s"],
                       "compile_s": r.get("compile_s")}  # fmt: skip
                if key in errs:
                    rec["max_abs_diff_vs_torch"] = errs[key]
                torch_key = (part, "torch")
                if impl != "torch" and torch_key in res:
                    rec["ratio_vs_torch"] = r["median_s"] / res[torch_key]["median_s"]
                records.append(rec)
    return records


# ----------------------------------------------------------------------------- output


def _plot(path, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = [r for r in records if r.get("part") in ("core", "mha") and r.get("status") == "ok"]
    lm = [r for r in records if r.get("part") == "lm" and r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, part in zip(axes[:2], ("core", "mha")):
        impls = sorted({r["impl"] for r in att if r["part"] == part})
        for impl in impls:
            rs = sorted(
                (
                    r
                    for r in att
                    if r["part"] == part and r["impl"] == impl and r["mode"] == "fwd+bwd"
                ),
                key=lambda r: r["T"],
            )
            if rs:
                ax.plot([r["T"] for r in rs], [r["median_ms"] for r in rs], "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (B = tokens // T)")
        ax.set_ylabel("fwd+bwd median (ms)")
        ax.set_title({"core": "causal attention core", "mha": "multi-head attention"}[part])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax = axes[2]
    for r in lm:
        ax.plot(
            np.arange(len(r["losses"])), r["losses"], lw=1, label=f"{r['impl']} {r['precision']}"
        )
    ax.set_xlabel("train step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Transformer LM train steps")
    ax.grid(alpha=0.3)
    if lm:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    has_torch = torch_available()
    records: list[dict] = []
    if not args.skip_lm:
        records += run_lm(args, has_torch)
    if not args.skip_attention:
        records += run_attention(args, has_torch)
    env = environment()
    env["recipe"] = (
        f"LM: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, T={args.seq}, "
        f"B={args.batch}, V={args.vocab}, Adam lr {args.lr}, clip 1.0, learned positions, "
        f"reset every chunk; {args.warmup} + {args.steps} timed steps. Attention: "
        f"B = max(1, {args.tokens} // T), {args.heads} heads of {args.d_model // args.heads}, "
        f"causal, {args.repeats} interleaved rounds"
    )
    if not has_torch:
        env["torch"] = f"{TORCH_MODULE} not installed (torch rows skipped)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    _plot(png, records)
    columns = [
        "part", "impl", "precision", "mode", "T", "B", "status", "median_ms", "p10_ms", "p90_ms",
        "ratio_vs_torch", "tokens_per_s", "compile_s", "compile_s_approx", "loss_step0_fp32",
        "loss_first", "loss_last", "max_abs_diff_vs_torch", "reason",
    ]  # fmt: skip
    paths = write_results(
        out, NAME, records, env, columns,
        title="The Transformer against PyTorch: train step and attention core",
        extra_md=f"Plot: `{png.name}`.",
    )  # fmt: skip
    if not args.quiet:
        print(format_table(records, columns))
        print(f"wrote {paths['json']}, {paths['md']}, {png}")
    finite = all(
        math.isfinite(v) for r in records for v in r.get("losses", []) if isinstance(v, float)
    )
    return {"records": records, "paths": {**paths, "png": str(png)}, "finite": finite}


if __name__ == "__main__":
    main()
    sys.exit(0)
