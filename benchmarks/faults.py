"""Faults injected into real training runs, many times over: how many were survived
with nothing lost beyond the step in flight, and how long a dead process takes to
be noticed.

Each trial runs ``tests/_fault_driver.py`` (a small LSTM language model trained by
``js.fit`` with a checkpoint every 3 of 16 steps) in subprocesses and hurts it:

- ``sigterm``: SIGTERM after a random step; the run must exit 143 with a
  checkpoint at the step it reached, and its resume must log exactly the losses
  of an uninterrupted run;
- ``kill-in-save``: SIGKILL inside the write of the checkpoint of step 3, 6, 9,
  12 or 15; the resume must start from the one before and match exactly;
- ``damaged``: the newest checkpoint's array files truncated, or its metadata
  deleted; the resume must name it, start from the one before and match;
- ``batch-source``: the source raises at a random step; the last good step
  must be checkpointed and the resume must match;
- ``lost-process``: one of two processes (over localhost) SIGKILLed at a random
  step; the other must exit 75 naming it, and the seconds from the death to
  that exit are recorded.

    python -m benchmarks.faults --trials 6

prints a table and writes ``faults.json`` (every trial, and the environment) under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "_fault_driver.py"
STEPS = 16


def driver_env(cache, **extra) -> dict:
    """The environment of a driver run: this one's, without ``JAXSEQ_*`` settings, with
    ``extra`` and a persistent compilation cache shared by the runs (same programs, so
    the same bits)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSEQ_")}
    env.update(
        PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra,
    )  # fmt: skip
    return env


def start_driver(cache, out, *args, **env) -> subprocess.Popen:
    """Starts ``tests/_fault_driver.py`` on ``out`` with ``args``; output to a pipe."""
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(out), *map(str, args)], env=driver_env(cache, **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


_start = start_driver


def _run(cache, out, *args):
    p = _start(cache, out, *args)
    text, _ = p.communicate(timeout=300)
    return p.returncode, text


def _losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl"))}


def _resumed_exactly(cache, out, want, start) -> bool:
    rc, _ = _run(cache, out)
    done = json.loads((out / "done0.json").read_text()) if rc == 0 else {}
    return rc == 0 and done.get("start") == start and _losses(out) == want


def _wait_for_lines(proc, log, n) -> bool:
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return True


def sigterm(cache, work, want, rng):
    out = work / "run"
    p = _start(cache, out, "--slow", 0.1)
    at = rng.randint(2, 12)
    if not _wait_for_lines(p, out / "metrics.jsonl", at):
        return {"at": at, "survived": False}
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=300)
    m = re.search(r"preempted \(SIGTERM\) at step (\d+); checkpoint at step (\d+)", text)
    ok = p.returncode == 143 and bool(m) and m[1] == m[2]
    stop = int(m[1]) if m else None
    ok = ok and sorted(_losses(out)) == list(range(1, stop + 1))
    return {"at": at, "stop": stop, "survived": ok and _resumed_exactly(cache, out, want, stop)}


def kill_in_save(cache, work, want, rng):
    out = work / "run"
    k = rng.choice([3, 6, 9, 12, 15])
    rc, _ = _run(cache, out, "--kill-in-save", k)
    torn = any(p.name.startswith(f"{k}.") for p in (out / "ckpt").iterdir())
    ok = rc == -signal.SIGKILL and torn
    return {"at": k, "survived": ok and _resumed_exactly(cache, out, want, max(k - 3, 0))}


def damaged(cache, work, want, rng, ref):
    out = work / "run"
    shutil.copytree(ref, out)
    how = rng.choice(["truncate", "delete"])
    if how == "truncate":
        for f in (out / "ckpt" / "16" / "state").rglob("d/*"):
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    else:
        (out / "ckpt" / "16" / "meta" / "metadata").unlink()
    (out / "metrics.jsonl").unlink()
    rc, text = _run(cache, out)
    named = "step 16 is damaged" in text and "restoring step 15 instead" in text
    got = _losses(out) if rc == 0 else {}
    ok = rc == 0 and named and got == {16: want[16]}
    return {"how": how, "survived": ok}


