"""Two real processes on JAX's distributed runtime (gloo collectives over localhost) train
a small LSTM language model data-parallel, each feeding half the streams: their
parameters equal those of one process with the whole batch, and a checkpoint the pair
wrote resumes exactly. One launch of the pair does both (tests/_dist_worker.py); the
one-process reference runs here meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxseq as js

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import _dist_worker as worker  # noqa: E402

TIMEOUT_S = 120  # a bound for a loaded machine; ~10-20 s on a quiet 2-core one


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    """One process, the whole batch: the plain train step, batch after batch."""
    model, batcher, opt = worker.build(js)
    state = worker.fresh_state(js, jax, model, opt)
    step = js.make_train_step(js.training.lm_loss_fn(model), opt)
    losses = []
    for s in range(worker.STEPS):
        state, m = step(state, batcher.at_step(s))
        losses.append(float(m["loss"]))
    val = js.evaluate_lm(model, state.params, batcher)
    return losses, worker.flat(jax, state.params), val


def _launch(out):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSEQ_")}
    flags = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )  # one CPU device per process
    env.update(
        XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
        JAXSEQ_COORDINATOR=f"127.0.0.1:{port}", JAXSEQ_NUM_PROCESSES="2",
    )  # fmt: skip
    procs = []
    for i in range(2):
        log = open(out / f"log{i}.txt", "w")  # noqa: SIM115 - closed after the wait
        p = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_dist_worker.py"), "--out", str(out)],
            env={**env, "JAXSEQ_PROCESS_ID": str(i)}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append((p, log))
    return procs


def _wait(procs, out):
    """Waits for both; on a failure or the time-out both are killed and their output shown."""
    failed = None
    try:
        for i, (p, _) in enumerate(procs):
            rc = p.wait(timeout=TIMEOUT_S)
            if rc != 0:
                failed = f"process {i} exited with {rc}"
                break
    except subprocess.TimeoutExpired:
        failed = f"the pair did not finish within {TIMEOUT_S} s"
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if failed:
        logs = "\n".join(
            f"--- process {i} ---\n" + (out / f"log{i}.txt").read_text()[-4000:] for i in range(2)
        )
        pytest.fail(f"{failed}\n{logs}")


def test_two_processes_train_as_one_and_resume_exactly(tmp_path):
    procs = _launch(tmp_path)
    try:
        want_losses, want_params, want_val = _reference()  # meanwhile, in this process
    finally:
        _wait(procs, tmp_path)
    recs = [json.loads((tmp_path / f"proc{i}.json").read_text()) for i in range(2)]
    half = worker.STREAMS // 2
    for i, r in enumerate(recs):
        assert r["started"] and (r["process"], r["processes"], r["devices"]) == (i, 2, 2)
        # each process fed half the streams: the global chunk's columns of its rows
        assert r["rows"] == [i * half, (i + 1) * half]
        assert r["batch_global_shape"] == [worker.CHUNK, worker.STREAMS]
        assert r["batch_local"] == r["batch_want"] == r["batch_local_from_local"]
        assert np.shape(r["batch_want"]) == (worker.CHUNK, half)
        # the carry is split by stream, each process holding its own half
        assert r["carry_global_shape"] == [worker.STREAMS, worker.HIDDEN]
        assert r["carry_local_shape"] == [[half, worker.HIDDEN]]
        assert r["steps"] == worker.STEPS and r["ckpt_steps"] == [worker.CKPT, worker.STEPS]

    # two processes with half the batch each == one process with the whole batch
    np.testing.assert_allclose(recs[0]["run_losses"], want_losses, rtol=1e-5, atol=1e-5)
    for got, want in zip(recs[0]["run_params"], want_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # parameters replicated: both processes hold the same values
    assert recs[1]["run_params"] == recs[0]["run_params"]
    # an evaluation over the two processes' streams == one process over all of them
    assert recs[0]["val_loss"] == recs[1]["val_loss"]
    np.testing.assert_allclose(recs[0]["val_loss"], want_val, rtol=1e-5)

    # the checkpoint of step CKPT, restored by the pair, continues exactly
    r = recs[0]
    assert r["restored_step"] == worker.CKPT
    assert recs[0]["restore_local_template"] and recs[1]["restore_local_template"]
    assert r["resumed_losses"] == r["run_losses"][worker.CKPT :]
    assert r["resumed_params"] == r["run_params"]

    # process 0 alone wrote the log (one line per step) and drew the progress bar
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, worker.STEPS + 1))
    assert "6/6" in (tmp_path / "log0.txt").read_text()
    assert "6/6" not in (tmp_path / "log1.txt").read_text()


def test_distributed_settings_from_flags_and_environment(monkeypatch):
    for k in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "DISTRIBUTED"):
        monkeypatch.delenv(f"JAXSEQ_{k}", raising=False)
    parser = js.training.add_distributed_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.coordinator, args.num_processes, args.process_id, args.distributed) == (
        None, None, None, False,
    )  # fmt: skip
    assert js.training.init_from_args(args) is False  # nothing given: one process

    monkeypatch.setenv("JAXSEQ_COORDINATOR", "10.0.0.1:8476")
    monkeypatch.setenv("JAXSEQ_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXSEQ_DISTRIBUTED", "1")
    parser = js.training.add_distributed_args(argparse.ArgumentParser())
    args = parser.parse_args(["--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id, args.distributed) == (
        "10.0.0.1:8476", 4, 3, True,
    )  # fmt: skip
    # incomplete or invalid settings are refused by name before JAX is touched
    with pytest.raises(ValueError, match="process_id: .*missing --process-id"):
        js.training.init_from_args(argparse.Namespace(coordinator="h:1", num_processes=2))
    with pytest.raises(ValueError, match=r"process_id: expected a value in \[0, num_processes=2"):
        js.training.init_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="coordinator_address: expected 'host:port'"):
        js.training.init_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match="num_processes: expected an int >= 1, got 0"):
        js.training.init_distributed("127.0.0.1:1234", 0, 0)
    monkeypatch.setenv("JAXSEQ_NUM_PROCESSES", "two")
    with pytest.raises(TypeError, match="JAXSEQ_NUM_PROCESSES: expected an int, got 'two'"):
        js.training.add_distributed_args(argparse.ArgumentParser())


def test_process_slice_and_local_batches_on_one_process():
    mesh = js.training.make_mesh(jax.devices()[:1])
    assert js.training.process_slice(mesh, 6) == slice(0, 6)
    batch = {"x": np.arange(12.0).reshape(3, 4)}
    # on one process a "local" batch is the whole batch: the same as before
    a = js.training.shard_batch(batch, mesh)["x"]
    b = js.training.shard_batch(batch, mesh, local=True)["x"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="size: expected a positive int"):
        js.training.process_slice(mesh, 0)
