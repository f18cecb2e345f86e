"""Faults injected for real into training runs in subprocesses (tests/_fault_driver.py):
SIGTERM at a random step, a SIGKILL between checkpoints and one inside a checkpoint
write, damaged files in the newest checkpoints, a batch source that raises, and one
of two processes killed.
Every resumed run must log exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

from benchmarks.faults import start_driver, start_pair

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 16
TIMEOUT_S = 180  # a bound for a loaded machine; each run takes a few seconds on a quiet one


def _start(tmp_path, out, *args, **env):
    # the runs share compiled executables: the suite's cache (tests/conftest.py) when
    # there is one
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path / "jax_cache"
    return start_driver(cache, out, *args, **env)


def _finish(proc):
    """``(returncode, output)``; a run past the time limit is killed and fails the test."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the run did not finish within {TIMEOUT_S} s:\n{out[-3000:]}")
    return proc.returncode, out


def _run(tmp_path, out, *args):
    return _finish(_start(tmp_path, out, *args))


def _losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl"))}


def _steps_on_disk(ckpt) -> list[int]:
    return sorted(int(p.name) for p in pathlib.Path(ckpt).iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``(directory, losses)`` of one uninterrupted run, made once for the module's tests
    (they only read it)."""
    tmp = tmp_path_factory.mktemp("reference")
    ref = tmp / "ref"
    rc, out = _run(tmp, ref)
    assert rc == 0, out[-3000:]
    return ref, _losses(ref)


def test_sigterm_at_a_random_step_saves_that_step_exits_143_and_resumes_exactly(
    tmp_path, reference
):
    run = tmp_path / "run"
    proc = _start(tmp_path, run, "--slow", "0.1")
    at = random.Random().randint(2, 10)
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (log.exists() and len(log.read_text().splitlines()) >= at):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended first"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 143, f"SIGTERM after step {at}: exit status {rc}\n{out[-3000:]}"
    m = re.search(r"fit: preempted \(SIGTERM\) at step (\d+); checkpoint at step (\d+)", out)
    assert m and m[1] == m[2], out[-3000:]
    stop = int(m[1])
    assert at <= stop < STEPS
    # nothing lost beyond the step in flight: a checkpoint and a log line for every step
    assert _steps_on_disk(run / "ckpt")[-1] == stop
    assert sorted(_losses(run)) == list(range(1, stop + 1))

    want = reference[1]
    rc, out = _run(tmp_path, run)
    assert rc == 0, out[-3000:]
    assert json.loads((run / "done0.json").read_text())["start"] == stop
    assert _losses(run) == want  # every step's loss, bit for bit


def test_a_sigkill_between_checkpoints_resumes_from_the_last_one_bit_for_bit(tmp_path, reference):
    run = tmp_path / "run"
    rc, out = _run(tmp_path, run, "--die-at", 11, "--die-rank", 0)  # killed after step 11
    assert rc == -signal.SIGKILL, out[-3000:]
    assert max(_losses(run)) in (10, 11)  # the last line may be lost
    start_steps = _steps_on_disk(run / "ckpt")
    assert start_steps[-1] in (6, 9), start_steps  # step 9's write may not have committed

    rc, out = _run(tmp_path, run)
    assert rc == 0, out[-3000:]
    assert json.loads((run / "done0.json").read_text())["start"] == start_steps[-1]
    assert _losses(run) == reference[1]  # every step's loss, bit for bit


def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_one_to_resume(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(tmp_path, run, "--kill-in-save", 9)
    want = reference[1]
    rc, out = _finish(proc)
    assert rc == -signal.SIGKILL, out[-3000:]
    names = sorted(p.name for p in (run / "ckpt").iterdir())
    # the write of step 9 was cut short: its temporary directory, no step 9
    assert any(n.startswith("9.") and "tmp" in n for n in names), names
    assert _steps_on_disk(run / "ckpt") == [3, 6]

    rc, out = _run(tmp_path, run)
    assert rc == 0, out[-3000:]
    assert json.loads((run / "done0.json").read_text())["start"] == 6
    assert _losses(run) == want
    assert not [p for p in (run / "ckpt").iterdir() if "tmp" in p.name]  # cleaned up


def test_damaged_newest_checkpoints_are_named_and_the_newest_intact_one_resumes(
    tmp_path, reference
):
    ref, want = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    assert _steps_on_disk(run / "ckpt") == [12, 15, 16]
    # the newest: every data file of its arrays truncated to half; the one before: one
    # file deleted (its metadata)
    data = [p for p in (run / "ckpt" / "16" / "state").rglob("d/*") if p.is_file()]
    assert data
    for p in data:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
    (run / "ckpt" / "15" / "meta" / "metadata").unlink()
    for p in (run / "metrics.jsonl", run / "done0.json"):
        p.unlink()

    rc, out = _run(tmp_path, run, "--strict")  # asked for strictness: refuses, names step 16
    assert rc != 0 and "CheckpointDamagedError: checkpoint: step 16 is damaged" in out, out[-3000:]
    assert not (run / "done0.json").exists()

    rc, out = _run(tmp_path, run)
    assert rc == 0, out[-3000:]
    assert "step 16 is damaged" in out and "restoring step 15 instead" in out, out[-3000:]
    assert "step 15 is damaged: its metadata cannot be read" in out, out[-3000:]
    assert "restoring step 12 instead" in out
    assert json.loads((run / "done0.json").read_text())["start"] == 12
    got = _losses(run)
    assert sorted(got) == list(range(13, STEPS + 1))
    assert got == {s: want[s] for s in got}


def test_a_raising_batch_source_saves_the_last_good_step_and_names_the_step(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(tmp_path, run, "--fail-at", 11)
    want = reference[1]
    rc, out = _finish(proc)
    assert rc == 1, out[-3000:]
    assert "OSError: the data file vanished (step 11)" in out  # the cause, shown first
    assert (
        "BatchSourceError: fit: the batch source raised OSError making the batch of step 11" in out
    ), out[-3000:]
    assert "the state after step 10 is in the checkpoint of step 10" in out
    assert _steps_on_disk(run / "ckpt")[-1] == 10
    assert sorted(_losses(run)) == list(range(1, 11))

    rc, out = _run(tmp_path, run)
    assert rc == 0, out[-3000:]
    assert json.loads((run / "done0.json").read_text())["start"] == 10
    assert _losses(run) == want


def _pair(tmp_path, out, *args):
    """Both processes of a two-process run (JAX's distributed runtime over localhost)."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path / "jax_cache"
    return start_pair(cache, out, *args, "--heartbeat", 10)


def test_a_killed_process_makes_the_other_exit_naming_it_and_both_resume(tmp_path):
    run = tmp_path / "run"
    procs = _pair(tmp_path, run, "--steps", 12, "--slow", 0.05, "--die-at", 5)
    try:
        ends = [None, None]
        deadline = time.monotonic() + TIMEOUT_S
        while None in ends and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.monotonic()
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outs = [p.communicate()[0] for p in procs]
    assert procs[1].returncode == -signal.SIGKILL, outs[1][-3000:]
    assert procs[0].returncode == 75, outs[0][-3000:]
    assert re.search(
        r"fit: process 0 of 2: process 1 is gone \(killed.*failed at step 6 ", outs[0]
    ), outs[0][-3000:]
    assert "restart every process to resume: the last complete checkpoint is step 3." in outs[0]
    assert ends[0] - ends[1] < 60  # bounded: no hang (about 2 s on a quiet machine)
    before = _losses(run)
    assert sorted(before) == [1, 2, 3, 4, 5]

    procs = _pair(tmp_path, run, "--steps", 12)  # restart both: resume from step 3
    for p in procs:
        rc, out = _finish(p)
        assert rc == 0, out[-3000:]
    assert json.loads((run / "done0.json").read_text()) == {
        "start": 3, "steps": 12, "stopped": "steps"
    }  # fmt: skip
    after = _losses(run)
    assert sorted(after) == list(range(1, 13))
    assert {s: after[s] for s in before} == before  # steps 4 and 5 again, the same losses


def test_sigterm_to_one_of_two_processes_stops_both_at_one_checkpointed_step(tmp_path):
    run = tmp_path / "run"
    procs = _pair(tmp_path, run, "--steps", 28, "--slow", 0.1)
    at = random.Random().randint(2, 8)
    log = run / "metrics.jsonl"  # written by process 0
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (log.exists() and len(log.read_text().splitlines()) >= at):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGTERM)  # the notice reaches process 1 alone
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, out in results:
        assert rc == 143, f"SIGTERM after step {at}: exit status {rc}\n{out[-3000:]}"
    m = re.search(
        r"fit: preempted \(SIGTERM\) at step (\d+); checkpoint at step (\d+)", results[0][1]
    )
    assert m and m[1] == m[2], results[0][1][-3000:]
    stop = int(m[1])
    assert at <= stop < 28
    assert _steps_on_disk(run / "ckpt")[-1] == stop  # written by both, at the same step
    assert sorted(_losses(run)) == list(range(1, stop + 1))

    procs = _pair(tmp_path, run, "--steps", 28)
    for p in procs:
        rc, out = _finish(p)
        assert rc == 0, out[-3000:]
    assert json.loads((run / "done1.json").read_text())["start"] == stop
    assert sorted(_losses(run)) == list(range(1, 29))
