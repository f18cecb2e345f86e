"""Scan vs unrolled: how should a recurrence be rolled out under ``jit``?

For RNN, LSTM and GRU over T steps, forward and training step (forward +
backward of ``sum(ys**2)``, gradients w.r.t. params and inputs), compares:

* ``scan_u{k}`` -- ``js.rollout(..., unroll=k)`` (``lax.scan``, k steps per loop body);
* ``scan_auto`` -- ``js.rollout(..., unroll="auto")``;
* ``fori`` -- ``lax.fori_loop`` over ``cell.recur`` writing into a ``[T, B, H]`` buffer;
* ``unrolled`` -- ``js.rollout_unrolled`` under ``jit`` (a Python loop: T copies of
  the step in the program, so compile time grows with T).

Unrolled configurations are compiled in a child process under a compile
budget (``--compile-budget``, default 60 s): one that would exceed it is
stopped and reported as skipped, and larger T of the same kind are skipped
when the compile time measured at a smaller T predicts they would exceed it.

Usage::

    python -m benchmarks.scan_vs_unrolled --out results          # default, < 3 min on 2 cores
    python -m benchmarks.scan_vs_unrolled --out results --full   # T up to 1000, every unroll

Writes ``results.json``, ``results.md``, ``compile_time_vs_T.png`` and
``step_time_vs_T.png`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from benchmarks._environment import environment
from benchmarks._flops import gflops, rnn_flops
from benchmarks._output import progress, write_results
from benchmarks._processes import CompileBudgetRunner
from benchmarks._timing import skipped, time_jitted

CELLS = ("rnn", "lstm", "gru")
MODES = ("forward", "train")
FULL_T = (10, 30, 100, 300, 1000)
FULL_UNROLLS = (1, 2, 4, 8, 16)
DEFAULT_T = (10, 100)
DEFAULT_UNROLLS = (1, 4)
# Growth of unrolled compile time in T assumed when only one smaller T was measured.
SINGLE_POINT_EXPONENT = 1.5


def variant_names(unrolls) -> list[str]:
    return [f"scan_u{k}" for k in unrolls] + ["scan_auto", "fori", "unrolled"]


# ----------------------------------------------------------------------------- programs


def make_cell(name: str, hidden: int):
    import jaxseq as js

    if name == "rnn":
        return js.RNN(hidden)
    if name == "lstm":
        return js.LSTM(hidden)
    if name == "gru":
        return js.GRU(hidden)
    raise ValueError(f"cell: expected one of {CELLS}, got {name!r}")


def fori_rollout(cell, params, xs):
    """``lax.fori_loop`` over ``cell.recur``, input projection hoisted: ``[T, B, H]`` out."""
    import jax
    import jax.numpy as jnp

    t_len = xs.shape[0]
    xp = cell.project(params, xs)
    carry = cell.initial_carry(xs.shape[1:-1], xs.dtype)
    ys = jnp.zeros((t_len, *xs.shape[1:-1], cell.hidden_size), xs.dtype)

    def body(t, state):
        carry, ys = state
        carry, y = cell.recur(params, carry, xp[t])
        return carry, jax.lax.dynamic_update_index_in_dim(ys, y, t, 0)

    return jax.lax.fori_loop(0, t_len, body, (carry, ys))


def _rollout_kwargs(kernel: str | None) -> dict:
    """``kernel=`` for ``js.rollout`` when one is chosen and this version accepts it."""
    import inspect

    import jaxseq as js

    if kernel is None or "kernel" not in inspect.signature(js.rollout).parameters:
        return {}
    return {"kernel": kernel}


def make_rollout(cell, variant: str, kernel: str | None = None):
    """``(params, xs) -> (carry, ys)`` for one variant; ``kernel`` goes to ``js.rollout``."""
    import jaxseq as js

    kw = _rollout_kwargs(kernel)
    if variant.startswith("scan_u"):
        k = int(variant[len("scan_u") :])
        return lambda p, xs: js.rollout(cell, p, xs, unroll=k, **kw)
    if variant == "scan_auto":
        return lambda p, xs: js.rollout(cell, p, xs, unroll="auto", **kw)
    if variant == "fori":
        return lambda p, xs: fori_rollout(cell, p, xs)
    if variant == "unrolled":
        return lambda p, xs: js.rollout_unrolled(cell, p, xs)
    raise ValueError(f"variant: unknown {variant!r}")


def make_program(cell, variant: str, mode: str, kernel: str | None = None):
    """The function to jit: forward returns ``ys``; train returns ``(loss, (dparams, dxs))``."""
    import jax
    import jax.numpy as jnp

    roll = make_rollout(cell, variant, kernel)
    if mode == "forward":
        return lambda p, xs: roll(p, xs)[1]
    if mode == "train":

        def loss(p, xs):
            ys = roll(p, xs)[1]
            return jnp.sum(jnp.square(ys.astype(jnp.float32)))

        return jax.value_and_grad(loss, argnums=(0, 1))
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def measure(
    cell: str,
    variant: str,
    mode: str,
    T: int,
    B: int,
    D: int,
    H: int,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    kernel: str | None = None,
) -> dict:
    """Times one configuration (in this process); returns the timing dict of ``time_jitted``."""
    import jax

    c = make_cell(cell, H)
    kp, kx = jax.random.split(jax.random.key(seed))
    params = c.init(kp, D)
    xs = jax.random.normal(kx, (T, B, D), jax.numpy.float32)
    return time_jitted(make_program(c, variant, mode), params, xs, repeats=repeats, warmup=warmup)


# ----------------------------------------------------------------------------- sweep


def predicted_compile_s(history: dict, key, t: int):
    """Compile time at ``t`` extrapolated from the compile times measured at smaller T.

    Unrolled programs hold T copies of the step, so compile time grows at least
    linearly in T (the training step faster, about T^1.6 on XLA:CPU): with two or
    more smaller T measured, a power law through the two largest, its exponent
    clamped to [1, 2]; with one, ``T^SINGLE_POINT_EXPONENT`` (1.5). Returns None
    when nothing smaller was measured.
    """
    smaller = sorted((tt, s) for tt, s in history.get(key, []) if tt < t)
    if not smaller:
        return None
    t1, s1 = smaller[-1]
    exponent = SINGLE_POINT_EXPONENT
    if len(smaller) >= 2:
        t0, s0 = smaller[-2]
        if s0 > 0 and s1 > 0 and t1 > t0:
            exponent = min(max(math.log(s1 / s0) / math.log(t1 / t0), 1.0), 2.0)
    return s1 * (t / t1) ** exponent


def run_sweep(
    cells,
    modes,
    ts,
    unrolls,
    B: int,
    D: int,
    Hd: int,
    *,
    repeats: int = 10,
    warmup: int = 2,
    compile_budget_s: float = 60.0,
    quiet: bool = False,
    log=print,
    variants=None,
    kernel: str | None = None,
) -> list[dict]:
    """Every (cell, mode, T, variant); unrolled ones in a child process under the compile budget.

    ``variants`` defaults to ``variant_names(unrolls)``.
    """
    variants = list(variants) if variants is not None else variant_names(unrolls)
    configs = [(c, m, t, v) for c in cells for m in modes for t in sorted(ts) for v in variants]
    records = []
    history: dict = {}  # (cell, mode) -> [(T, compile_s)] of the unrolled variant
    over_budget: dict = {}  # (cell, mode) -> smallest T that exceeded the budget
    with CompileBudgetRunner(budget_s=compile_budget_s) as runner:
        for cell, mode, t, variant in progress(configs, "scan_vs_unrolled", quiet=quiet):
            base = {"cell": cell, "mode": mode, "variant": variant, "T": t, "B": B, "D": D}
            base["H"] = Hd
            flops = rnn_flops(cell, B, D, Hd, t, training=(mode == "train"))
            kwargs = dict(cell=cell, variant=variant, mode=mode, T=t, B=B, D=D, H=Hd)
            kwargs.update(repeats=repeats, warmup=warmup, kernel=kernel)
            key = (cell, mode)
            if variant != "unrolled":
                res = measure(**kwargs)
            elif key in over_budget:
                res = skipped(
                    f"compile exceeded the {compile_budget_s:g} s budget at T={over_budget[key]}"
                )
            else:
                pred = predicted_compile_s(history, key, t)
                if pred is not None and pred > compile_budget_s:
                    res = skipped(
                        f"predicted compile {pred:.0f} s > {compile_budget_s:g} s budget "
                        f"(extrapolated from smaller T)"
                    )
                else:
                    res = runner.run("benchmarks.scan_vs_unrolled:measure", kwargs)
                    if res.get("status") == "ok":
                        history.setdefault(key, []).append((t, res["compile_s"]))
                    elif "compile exceeded" in res.get("reason", ""):
                        over_budget[key] = t
            rec = {**base, "flops": flops, **res}
            if res.get("status") == "ok":
                rec["median_ms"] = 1e3 * res["median_s"]
                rec["gflops"] = gflops(flops, res["median_s"])
            records.append(rec)
            if res.get("status") != "ok":
                log(f"  {cell} {mode} T={t} {variant}: {res.get('status')} ({res.get('reason')})")
    return records


# ----------------------------------------------------------------------------- reporting


def pivot_md(records: list[dict], field: str, fmt=lambda v: f"{v:.3g}") -> str:
    """Rows (cell, mode, T), one column per variant, cells ``field`` or 'skipped'."""
    variants = []
    rows: dict = {}
    for r in records:
        if r["variant"] not in variants:
            variants.append(r["variant"])
        rows.setdefault((r["cell"], r["mode"], r["T"]), {})[r["variant"]] = r
    lines = [
        "| cell | mode | T | " + " | ".join(variants) + " | best |",
        "|---|---|---|" + "---|" * (len(variants) + 1),
    ]
    for (cell, mode, t), by in rows.items():
        cells, best, best_v = [], None, ""
        for v in variants:
            r = by.get(v)
            if r is None:
                cells.append("")
            elif r.get("status") != "ok" or r.get(field) is None:
                cells.append(r.get("status", "?"))
            else:
                val = r[field]
                cells.append(fmt(val))
                if best is None or val < best:
                    best, best_v = val, v
        lines.append(f"| {cell} | {mode} | {t} | " + " | ".join(cells) + f" | {best_v} |")
    return "\n".join(lines)


def plot(records: list[dict], out_dir, field: str, ylabel: str, filename: str) -> str:
    """Log-log ``field`` vs T, one panel per (cell, mode), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for r in records:
        if (r["cell"], r["mode"]) not in panels:
            panels.append((r["cell"], r["mode"]))
    cells = list(dict.fromkeys(c for c, _ in panels))
    modes = list(dict.fromkeys(m for _, m in panels))
    fig, axes = plt.subplots(
        len(modes), len(cells), figsize=(4.2 * len(cells), 3.4 * len(modes)), squeeze=False
    )
    variants = list(dict.fromkeys(r["variant"] for r in records))
    styles = {v: ("--" if v.startswith("scan_u") else "-") for v in variants}
    for i, mode in enumerate(modes):
        for j, cell in enumerate(cells):
            ax = axes[i][j]
            for v in variants:
                pts = sorted(
                    (r["T"], r[field])
                    for r in records
                    if r["cell"] == cell
                    and r["mode"] == mode
                    and r["variant"] == v
                    and r.get("status") == "ok"
                    and r.get(field)
                )
                if pts:
                    ax.plot(*zip(*pts), styles[v], marker="o", ms=3, label=v)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{cell.upper()} {mode}")
            ax.set_xlabel("T (steps)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(out_dir) / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


COLUMNS = [
    "cell",
    "mode",
    "T",
    "variant",
    "status",
    "compile_s",
    "first_call_s",
    "median_ms",
    "p10_s",
    "p90_s",
    "gflops",
    "reason",
]


def report(records: list[dict], env: dict, out_dir, settings: dict) -> dict:
    """Writes results.json/.md and both PNGs; returns the paths and the summary Markdown."""
    summary = "\n".join(
        [
            "## Step time (ms, median), by variant",
            "",
            pivot_md(records, "median_ms"),
            "",
            "## Compile time (s, trace + lower + compile), by variant",
            "",
            pivot_md(records, "compile_s"),
            "",
            "## Settings",
            "",
            *[f"- {k}: `{v}`" for k, v in settings.items()],
        ]
    )
    paths = write_results(
        out_dir,
        "results",
        records,
        {**env, "settings": str(settings)},
        COLUMNS,
        extra_md=summary,
        title="Scan vs unrolled",
    )
    paths["compile_png"] = plot(
        records, out_dir, "compile_s", "compile time (s)", "compile_time_vs_T.png"
    )
    paths["step_png"] = plot(
        records, out_dir, "median_s", "step time (s, median)", "step_time_vs_T.png"
    )
    paths["summary_md"] = summary
    return paths


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str, allowed) -> list[str]:
    out = [v.strip() for v in s.split(",") if v.strip()]
    for v in out:
        if v not in allowed:
            raise argparse.ArgumentTypeError(f"expected names from {allowed}, got {v!r}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results", help="output directory (default: results)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--full", action="store_true", help=f"T in {FULL_T}, unroll in {FULL_UNROLLS}"
    )
    size.add_argument("--quick", action="store_true", help="alias of the default (< 3 min)")
    p.add_argument("--cells", default=",".join(CELLS), help="comma list of rnn,lstm,gru")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of forward,train")
    p.add_argument("--T", dest="ts", default=None, help="comma list of sequence lengths")
    p.add_argument("--unrolls", default=None, help="comma list of scan unroll factors")
    p.add_argument(
        "--variants", default=None, help="comma list of variants (default: all for --unrolls)"
    )
    p.add_argument(
        "--kernel",
        default=None,
        help="kernel= for js.rollout in the scan variants (default: the library's default)",
    )
    p.add_argument("--batch", "-B", type=int, default=16, help="batch size B (default 16)")
    p.add_argument("--hidden", "-H", type=int, default=128, help="hidden size H (default 128)")
    p.add_argument("--input-size", "-D", type=int, default=None, help="input size D (default H)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per config (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument(
        "--compile-budget",
        type=float,
        default=60.0,
        help="seconds an unrolled config may compile before it is stopped (default 60)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        args.cells = _names(args.cells, CELLS)
        args.modes = _names(args.modes, MODES)
        args.ts = _ints(args.ts) if args.ts else list(FULL_T if args.full else DEFAULT_T)
        if args.unrolls:
            args.unrolls = _ints(args.unrolls)
        else:
            args.unrolls = list(FULL_UNROLLS if args.full else DEFAULT_UNROLLS)
        all_variants = variant_names(args.unrolls)
        args.variants = _names(args.variants, all_variants) if args.variants else all_variants
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if args.input_size is None:
        args.input_size = args.hidden
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    settings = {
        "cells": args.cells,
        "modes": args.modes,
        "T": args.ts,
        "unrolls": args.unrolls,
        "variants": args.variants,
        "kernel": args.kernel or "library default",
        "B": args.batch,
        "D": args.input_size,
        "H": args.hidden,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile_budget_s": args.compile_budget,
        "full": args.full,
    }
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    t0 = time.perf_counter()
    records = run_sweep(
        args.cells,
        args.modes,
        args.ts,
        args.unrolls,
        args.batch,
        args.input_size,
        args.hidden,
        repeats=args.repeats,
        warmup=args.warmup,
        compile_budget_s=args.compile_budget,
        quiet=args.quiet,
        log=log,
        variants=args.variants,
        kernel=args.kernel,
    )
    settings["wall_s"] = round(time.perf_counter() - t0, 1)
    paths = report(records, env, args.out, settings)
    print(paths.pop("summary_md"))
    print()
    print(f"wrote {', '.join(paths.values())} in {settings['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
