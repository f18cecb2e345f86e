"""What ``jaxseq.host_memory`` buys: train steps with glibc's ``malloc`` keeping XLA's
per-call buffer (policy ``keep``, jaxseq's default) and left as it is (``system``).

Question: XLA:CPU allocates one temporary buffer per call of a compiled program and
frees it at the end; glibc serves blocks over 32 MiB with ``mmap``, so every call
faulted the buffer in again, page by page. How much of a train step was that, and
what do the settings that keep the buffer cost elsewhere (PyTorch's steps in the same
process)?

The settings are made once per process, at jaxseq's import, so the two policies cannot
share a process: each workload and policy runs in a fresh child process
(``JAXSEQ_HOST_MEMORY=keep`` or ``system``), in rounds that alternate which policy
runs first; medians over the rounds. Per child: ``--warmup`` untimed steps, then
``--steps`` timed steps, each to ``block_until_ready``; the median step, and per step
the minor page faults and the kernel (system) CPU time, from ``getrusage``.

Usage::

    python -m benchmarks.host_memory --out results/host_memory [--rounds 3] [--quick]

Writes ``host_memory.json``, ``host_memory.md`` and ``host_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks._environment import environment, module_available
from benchmarks._output import format_table, progress, write_results
from benchmarks._processes import child_env
from benchmarks._timing import skipped

POLICIES = ("system", "keep")
TORCH_WORKLOADS = ("torch transformer_lm fp32", "torch transformer_lm bf16")


def _transformer_lm():
    """The Transformer char LM of ``benchmarks.transformer_e2e`` (both sides' model)."""
    import jaxseq as js

    return js.models.transformer_lm(65, num_layers=4, d_model=256, num_heads=4, max_len=64,
                                    positions="learned")  # fmt: skip


def _lm_step(lm, batch: int, seq: int, reset_every_chunk: bool):
    """``step()``: one jaxseq train step (Adam, clip 1.0) on a fixed chunk, and the
    program's temporary buffer in bytes."""
    import jax

    import jaxseq as js
    from benchmarks.transformer_e2e import markov_ids

    ids = markov_ids(max(20_000, 4 * batch * seq), 65, 0)
    batcher = js.data.StreamBatcher(
        ids, batch, seq, vocab_size=65, reset_every_chunk=reset_every_chunk
    )
    opt = js.make_optimizer("adam", 1e-3, max_norm=1.0)
    state = js.init_state(lm.init(jax.random.key(0)), opt, jax.random.key(1),
                          lm.initial_carry((batch,)))  # fmt: skip
    train = js.make_train_step(js.training.lm_loss_fn(lm), opt)
    chunk = batcher.at_step(0)
    temp = train.lower(state, chunk).compile().memory_analysis().temp_size_in_bytes
    box = [state]

    def step():
        box[0], metrics = train(box[0], chunk)
        return jax.block_until_ready(metrics["loss"])

    return step, temp


def _rollout_step(batch: int, hidden: int, length: int):
    import jax
    import jax.numpy as jnp

    import jaxseq as js

    cell = js.LSTM(hidden)
    params = cell.init(jax.random.key(0), hidden)
    xs = jax.random.normal(jax.random.key(1), (length, batch, hidden))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(js.rollout(cell, p, xs)[1] ** 2)))
    temp = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    return (lambda: jax.block_until_ready(grad(params))), temp


def _torch_step(precision: str):
    import jax
    import torch

    from benchmarks import transformer_e2e as te

    args = te.parse_args(["--quiet"])
    params = _transformer_lm().init(jax.random.key(0))
    step = te.make_torch_step(te.build_torch_lm(args, params), precision,
                              1e-3)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 65, (32, 64), generator=gen) for _ in range(2))
    return (lambda: step(x, y)), None


