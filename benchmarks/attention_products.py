"""Attention's batched products on the CPU: how fast, and whether they use every core.

Question: at the Transformer char LM's sizes (B=32 examples x K=4 heads, T=64, Dh=64)
each attention product is ``B K = 128`` small products ``[64, 64] x [64, 64]`` in one
batched matmul. How many GFLOP/s do XLA and PyTorch reach on them, against one plain
matmul of the same FLOPs, with every core this process may use and in a child process
pinned to one core? A product that runs as fast on one core as on two is not spread
over the cores.

Products (``b = B K``; the layouts of the LM's attention, head-major ``[b, T, Dh]``):

* ``scores``: ``q kᵀ`` (``bqd,bkd->bqk``);
* ``values``: ``w v`` (``bqk,bkd->bqd``);
* ``keys_grad``: ``dsᵀ q`` (``bqk,bqd->bkd``), the backward's transposed form;
* ``one_matmul``: ``[b T, Dh] x [Dh, T]``, the FLOPs of one product above as a single
  matmul (the reference: what the same arithmetic reaches as one large product).

Contenders: ``xla`` (``jax.jit`` of ``jnp.einsum``) and ``torch`` (``torch.einsum``,
on as many threads as the process has cores; skipped when PyTorch is not installed).

Timing: rounds alternate the contenders; in each round a contender runs one untimed
call and then ``--burst`` timed calls back to back. Calls this short are slower right
after the other runtime ran (its worker threads hold the cores, ours are asleep), and
the burst keeps that out of the figures. Medians; compile time apart.

Usage::

    python -m benchmarks.attention_products --out results/attention_products [--quick]

Writes ``attention_products.json``, ``attention_products.md`` and
``attention_products.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks._environment import environment, jax_thread_count, module_available
from benchmarks._output import format_table, write_results
from benchmarks._processes import child_env
from benchmarks._timing import time_interleaved

PRODUCTS = {  # name: (einsum, lhs shape, rhs shape) as functions of (b, t, dh)
    "scores": ("bqd,bkd->bqk", lambda b, t, d: ((b, t, d), (b, t, d))),
    "values": ("bqk,bkd->bqd", lambda b, t, d: ((b, t, t), (b, t, d))),
    "keys_grad": ("bqk,bqd->bkd", lambda b, t, d: ((b, t, t), (b, t, d))),
    "one_matmul": ("md,dk->mk", lambda b, t, d: ((b * t, d), (d, t))),
}


def _flops(b: int, t: int, dh: int) -> int:
    """Every product above: ``2 b T T Dh``."""
    return 2 * b * t * t * dh


def measure(b: int, t: int, dh: int, rounds: int, burst: int) -> list[dict]:
    """The records of every product and contender in this process (its cores)."""
    import jax
    import jax.numpy as jnp

    cores = jax_thread_count()
    torch = None
    if module_available("torch"):
        import torch

        torch.set_num_threads(cores)
    rng = np.random.default_rng(0)
    records = []
    for name, (eq, shapes) in PRODUCTS.items():
        lhs, rhs = (rng.standard_normal(s).astype(np.float32) for s in shapes(b, t, dh))
        ja, jb = jnp.asarray(lhs), jnp.asarray(rhs)
        f = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y))
        t0 = time.perf_counter()
        want = np.asarray(f(ja, jb))
        compile_s = time.perf_counter() - t0
        calls = {"xla": lambda f=f, ja=ja, jb=jb: f(ja, jb)}
        if torch is not None:
            ta, tb = torch.from_numpy(lhs), torch.from_numpy(rhs)
            np.testing.assert_allclose(torch.einsum(eq, ta, tb).numpy(), want, rtol=1e-3, atol=1e-3)
            calls["torch"] = lambda eq=eq, ta=ta, tb=tb: torch.einsum(eq, ta, tb)
        timed = time_interleaved(calls, repeats=rounds, warmup=0, burst=burst)
        for impl, tm in timed.items():
            med = tm["median_s"]
            records.append(
                {"product": name, "impl": impl, "cores": cores, "median_ms": 1e3 * med,
                 "gflops": _flops(b, t, dh) / med / 1e9,
                 "compile_s": compile_s if impl == "xla" else None}
            )  # fmt: skip
        if torch is None:
            records.append({"product": name, "impl": "torch", "cores": cores,
                            "status": "skipped", "reason": "torch not installed"})  # fmt: skip
    return records


def _on_one_core(args) -> list[dict]:
    """:func:`measure` in a child process pinned to this process's first core."""
    cmd = [sys.executable, "-m", "benchmarks.attention_products", "--child",
           "--batch", str(args.batch), "--T", str(args.T), "--head-size", str(args.head_size),
           "--rounds", str(args.rounds), "--burst", str(args.burst)]  # fmt: skip
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"the one-core child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.rsplit("RECORDS", 1)[1])


