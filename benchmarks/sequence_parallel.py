"""Sequence parallelism: per-device memory and time of the linear recurrences split along T.

Question: with ``mesh`` and ``sequence_axis``, ``js.linear_recurrence`` and
``js.recurrent.linear_attention`` split ``T`` over the devices of a mesh axis;
how does the per-device memory of a training step (forward and backward:
``jax.grad`` of ``sum(outputs * w)`` with respect to every floating input)
fall with the number of devices, against the plain single-device call, as T
grows, and what does the step cost?

Shapes (float32, ``mode="auto"``): ``linear_attention`` with ``q, k, v: [T, B=1,
K=4, 64]`` and one decay per head (``log_decay: [T, 1, 4]``);
``linear_recurrence`` with ``a, b: [T, B=1, H=256]``. The T-major inputs are
split over the devices (``NamedSharding(mesh, P("seq"))``), the rest replicated.

Devices are simulated: each device count runs in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set
before JAX starts its CPU backend), 1 being the plain call without a mesh. The
N simulated devices share this machine's CPU cores and memory, so the **memory
figures carry over** to N real devices (XLA's per-device buffer sizes of the
compiled SPMD program, ``compiled.memory_analysis()``: ``temp_mb`` scratch +
``args_mb`` + ``out_mb`` = ``total_mb``), while the **times do not** (the N
slices run on the same cores, with no interconnect): they show the overhead of
the split on one machine, not a speed-up. Times are medians of ``--repeats``
calls after ``--warmup``, ``block_until_ready``, measured up to ``--time-max-T``
(beyond it the program is compiled for its memory figures, never run).

Usage::

    python -m benchmarks.sequence_parallel --out benchmarks/results/sequence_parallel [--quick]

Writes ``sequence_parallel.json``, ``sequence_parallel.md`` and
``sequence_parallel.png`` (memory and time against T) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FUNCTIONS = ("linear_attention", "linear_recurrence")
T_FULL = (1024, 4096, 16384, 65536, 262144, 1048576)
T_QUICK = (256, 1024)
DEVICES_FULL = (1, 2, 4, 8)
DEVICES_QUICK = (1, 2)
ACCEPTANCE_T, ACCEPTANCE_DEVICES = 65536, 8
COLUMNS = [
    "function", "T", "devices", "T_per_device", "temp_mb", "args_mb", "out_mb", "total_mb",
    "mem_vs_1", "median_ms", "p10_ms", "p90_ms", "time_vs_1", "compile_s",
]  # fmt: skip
_ROOT = str(Path(__file__).resolve().parent.parent)


# ----------------------------------------------------------------------------- child side


def _step(function: str, mesh, cfg):
    """``(step, inputs)``: the training step of ``function`` and its inputs as
    ``(shape after T, split along T)`` (not split: the whole shape, replicated)."""
    import jax
    import jax.numpy as jnp

    import jaxseq as js

    par = {} if mesh is None else dict(mesh=mesh, sequence_axis="seq")
    if function == "linear_attention":

        def step(q, k, v, g, w):
            loss = lambda *x: jnp.sum(js.recurrent.linear_attention(*x, **par)[1] * w)
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)

        qk = ((cfg.batch, cfg.heads, cfg.dk), True)
        vs = ((cfg.batch, cfg.heads, cfg.dv), True)
        return step, [qk, qk, vs, ((cfg.batch, cfg.heads), True), vs]

    def step(a, b, h0, w):
        loss = lambda *x: jnp.sum(js.linear_recurrence(*x, **par)[1] * w)
        return jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)

    ab = (cfg.batch, cfg.hidden)
    return step, [(ab, True), (ab, True), (ab, False), (ab, True)]


def _inputs(function: str, specs, t: int, sharding, replicated, concrete: bool):
    """Abstract inputs (``jax.ShapeDtypeStruct``) or random arrays made on their devices."""
    import jax
    import jax.numpy as jnp

    out = []
    for i, (tail, split) in enumerate(specs):
        shape, sh = ((t, *tail), sharding) if split else (tail, replicated)
        if not concrete:
            out.append(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh))
            continue
        if function == "linear_attention" and i == 3:  # log-decays <= 0
            make = lambda k, s=shape: -jax.nn.softplus(jax.random.normal(k, s))
        elif function == "linear_recurrence" and i == 0:  # gates in (0.5, 1)
            make = lambda k, s=shape: jax.random.uniform(k, s, minval=0.5, maxval=1.0)
        else:
            make = lambda k, s=shape: jax.random.normal(k, s)
        out.append(jax.jit(make, out_shardings=sh)(jax.random.key(i)))
    return out


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    out = {
        "temp_mb": ma.temp_size_in_bytes / 2**20,
        "args_mb": ma.argument_size_in_bytes / 2**20,
        "out_mb": ma.output_size_in_bytes / 2**20,
    }
    out["total_mb"] = out["temp_mb"] + out["args_mb"] + out["out_mb"]
    return out


def measure(function: str, t: int, devices: int, cfg) -> dict:
    """One record: the step's per-device memory, and its time when ``t <= cfg.time_max_t``."""
    import jax

    from benchmarks._timing import time_interleaved

    if devices == 1:
        mesh = None
        sharding = replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        mesh = jax.make_mesh((devices,), ("seq",), (jax.sharding.AxisType.Auto,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seq"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step, inputs = _step(function, mesh, cfg)
    rec = {"function": function, "T": t, "devices": devices, "T_per_device": t // devices}
    t0 = time.perf_counter()
    specs = _inputs(function, inputs, t, sharding, replicated, concrete=False)
    compiled = jax.jit(step).lower(*specs).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec.update(_memory(compiled))
    if t > cfg.time_max_t:
        rec["timed"] = False
        return rec
    args = _inputs(function, inputs, t, sharding, replicated, concrete=True)
    jax.block_until_ready(compiled(*args))
    timing = time_interleaved(
        {"step": lambda: compiled(*args)}, repeats=cfg.repeats, warmup=cfg.warmup
    )["step"]
    rec.update(
        timed=True,
        median_ms=1e3 * timing["median_s"],
        p10_ms=1e3 * timing["p10_s"],
        p90_ms=1e3 * timing["p90_s"],
        repeats=timing["repeats"],
    )
    return rec


def worker(devices: int, cfg) -> int:
    """Every function and T on ``devices`` simulated devices; prints the records as JSON."""
    import jax

    from benchmarks._environment import environment

    if jax.device_count() < devices:
        raise RuntimeError(f"expected {devices} devices, JAX sees {jax.device_count()}")
    records = [measure(f, t, devices, cfg) for f in cfg.functions for t in cfg.T]
    print("RESULT" + json.dumps({"records": records, "environment": environment()}))
    return 0


# ----------------------------------------------------------------------------- parent side


def _child(devices: int, argv: list[str]) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.sequence_parallel", *argv, "--worker", str(devices)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{devices} devices: the child failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.split("RESULT", 1)[1])


def _ratios(records: list[dict]) -> None:
    """``mem_vs_1`` and ``time_vs_1``: against the one-device record of the same function and T."""
    one = {(r["function"], r["T"]): r for r in records if r["devices"] == 1}
    for r in records:
        base = one.get((r["function"], r["T"]))
        if base is None:
            continue
        r["mem_vs_1"] = r["total_mb"] / base["total_mb"]
        if r.get("median_ms") and base.get("median_ms"):
            r["time_vs_1"] = r["median_ms"] / base["median_ms"]


def summary(records: list[dict]) -> list[str]:
    """The acceptance figure: per-device memory on 8 devices against one at T = 65536."""
    lines = []
    for f in FUNCTIONS:
        r = next(
            (
                r
                for r in records
                if r["function"] == f and r["T"] == ACCEPTANCE_T
                and r["devices"] == ACCEPTANCE_DEVICES and "mem_vs_1" in r
            ),
            None,
        )  # fmt: skip
        if r is None:
            continue
        verdict = "meets" if r["mem_vs_1"] <= 0.25 else "misses"
        lines.append(
            f"- `{f}` at T={ACCEPTANCE_T}: {r['total_mb']:.1f} MiB per device on "
            f"{ACCEPTANCE_DEVICES} devices, {r['mem_vs_1']:.3f} of one device's "
            f"({verdict} the target of at most 1/4)"
        )
    return lines


def plot(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, f in enumerate(FUNCTIONS):
        for col, (key, label) in enumerate(
            (("total_mb", "per-device memory, MiB"), ("median_ms", "fwd+bwd, median ms"))
        ):
            ax = axes[row][col]
            for n in sorted({r["devices"] for r in records}):
                rs = sorted(
                    (r for r in records if r["function"] == f and r["devices"] == n and key in r),
                    key=lambda r: r["T"],
                )
                if rs:
                    name = "1 device (plain)" if n == 1 else f"{n} simulated devices"
                    ax.plot([r["T"] for r in rs], [r[key] for r in rs], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (steps)")
            ax.set_ylabel(label)
            ax.set_title(f)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Sequence parallelism on simulated CPU devices (memory carries over, time not)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg, argv: list[str]) -> int:
    from benchmarks._output import format_table, progress, write_results

    records, env = [], {}
    for n in progress(cfg.devices, "devices", quiet=cfg.quiet):
        out = _child(n, argv)
        records += out["records"]
        env = out["environment"] if n == max(cfg.devices) else env or out["environment"]
    _ratios(records)
    records.sort(key=lambda r: (r["function"], r["T"], r["devices"]))
    print(format_table(records, COLUMNS))
    lines = summary(records)
    print("\n".join(lines))
    env["device_counts"] = ",".join(str(n) for n in cfg.devices)
    extra = "## Acceptance\n\n" + "\n".join(lines) if lines else None
    paths = write_results(
        cfg.out,
        "sequence_parallel",
        records,
        env,
        COLUMNS,
        extra_md=extra,
        title="Sequence parallelism: per-device memory and time of the split recurrences",
    )
    png = Path(cfg.out) / "sequence_parallel.png"
    plot(records, png)
    print(f"wrote {paths['json']}, {paths['md']}, {png}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/sequence_parallel")
    ap.add_argument("--quick", action="store_true", help=f"T in {T_QUICK}, {DEVICES_QUICK} devices")
    ap.add_argument("--T", default=None, help="comma list of T (default 2^10 ... 2^20)")
    ap.add_argument("--devices", default=None, help="comma list of device counts (1,2,4,8)")
    ap.add_argument("--functions", default=",".join(FUNCTIONS))
    ap.add_argument("--time-max-T", dest="time_max_t", type=int, default=65536)
    ap.add_argument("-B", "--batch", type=int, default=1)
    ap.add_argument("-K", "--heads", type=int, default=4)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("-H", "--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    cfg.T = tuple(int(v) for v in cfg.T.split(",")) if cfg.T else (T_QUICK if cfg.quick else T_FULL)
    cfg.devices = (
        tuple(int(v) for v in cfg.devices.split(","))
        if cfg.devices
        else (DEVICES_QUICK if cfg.quick else DEVICES_FULL)
    )
    cfg.functions = tuple(cfg.functions.split(","))
    bad = [f for f in cfg.functions if f not in FUNCTIONS]
    if bad:
        ap.error(f"--functions: unknown {bad}; choose from {FUNCTIONS}")
    bad = [t for t in cfg.T for n in cfg.devices if t % n]
    if bad:
        ap.error(f"--T: {bad} do not split evenly over --devices {cfg.devices}")
    if cfg.quick:
        cfg.repeats, cfg.warmup = min(cfg.repeats, 2), min(cfg.warmup, 1)
    if cfg.worker is not None:
        return worker(cfg.worker, cfg)
    return run(cfg, argv)


if __name__ == "__main__":
    sys.exit(main())
