"""Parallel linear recurrences: a training step of ``h_t = a_t * h_{t-1} + b_t`` per mode, against T.

Question: which way of solving the diagonal linear recurrence behind minGRU and
minLSTM (``js.linear_recurrence``) is fastest for a training step (forward and
backward), as ``T`` grows, and does ``mode="auto"`` pick it?

Contenders, each jitted as ``jax.grad`` of ``sum(hs * w)`` with respect to
``(a, b, h0)`` (``a`` in (0.5, 1), ``b``, ``w`` normal; B=8, H=256, float32):

* ``scan_autodiff``: a plain ``lax.scan`` of the step, differentiated by JAX
  (written here, not in the library: the baseline);
* ``sequential``, ``associative``, ``chunked`` (chunk :func:`js.recurrent.linear.auto_chunk`),
  ``auto``: ``js.linear_recurrence(a, b, h0, mode=...)``;
* ``elementwise``: the same step with ``hs = a * b`` (no recurrence): what
  reading the inputs and writing the three fresh ``[T, B, H]`` gradient
  buffers costs on this machine, a floor for every mode.

Side by side in one process per ``T``, interleaved rounds, medians; compile
time (trace + lower + XLA compile) apart; ``temp_mb`` is XLA's temporary
buffer size for the step (``memory_analysis``).

Usage::

    python -m benchmarks.parallel_scan --out benchmarks/results/parallel_scan [--quick]

Writes ``parallel_scan.json``, ``parallel_scan.md`` and ``step_time_vs_T.png``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import jaxseq as js
from benchmarks._environment import environment
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import compile_jitted, time_interleaved

MODES = ("scan_autodiff", "sequential", "associative", "chunked", "auto", "elementwise")
T_FULL = (256, 1024, 4096, 16384)
T_QUICK = (64, 256)


def _scan_autodiff(a, b, h0):
    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return jax.lax.scan(body, h0, (a, b))[1]


def make_step(mode: str):
    """``(a, b, h0, w) -> (da, db, dh0)`` for one contender (``w`` an argument, not a
    constant the compiler could fold)."""
    if mode == "scan_autodiff":
        solve = _scan_autodiff
    elif mode == "elementwise":
        solve = lambda a, b, h0: a * b + h0[None]
    else:
        solve = lambda a, b, h0: js.linear_recurrence(a, b, h0, mode=mode)[1]
    return jax.grad(lambda a, b, h0, w: jnp.sum(solve(a, b, h0) * w), argnums=(0, 1, 2))


def inputs(t: int, batch: int, hidden: int):
    ka, kb, kw, kh = jax.random.split(jax.random.key(0), 4)
    a = jax.random.uniform(ka, (t, batch, hidden), minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, (t, batch, hidden))
    w = jax.random.normal(kw, (t, batch, hidden))
    h0 = jax.random.normal(kh, (batch, hidden))
    return a, b, h0, w


def measure_t(t: int, batch: int, hidden: int, modes, repeats: int, warmup: int) -> list[dict]:
    """Every mode at one ``T``, interleaved; returns one record per mode."""
    a, b, h0, w = inputs(t, batch, hidden)
    calls, info, temp = {}, {}, {}
    for mode in modes:
        fn = make_step(mode)
        call, info[mode] = compile_jitted(fn, a, b, h0, w)
        calls[mode] = call
        try:
            mem = jax.jit(fn).lower(a, b, h0, w).compile().memory_analysis()
            temp[mode] = mem.temp_size_in_bytes / 2**20
        except Exception:  # noqa: BLE001 - memory analysis is optional per backend
            temp[mode] = None
    times = time_interleaved(calls, repeats=repeats, warmup=warmup, info=info)
    base = times["scan_autodiff"]["median_s"] if "scan_autodiff" in times else None
    records = []
    for mode in modes:
        tm = times[mode]
        records.append(
            {
                "T": t,
                "B": batch,
                "H": hidden,
                "mode": mode,
                "resolved": js.recurrent.linear.auto_mode(t) if mode == "auto" else mode,
                "chunk": js.recurrent.linear.auto_chunk(t) if mode == "chunked" else None,
                "median_ms": 1e3 * tm["median_s"],
                "p10_ms": 1e3 * tm["p10_s"],
                "p90_ms": 1e3 * tm["p90_s"],
                "speedup_vs_scan": (base / tm["median_s"]) if base else None,
                "compile_s": tm["compile_s"],
                "temp_mb": temp[mode],
                "repeats": tm["repeats"],
            }
        )
    solvers = [r for r in records if r["mode"] not in ("auto", "elementwise")]
    auto = next((r for r in records if r["mode"] == "auto"), None)
    if auto is not None and solvers:
        best = min(solvers, key=lambda r: r["median_ms"])
        auto["best_mode"] = best["mode"]
        auto["auto_over_best"] = auto["median_ms"] / best["median_ms"]
    return records


def plot(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in MODES:
        rs = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["T"])
        if not rs:
            continue
        style = "--" if mode in ("auto", "elementwise") else "-"
        ax.plot([r["T"] for r in rs], [r["median_ms"] for r in rs], style, marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (steps)")
    ax.set_ylabel("training step (fwd+bwd), median ms")
    r0 = records[0]
    ax.set_title(f"h = a*h + b, B={r0['B']}, H={r0['H']}, float32, {jax.default_backend()}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/parallel_scan")
    ap.add_argument("--quick", action="store_true", help=f"T in {T_QUICK}, 3 repeats")
    ap.add_argument("--T", default=None, help="comma list of T (default 256,1024,4096,16384)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of contenders")
    ap.add_argument("-B", "--batch", type=int, default=8)
    ap.add_argument("-H", "--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    ts = T_QUICK if args.quick else T_FULL
    if args.T:
        ts = tuple(int(v) for v in args.T.split(","))
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    modes = tuple(args.modes.split(","))
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {MODES}")
    records = []
    for t in progress(ts, "T", quiet=args.quiet):
        records += measure_t(t, args.batch, args.hidden, modes, args.repeats, args.warmup)
    cols = [
        "T", "mode", "resolved", "chunk", "median_ms", "p10_ms", "p90_ms", "speedup_vs_scan",
        "auto_over_best", "best_mode", "compile_s", "temp_mb",
    ]  # fmt: skip
    print(format_table(records, cols))
    paths = write_results(
        args.out,
        "parallel_scan",
        records,
        environment(),
        cols,
        title="Parallel linear recurrences: training step per mode",
    )
    from pathlib import Path

    png = Path(args.out) / "step_time_vs_T.png"
    plot(records, png)
    print(f"wrote {paths['json']}, {paths['md']}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