def _speedups(records: list[dict]) -> list[dict]:
    """One row per product and contender: GFLOP/s on all cores and on one, and their ratio."""
    ok = {(r["product"], r["impl"], r["cores"]): r for r in records if "gflops" in r}
    rows = []
    for product in PRODUCTS:
        for impl in ("xla", "torch"):
            runs = sorted((c, r) for (p, i, c), r in ok.items() if p == product and i == impl)
            if len(runs) == 2:
                (c1, one), (cn, many) = runs
                rows.append({"product": product, "impl": impl,
                             f"gflops_{cn}_cores": many["gflops"], "gflops_1_core": one["gflops"],
                             "all_cores_over_one": many["gflops"] / one["gflops"]})  # fmt: skip
    return rows


def _plot(path, records) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "gflops" in r]
    bars = sorted({(r["impl"], r["cores"]) for r in ok})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(bars), 1)
    for j, (impl, cores) in enumerate(bars):
        ys = [next((r["gflops"] for r in ok if (r["product"], r["impl"], r["cores"])
                    == (p, impl, cores)), 0.0) for p in PRODUCTS]  # fmt: skip
        xs = [i + j * width for i in range(len(PRODUCTS))]
        ax.bar(xs, ys, width, label=f"{impl}, {cores} core{'s' if cores > 1 else ''}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(PRODUCTS))], list(PRODUCTS))
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Attention's batched products (float32)")
    ax.set_ylim(0, 1.25 * max([r["gflops"] for r in ok], default=1.0))
    ax.legend(loc="upper center", ncol=len(bars), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/attention_products")
    ap.add_argument("--batch", type=int, default=128, help="b = B K products per call")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="b=8, T=16, 2 rounds of 2")
    ap.add_argument("--no-one-core", action="store_true", help="skip the pinned child")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.T, args.head_size, args.rounds, args.burst = 8, 16, 16, 2, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:  # pinned before jax or torch start their threads
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        records = measure(args.batch, args.T, args.head_size, args.rounds, args.burst)
        print("RECORDS" + json.dumps(records))
        return {"records": records}
    records = measure(args.batch, args.T, args.head_size, args.rounds, args.burst)
    pinnable = hasattr(os, "sched_setaffinity") and jax_thread_count() > 1
    if not args.no_one_core and pinnable:
        records += _on_one_core(args)
    rows = _speedups(records)
    print(format_table(records, ["product", "impl", "cores", "median_ms", "gflops"]))
    if rows:
        print(format_table(rows))
    env = environment()
    env["shapes"] = f"b={args.batch} T={args.T} Dh={args.head_size}, float32"
    extra = "## All cores against one\n\n" + format_table(rows) if rows else None
    paths = write_results(args.out, "attention_products", records, env, extra_md=extra,
                          title="Attention's batched products")  # fmt: skip
    _plot(os.path.join(args.out, "attention_products.png"), records)
    print(f"wrote {paths['json']}, {paths['md']}")
    return {"records": records, "speedups": rows, "paths": paths}


if __name__ == "__main__":
    main()