def _workloads(quick: bool) -> dict:
    """``{name: build}``, ``build() -> (step, temp_bytes or None)``, built on demand."""
    import jaxseq as js

    if quick:
        return {"rollout lstm (8, 32, 20)": lambda: _rollout_step(8, 32, 20)}
    return {
        "transformer_lm fp32": lambda: _lm_step(_transformer_lm(), 32, 64, True),
        "char_lm lstm": lambda: _lm_step(js.char_lm(65, cell="lstm"), 32, 64, False),
        "char_lm gru": lambda: _lm_step(js.char_lm(65, cell="gru"), 32, 64, False),
        "rollout lstm (32, 256, 100)": lambda: _rollout_step(32, 256, 100),
        "torch transformer_lm fp32": lambda: _torch_step("fp32"),
        "torch transformer_lm bf16": lambda: _torch_step("bf16"),
    }


def _child(name: str, quick: bool, warmup: int, steps: int) -> dict:
    """One workload in this (fresh) process, under the policy its environment set."""
    import jaxseq as js

    step, temp = _workloads(quick)[name]()
    for _ in range(warmup):
        step()
    times, faults, sys_s = [], [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        sys_s.append(after.ru_stime - before.ru_stime)
    return {
        "step_ms": 1e3 * statistics.median(times),
        "faults": statistics.median(faults),
        "sys_ms": 1e3 * statistics.median(sys_s),
        "temp_mb": None if temp is None else temp / 2**20,
        "state": js.host_memory.state(),
    }


def _run_child(name: str, policy: str, args) -> dict:
    env = child_env()
    env["JAXSEQ_HOST_MEMORY"] = policy
    cmd = [sys.executable, "-m", "benchmarks.host_memory", "--child", name]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--quick"] if args.quick else []
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or "RESULT" not in r.stdout:
        return {"status": "error", "reason": r.stderr[-1000:]}
    return json.loads(r.stdout.split("RESULT", 1)[1])


def _record(name: str, runs: dict) -> dict:
    rec = {"workload": name}
    for p in POLICIES:
        ok = [r for r in runs[p] if "step_ms" in r]
        if not ok:
            return {**rec, "status": "error", "reason": runs[p][0]["reason"]}
        if ok[0]["state"]["policy"] != p:  # the child did not get the policy asked for
            return {**rec, "status": "error", "reason": f"{p}: {ok[0]['state']}"}
        rec[f"{p}_ms"] = statistics.median(r["step_ms"] for r in ok)
        rec[f"{p}_faults"] = statistics.median(r["faults"] for r in ok)
        rec[f"{p}_sys_ms"] = statistics.median(r["sys_ms"] for r in ok)
        rec["temp_mb"] = ok[0]["temp_mb"]
    rec["keep_over_system"] = rec["keep_ms"] / rec["system_ms"]
    return {**rec, "status": "ok"}


def measure(args) -> list[dict]:
    """Medians over ``args.rounds`` of each workload under each policy (the policy that
    runs first alternates between rounds)."""
    names = list(_workloads(args.quick))
    if not module_available("torch"):
        names = [n for n in names if n not in TORCH_WORKLOADS]
    runs = {n: {p: [] for p in POLICIES} for n in names}
    order = [(n, p) for r in range(args.rounds) for n in names
             for p in (POLICIES if r % 2 == 0 else POLICIES[::-1])]  # fmt: skip
    for n, p in progress(order, "children", quiet=args.quiet):
        runs[n][p].append(_run_child(n, p, args))
    records = [_record(n, runs[n]) for n in names]
    if not module_available("torch") and not args.quick:
        records += [{"workload": n, **skipped("torch not installed")} for n in TORCH_WORKLOADS]
    return records


def _plot(path, records) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(ok))))
    ax.barh([r["workload"] for r in ok], [r["keep_over_system"] for r in ok], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("step time, keep / system (lower: keeping the buffer pays)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/host_memory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="one tiny workload, one round")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT" + json.dumps(_child(args.child, args.quick, args.warmup, args.steps)))
        return {}
    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 1, 3
    records = measure(args)
    print(format_table(records))
    paths = write_results(args.out, "host_memory", records, environment(),
                          title="Train steps with malloc keeping XLA's buffer, and without")  # fmt: skip
    _plot(f"{args.out}/host_memory.png", records)
    print(f"wrote {paths['json']}, {paths['md']}")
    return {"records": records, "paths": paths}


if __name__ == "__main__":
    main()