def batch_source(cache, work, want, rng):
    out = work / "run"
    k = rng.randint(2, 15)
    rc, text = _run(cache, out, "--fail-at", k)
    ok = rc == 1 and f"making the batch of step {k}" in text
    ok = ok and sorted(_losses(out)) == list(range(1, k))
    return {"at": k, "survived": ok and _resumed_exactly(cache, out, want, k - 1)}


def start_pair(cache, out, *args) -> list:
    """Both processes of a two-process run of the driver (JAX's distributed runtime over
    localhost, one CPU device each)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform" not in f
    )
    pair = {"XLA_FLAGS": flags, "JAXSEQ_COORDINATOR": f"127.0.0.1:{port}"}
    pair["JAXSEQ_NUM_PROCESSES"] = "2"
    return [start_driver(cache, out, *args, **pair, JAXSEQ_PROCESS_ID=str(i)) for i in range(2)]


def lost_process(cache, work, rng):
    out = work / "run"
    k = rng.randint(2, 12)
    procs = start_pair(cache, out, "--steps", 40, "--slow", 0.05, "--die-at", k, "--heartbeat", 10)
    ends = [None, None]
    deadline = time.monotonic() + 300
    while None in ends and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.monotonic()
        time.sleep(0.01)
    texts = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        texts.append(p.communicate()[0])
    named = "process 1 is gone" in texts[0]
    ok = procs[0].returncode == 75 and procs[1].returncode == -signal.SIGKILL and named
    secs = ends[0] - ends[1] if None not in ends else None
    said = [line[:300] for line in texts[0].splitlines() if "fit:" in line or "F1" in line]
    return {
        "at": k, "survived": ok, "seconds_to_exit": None if secs is None else round(secs, 2),
        "returncodes": [p.returncode for p in procs], "said": said[-2:],
    }  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="trials of each fault")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/faults")
    p.add_argument("--only", default=None, help="comma-separated faults to inject (default: all)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        cache = tmp / "jax_cache"
        rc, text = _run(cache, tmp / "ref")
        if rc != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{text[-3000:]}")
        want = _losses(tmp / "ref")
        kinds = {
            "sigterm": lambda w: sigterm(cache, w, want, rng),
            "kill-in-save": lambda w: kill_in_save(cache, w, want, rng),
            "damaged": lambda w: damaged(cache, w, want, rng, tmp / "ref"),
            "batch-source": lambda w: batch_source(cache, w, want, rng),
            "lost-process": lambda w: lost_process(cache, w, rng),
        }
        if args.only:
            kinds = {k: v for k, v in kinds.items() if k in args.only.split(",")}
        results = {k: [] for k in kinds}
        jobs = [k for k in kinds for _ in range(args.trials)]
        for i, kind in enumerate(tqdm(jobs, unit="fault")):
            work = tmp / f"t{i}"
            work.mkdir()
            results[kind].append(kinds[kind](work))
            shutil.rmtree(work)

    from benchmarks._environment import environment

    env = environment()
    print(f"\n{env['cpu_model']}, {env['cpu_count']} cores, jax {env['jax']}")
    print(f"{'fault':<14} {'injected':>8} {'survived':>8}  details")
    for kind, rs in results.items():
        n_ok = sum(r["survived"] for r in rs)
        extra = ""
        if kind == "lost-process":
            secs = sorted(r["seconds_to_exit"] for r in rs if r["seconds_to_exit"] is not None)
            extra = f"seconds from the death to the other's exit: {secs}"
        elif kind == "sigterm":
            extra = "signal after step -> checkpointed step: " + ", ".join(
                f"{r['at']}->{r.get('stop')}" for r in rs
            )
        print(f"{kind:<14} {len(rs):>8} {n_ok:>8}  {extra}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "faults.json"), "w") as f:
        json.dump(
            {"trials": args.trials, "seed": args.seed, "environment": env, "results": results},
            f, indent=1,
        )  # fmt: skip
    return results


if __name__ == "__main__":
    main()
