"""Measurements in child processes: a compile-time budget, and peak memory.

* :class:`CompileBudgetRunner` runs a measurement in a persistent child and stops
  it when its compilation exceeds a time budget (for Python-unrolled loops whose
  compile time grows with T). The child is this module run as
  ``python -m benchmarks._processes --worker``; it learns when compilation starts
  and ends from the hook :func:`benchmarks._timing.compile_jitted` calls.
* :func:`peak_memory_subprocess` -- peak RSS of a command run in a child process.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks._timing import skipped

__all__ = ["CompileBudgetRunner", "child_env", "peak_memory_subprocess"]

_ROOT = str(Path(__file__).resolve().parent.parent)


def child_env(base=None) -> dict:
    """``base`` (default: this process's environment) with the repository on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _target(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"target: expected 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _worker_main() -> None:
    """Child side of :class:`CompileBudgetRunner`: JSON requests on stdin, events on stdout."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything the measured code prints stays off the protocol

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    # The measured code times with ``benchmarks._timing``: the hook goes on that module.
    timing = importlib.import_module("benchmarks._timing")
    timing._EVENT_HOOK = lambda event, value: send({"event": event, "value": value})
    send({"event": "ready"})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            result = _target(req["target"])(**req["kwargs"])
        except Exception as e:  # reported to the parent as an error record
            result = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        send({"event": "result", "value": result})


class CompileBudgetRunner:
    """Runs measurements in a child process and stops any whose compile exceeds a budget.

    ``run("pkg.module:function", kwargs)`` calls ``function(**kwargs)`` in a
    persistent child (JAX imported once) and returns its dict. The function
    measures with :func:`time_jitted`, which reports when compilation starts
    and ends; if it has not ended ``budget_s`` seconds after it started, the
    child is killed (and restarted for the next request) and the result is
    ``skipped("compile exceeded the budget ...")``. ``run_timeout_s`` bounds
    everything else (tracing before the compile counts towards the budget).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, budget_s: float = 60.0, run_timeout_s: float = 600.0, env=None):
        if not budget_s > 0:
            raise ValueError(f"budget_s: expected a positive number of seconds, got {budget_s!r}")
        self.budget_s = float(budget_s)
        self.run_timeout_s = float(run_timeout_s)
        self._env = env
        self._proc: subprocess.Popen | None = None
        self._events: queue.Queue | None = None
        self._stderr = None

    # -- child management -------------------------------------------------------------
    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._processes", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=_ROOT,
            env=child_env(self._env),
        )
        events: queue.Queue = queue.Queue()
        proc = self._proc

        def pump():
            for line in proc.stdout:
                try:
                    events.put(json.loads(line))
                except json.JSONDecodeError:
                    continue
            events.put(None)  # end of stream: the child exited

        threading.Thread(target=pump, daemon=True).start()
        self._events = events
        self._expect("ready", self.run_timeout_s)

    def _stderr_tail(self, n: int = 800) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-n:].strip()

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if self._stderr is not None:
            self._stderr.close()
        self._proc, self._events, self._stderr = None, None, None

    def close(self) -> None:
        """Stops the child process."""
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- protocol ---------------------------------------------------------------------
    class _Timeout(Exception):
        pass

    class _Died(Exception):
        pass

    def _next(self, deadline: float) -> dict:
        try:
            msg = self._events.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise self._Timeout from None
        if msg is None:
            raise self._Died
        return msg

    def _expect(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline)
            if msg["event"] == event:
                return msg

    def run(self, target: str, kwargs: dict) -> dict:
        """``target(**kwargs)`` in the child, under the compile budget; returns its dict."""
        try:
            if self._proc is None:
                self._start()
            self._proc.stdin.write(json.dumps({"target": target, "kwargs": kwargs}) + "\n")
            self._proc.stdin.flush()
            deadline = time.monotonic() + self.run_timeout_s
            compile_deadline = None
            while True:
                wait_until = deadline if compile_deadline is None else compile_deadline
                try:
                    msg = self._next(wait_until)
                except self._Timeout:
                    if compile_deadline is not None:
                        self._kill()
                        return skipped(
                            f"compile exceeded the {self.budget_s:g} s budget "
                            f"(stopped after {self.budget_s:g} s)"
                        )
                    self._kill()
                    return skipped(f"run exceeded {self.run_timeout_s:g} s (stopped)")
                if msg["event"] == "compile_start":
                    compile_deadline = time.monotonic() + self.budget_s
                elif msg["event"] == "compile_end":
                    compile_deadline = None
                    if msg["value"] > self.budget_s:  # finished, but late (this side was slow)
                        self._kill()
                        return skipped(
                            f"compile exceeded the {self.budget_s:g} s budget "
                            f"(took {msg['value']:.3g} s)"
                        )
                elif msg["event"] == "result":
                    return msg["value"]
        except (self._Died, BrokenPipeError, OSError):
            tail = self._stderr_tail()
            self._kill()
            return {"status": "error", "reason": f"worker process died: {tail}"}
        except self._Timeout:
            self._kill()
            return skipped(f"worker did not start within {self.run_timeout_s:g} s")


def peak_memory_subprocess(
    module_or_code: str, args: Sequence[str] = (), timeout_s: float = 600.0
) -> dict:
    """Runs ``python -m module_or_code *args`` (or ``python -c code`` when it is not a
    dotted module name) and returns its peak resident memory.

    Returns ``{"status": "ok", "peak_rss_mb", "returncode", "wall_s", "stdout"}``,
    ``skipped`` on timeout, or ``{"status": "error", ...}`` on a non-zero exit.
    """
    is_module = all(part.isidentifier() for part in module_or_code.split("."))
    cmd = [sys.executable, "-m" if is_module else "-c", module_or_code, *map(str, args)]
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=_ROOT, env=child_env())
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
                os.wait4(proc.pid, 0)
                return skipped(f"exceeded {timeout_s:g} s (stopped)")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        rec = {
            "status": "ok" if proc.returncode == 0 else "error",
            # ru_maxrss is KiB on Linux, bytes on macOS.
            "peak_rss_mb": usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10),
            "returncode": proc.returncode,
            "wall_s": wall_s,
            "stdout": out.read()[-4000:],
        }
        if proc.returncode != 0:
            rec["reason"] = err.read()[-1000:]
        return rec


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m benchmarks._processes --worker  (internal)")
