"""Attention: time and memory of causal self-attention (forward + backward) vs T.

Questions answered (side by side in one process, ratios are what to read):

1. ``target``: at B=32, T=512, K=8 heads, d=64, float32, causal, forward+backward,
   how do ``jax.nn.dot_product_attention`` (XLA), the vmapped per-example
   ``js.batched_dot_product_attention``, the same attention with heads in one
   einsum, and ``js.blockwise_attention`` compare? (Targets 1 and 2; the
   record also holds the max difference from ``jax.nn`` under causal +
   padding masks.)
2. ``vs_T``: B=1, K=8, d=64, T growing: time and XLA's temporary buffer size
   (``compiled.memory_analysis()``) of dense XLA attention and blockwise attention.
3. ``long``: blockwise attention at T=32768 (B=1, K=8, d=64, causal, fwd+bwd) in a
   child process: time and peak resident memory (Target 3). Dense attention
   would need ``K * T^2 * 4`` bytes = 32 GiB for the scores alone.

Usage::

    python -m benchmarks.attention --out results            # all three parts
    python -m benchmarks.attention --out results --quick    # small shapes, T=4096 long run

Writes ``attention.json``, ``attention.md`` and ``attention_vs_T.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxseq as js
from benchmarks._environment import environment
from benchmarks._output import format_table, progress, write_results
from benchmarks._processes import peak_memory_subprocess
from benchmarks._timing import compile_jitted, time_interleaved


def _qkvg(b, t, k, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(kk, (b, t, k, d), jnp.float32) for kk in keys]


def _swap(x):  # [B, T, K, D] <-> [B, K, T, D]
    return jnp.swapaxes(x, 1, 2)


def _einsum_attention(q, k, v):
    """Heads in one einsum (no vmap): the alternative to vmapping over heads."""
    t = q.shape[1]
    s = jnp.einsum("bqkd,btkd->bkqt", q, k, preferred_element_type=jnp.float32)
    s = s * jnp.float32(1.0 / np.sqrt(q.shape[-1]))
    mask = js.causal_mask(t)[None, None]
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    w = jnp.where(mask, jax.nn.softmax(s, axis=-1), 0.0)
    return jnp.einsum("bkqt,btkd->bqkd", w, v, preferred_element_type=jnp.float32)


def _contenders(block_q, block_k):
    """name -> attention on ``[B, T, K, D]`` inputs (the layout of ``jax.nn``)."""
    return {
        "xla_jax_nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        "vmap_js": lambda q, k, v: js.batched_dot_product_attention(q, k, v, causal=True),
        "einsum_heads": _einsum_attention,
        "blockwise_js": lambda q, k, v: _swap(
            js.blockwise_attention(
                _swap(q), _swap(k), _swap(v), causal=True, block_q=block_q, block_k=block_k
            )
        ),
    }


# Contenders also fed in their own layout, ``[B, K, T, D]`` (heads as a leading batch
# dim, as ``blockwise_attention`` takes them), so no transposes are timed; their
# gradients are swapped back to ``[B, T, K, D]`` only for the comparison. The
# ``*_from_btkd`` row times the same function with the transposes from jax.nn's layout.
NATIVE_BKTD = {"blockwise_js": "blockwise_js_from_btkd"}


def _fwd_bwd(attn):
    def loss(q, k, v, g):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * g)

    return jax.grad(loss, argnums=(0, 1, 2))


def _matmul_flops(b, t, k, d, causal_skip):
    """fwd 2 + bwd 4 matmuls of [T, T, d] per head (no recomputation); half with skipping."""
    f = 6 * 2 * b * k * t * t * d
    return f / 2 if causal_skip else f


def part_target(args, records):
    b, t, k, d = (4, 256, 8, 64) if args.quick else (32, 512, 8, 64)
    q, kk, v, g = _qkvg(b, t, k, d)
    # Target 1 equality: causal + padding masks against jax.nn.
    kv_len = jnp.asarray(np.linspace(t, 1, b).astype(np.int32))
    mask = js.masks.padding_mask(None, kv_len, t, t)
    ours = jax.jit(lambda q, k, v: js.batched_dot_product_attention(q, k, v, mask, causal=True))
    ref = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=kv_len
        )
    )
    max_diff_masked = float(jnp.max(jnp.abs(ours(q, kk, v) - ref(q, kk, v))))
    calls, info = {}, {}
    outs = {}
    native = [np.ascontiguousarray(np.asarray(_swap(a))) for a in (q, kk, v, g)]
    contenders = []
    for name, attn in _contenders(args.block, args.block).items():
        if name in NATIVE_BKTD:  # the same function timed on [B, T, K, D] (with transposes)
            contenders.append((NATIVE_BKTD[name], attn, (q, kk, v, g), False))
            inner = lambda q, k, v, a=attn: _swap(a(_swap(q), _swap(k), _swap(v)))
            contenders.append((name, inner, [jnp.asarray(a) for a in native], True))
        else:
            contenders.append((name, attn, (q, kk, v, g), False))
    for name, attn, inputs, swapped in progress(contenders, "compile", quiet=args.quiet):
        call, info[name] = compile_jitted(_fwd_bwd(attn), *inputs)
        calls[name] = call
        out = call()
        outs[name] = tuple(_swap(o) for o in out) if swapped else out
    timings = time_interleaved(calls, repeats=args.repeats, warmup=1, info=info)
    base = timings["xla_jax_nn"]["median_s"]
    for name, rec in timings.items():
        grad_diff = max(
            float(jnp.max(jnp.abs(a - b_))) for a, b_ in zip(outs[name], outs["xla_jax_nn"])
        )
        records.append(
            {
                "part": "target",
                "impl": name,
                "B": b,
                "T": t,
                "heads": k,
                "d": d,
                "layout": "B,K,T,D" if name in NATIVE_BKTD else "B,T,K,D",
                "block": args.block if name.startswith("blockwise_js") else None,
                **rec,
                "speedup_vs_xla": base / rec["median_s"],
                "max_grad_diff_vs_xla": grad_diff,
                "max_out_diff_vs_xla_masked": max_diff_masked if name == "vmap_js" else None,
                "matmul_gflops": _matmul_flops(b, t, k, d, name.startswith("blockwise_js"))
                / rec["median_s"]
                / 1e9,
            }
        )


def part_vs_t(args, records):
    ts = [128, 256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    b, k, d = 1, 8, 64
    impls = {
        n: f
        for n, f in _contenders(args.block, args.block).items()
        if n in ("xla_jax_nn", "blockwise_js")
    }
    for t in progress(ts, "T", quiet=args.quiet):
        q, kk, v, g = _qkvg(b, t, k, d, seed=t)
        calls, info = {}, {}
        for name, attn in impls.items():
            compiled = jax.jit(_fwd_bwd(attn)).lower(q, kk, v, g).compile()
            mem = compiled.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
            call, info[name] = compile_jitted(_fwd_bwd(attn), q, kk, v, g)
            info[name]["temp_mb"] = None if temp is None else temp / 2**20
            calls[name] = call
        timings = time_interleaved(calls, repeats=max(2, args.repeats // 2), warmup=1, info=info)
        for name, rec in timings.items():
            records.append(
                {
                    "part": "vs_T",
                    "impl": name,
                    "B": b,
                    "T": t,
                    "heads": k,
                    "d": d,
                    "block": args.block if name == "blockwise_js" else None,
                    **rec,
                    "xla_temp_mb": info[name]["temp_mb"],
                    "dense_scores_mb": k * t * t * 4 / 2**20,
                }
            )


def long_worker(t, block):
    """Child process: blockwise fwd+bwd at B=1, K=8, d=64, causal; prints one JSON line."""
    b, k, d = 1, 8, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q, kk, v, g = (jax.random.normal(x, (b, k, t, d), jnp.float32) for x in keys)

    def loss(q, k, v, g):
        out = js.blockwise_attention(q, k, v, causal=True, block_q=block, block_k=block)
        return jnp.sum(out * g)

    # One execution only (minutes on 2 cores): its time is ``first_call_s``.
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kk, v, g).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grads = jax.block_until_ready(compiled(q, kk, v, g))
    first_call_s = time.perf_counter() - t0
    finite = bool(all(bool(jnp.isfinite(x).all()) for x in grads))
    rec = {"status": "ok", "compile_s": compile_s, "first_call_s": first_call_s, "finite": finite}
    print(json.dumps(rec))


def part_long(args, records):
    t = 4096 if args.quick else args.long_t
    res = peak_memory_subprocess(
        "benchmarks.attention",
        ["--long-worker", str(t), "--block", str(args.long_block)],
        timeout_s=args.long_timeout,
    )
    rec = {
        "part": "long",
        "impl": "blockwise_js",
        "B": 1,
        "T": t,
        "heads": 8,
        "d": 64,
        "block": args.long_block,
    }
    if res["status"] == "ok":
        inner = json.loads(res["stdout"].strip().splitlines()[-1])
        rec.update(inner)
        rec["peak_rss_mb"] = res["peak_rss_mb"]
        rec["peak_rss_gib"] = res["peak_rss_mb"] / 1024
        rec["process_wall_s"] = res["wall_s"]
    else:
        rec.update({k: v for k, v in res.items() if k != "stdout"})
    rec["dense_scores_gib"] = 8 * t * t * 4 / 2**30
    records.append(rec)


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["part"] == "vs_T" and r.get("status") == "ok"]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["impl"] for r in rows}):
        rs = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["T"])
        ts = [r["T"] for r in rs]
        a1.plot(ts, [r["median_s"] for r in rs], "o-", label=name)
        if all(r.get("xla_temp_mb") is not None for r in rs):
            a2.plot(ts, [r["xla_temp_mb"] for r in rs], "o-", label=name)
    rs = sorted((r for r in rows if r["impl"] == "xla_jax_nn"), key=lambda r: r["T"])
    a2.plot(
        [r["T"] for r in rs], [r["dense_scores_mb"] for r in rs], "k--", label="[K,T,T] f32 scores"
    )
    for ax, title, ylabel in (
        (a1, "causal attention fwd+bwd, B=1, K=8, d=64", "median seconds"),
        (a2, "XLA temporary buffers", "MiB"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true", help="small shapes, long run at T=4096")
    p.add_argument("--parts", default="target,vs_T,long", help="comma list of parts to run")
    p.add_argument("--block", type=int, default=128, help="block size of blockwise attention")
    p.add_argument("--long-t", type=int, default=32768)
    p.add_argument("--long-block", type=int, default=512)
    p.add_argument("--long-timeout", type=float, default=1800.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--long-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.long_worker is not None:
        long_worker(args.long_worker, args.block)
        return 0
    if args.quick:
        args.repeats = min(args.repeats, 3)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    records: list[dict] = []
    for part in parts:
        fn = {"target": part_target, "vs_T": part_vs_t, "long": part_long}.get(part)
        if fn is None:
            p.error(f"--parts: unknown part {part!r} (choose from target, vs_T, long)")
        fn(args, records)
    env = environment()
    cols = [
        "part",
        "impl",
        "layout",
        "B",
        "T",
        "heads",
        "d",
        "block",
        "status",
        "median_s",
        "min_s",
        "compile_s",
        "speedup_vs_xla",
        "matmul_gflops",
        "max_grad_diff_vs_xla",
        "max_out_diff_vs_xla_masked",
        "xla_temp_mb",
        "dense_scores_mb",
        "peak_rss_gib",
        "first_call_s",
        "dense_scores_gib",
    ]
    cols = [c for c in cols if any(c in r for r in records)]
    paths = write_results(
        args.out, "attention", records, env, cols, title="Causal self-attention, forward + backward"
    )
    png = plot(records, f"{args.out}/attention_vs_T.png")
    if not args.quiet:
        print(format_table(records, cols))
        print(paths, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
