"""Shared benchmark harness: timing, FLOP counts, environment, result files.

Every benchmark script imports these names (their signatures are fixed):

* :func:`environment` -- versions, backend, device, CPU, threads, XLA_FLAGS, peers.
* :func:`time_jitted` -- jit ``fn``; time lower+compile apart, the first call,
  then ``warmup`` untimed and ``repeats`` timed calls with ``block_until_ready``.
* :func:`time_callable` -- the same keys for any callable (torch, ...).
* :func:`skipped` -- the record of a configuration that was not run, with why.
* :func:`write_results` -- ``<name>.json`` (environment + records) and
  ``<name>.md`` (a Markdown table + the environment).
* :func:`progress` -- a tqdm bar, off when stdout is not a terminal or ``quiet``.
* :func:`peak_memory_subprocess` -- peak RSS of a command run in a child process.

Also here: :func:`rnn_flops` (the FLOP formulas every script uses) and
:class:`CompileBudgetRunner`, which runs a measurement in a child process and
stops it when its compilation exceeds a time budget (for Python-unrolled loops
whose compile time grows with T).

Timing records (``status == "ok"``) hold seconds: ``compile_s`` (trace + lower +
XLA compile; None for non-JAX callables), ``first_call_s``, ``median_s``,
``min_s``, ``p10_s``, ``p90_s`` and ``repeats``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CompileBudgetRunner",
    "GATES",
    "environment",
    "format_table",
    "jax_thread_count",
    "peak_memory_subprocess",
    "progress",
    "rnn_flops",
    "skipped",
    "compile_jitted",
    "time_callable",
    "time_interleaved",
    "time_jitted",
    "write_results",
]

# Gate blocks per cell: the recurrent and input matmuls are [*, G*H] wide.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}

# Set by the compile-budget worker: called with ("compile_start", None) and
# ("compile_end", seconds) around every lower+compile in time_jitted.
_EVENT_HOOK: Callable[[str, Any], None] | None = None


def _emit(event: str, value: Any = None) -> None:
    if _EVENT_HOOK is not None:
        _EVENT_HOOK(event, value)


# ----------------------------------------------------------------------------- FLOPs


def rnn_flops(cell: str, batch: int, input_size: int, hidden: int, steps: int, training: bool):
    """Matmul FLOPs of a rollout: ``T * 2*B*G*H*(D+H)`` forward, 3x that for a training step.

    ``cell`` is ``"rnn"`` (G=1), ``"lstm"`` (G=4) or ``"gru"`` (G=3). Elementwise gate
    math is not counted; the backward pass is counted as twice the forward
    (input and weight gradients), so training = 3x forward.
    """
    g = GATES[cell]
    fwd = steps * 2 * batch * g * hidden * (input_size + hidden)
    return 3 * fwd if training else fwd


def gflops(flops: float | None, seconds: float | None) -> float | None:
    """``flops / seconds / 1e9``, None when either is missing."""
    if not flops or not seconds:
        return None
    return flops / seconds / 1e9


# ----------------------------------------------------------------------------- environment


def jax_thread_count() -> int:
    """Threads XLA's CPU backend uses for one computation: the cores this process may use.

    (``--xla_cpu_multi_thread_eigen=false`` does not limit it: XLA's CPU matmuls run
    through its own thread pool. Restrict the process instead, e.g. ``taskset -c 0``.)
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _jaxseq_version() -> str:
    try:
        import jaxseq

        return jaxseq.__version__
    except ImportError:
        return _version("jaxseq")


def environment() -> dict:
    """Where a result came from: versions, backend, device, CPU, threads, flags, date (UTC)."""
    import jax

    devices = jax.devices()
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "jaxseq": _jaxseq_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else "none",
        "device_count": len(devices),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_cpu_threads": jax_thread_count(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = os.environ.get(var, "")
    try:  # other work on the machine inflates times; say how busy it was
        env["load_avg_1_5_15m"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    env["numpy"] = np.__version__
    env["flax"] = _version("flax")
    env["haiku"] = _version("dm-haiku")
    env["torch"] = _version("torch")
    if "torch" in sys.modules:  # only report torch threads when a script imported it
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


# ----------------------------------------------------------------------------- timing


def _block(out):
    """Waits for every JAX array in ``out`` (other leaves are already computed)."""
    try:
        import jax
    except ImportError:  # pragma: no cover
        return out
    for leaf in jax.tree_util.tree_leaves(out):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return out


def _summary(times: Sequence[float], compile_s, first_call_s, lower_s=None) -> dict:
    t = np.asarray(times, dtype=np.float64)
    rec = {
        "status": "ok",
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        "median_s": float(np.median(t)),
        "min_s": float(t.min()),
        "p10_s": float(np.percentile(t, 10)),
        "p90_s": float(np.percentile(t, 90)),
        "repeats": int(t.size),
    }
    if lower_s is not None:
        rec["lower_s"] = lower_s
    return rec


def _timed_loop(call: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        _block(call())
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _block(call())
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return times


def _check_counts(repeats: int, warmup: int) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected a non-negative int, got {warmup!r}")


def compile_jitted(fn: Callable, *args) -> tuple[Callable[[], Any], dict]:
    """Jits, lowers and compiles ``fn`` for ``args`` and runs it once.

    Returns ``(call, info)``: ``call()`` runs the compiled program on ``args``;
    ``info`` holds ``compile_s`` (trace + lower + compile), ``lower_s`` and
    ``first_call_s``.
    """
    import jax

    jitted = jax.jit(fn)
    _emit("compile_start")
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    _emit("compile_end", compile_s)
    t0 = time.perf_counter()
    _block(compiled(*args))
    first_call_s = time.perf_counter() - t0
    info = {"compile_s": compile_s, "lower_s": lower_s, "first_call_s": first_call_s}
    return (lambda: compiled(*args)), info


def time_jitted(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> dict:
    """Times ``jax.jit(fn)(*args)``; ``fn`` must not be jitted yet.

    ``compile_s`` is trace + lower + XLA compile (``lower_s`` the first part),
    measured apart from ``first_call_s`` (the first execution of the compiled
    program); then ``warmup`` untimed and ``repeats`` timed calls, each waited
    for with ``block_until_ready``.
    """
    _check_counts(repeats, warmup)
    call, info = compile_jitted(fn, *args)
    times = _timed_loop(call, repeats, warmup)
    return _summary(times, info["compile_s"], info["first_call_s"], lower_s=info["lower_s"])


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    repeats: int = 10,
    warmup: int = 2,
    info: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Times several zero-argument callables side by side, one call of each per round.

    Rounds rotate the order, so a change in machine load during the
    measurement hits every contender alike. ``info[name]`` (e.g. from
    :func:`compile_jitted`) supplies ``compile_s``/``first_call_s``; returns a
    timing dict (the keys of :func:`time_jitted`) per name.
    """
    _check_counts(repeats, warmup)
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            _block(calls[n]())
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names) if names else 0
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                _block(calls[n]())
                samples[n].append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    info = info or {}
    out = {}
    for n in names:
        i = info.get(n, {})
        out[n] = _summary(samples[n], i.get("compile_s"), i.get("first_call_s"), i.get("lower_s"))
    return out


def time_callable(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> dict:
    """Times ``fn(*args)`` for any callable; same keys as :func:`time_jitted`, ``compile_s=None``.

    ``fn`` must return a value that is already computed (e.g. a torch tensor
    after a synchronous CPU op, or ``loss.item()``); JAX arrays in the result
    are waited for anyway.
    """
    _check_counts(repeats, warmup)
    t0 = time.perf_counter()
    _block(fn(*args))
    first_call_s = time.perf_counter() - t0
    times = _timed_loop(lambda: fn(*args), repeats, warmup)
    return _summary(times, None, first_call_s)


def skipped(reason: str) -> dict:
    """The record of a configuration that was not measured."""
    return {"status": "skipped", "reason": str(reason)}


# ----------------------------------------------------------------------------- compile budget


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

    # Run as ``python -m benchmarks._harness`` this module is ``__main__``; the measured
    # code imports ``benchmarks._harness``, so the hook goes on that module.
    harness = importlib.import_module("benchmarks._harness")
    harness._EVENT_HOOK = lambda event, value: send({"event": event, "value": value})
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
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ if self._env is None else self._env)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._harness", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=root,
            env=env,
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


# ----------------------------------------------------------------------------- memory


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
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=root, env=env)
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


# ----------------------------------------------------------------------------- output


def progress(iterable: Iterable, desc: str, *, quiet: bool = False, total: int | None = None):
    """A tqdm bar over ``iterable``; disabled when stdout is not a terminal or ``quiet``."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=quiet or not sys.stdout.isatty(),
        leave=False,
        dynamic_ncols=True,
    )


def _scalar(v) -> bool:
    return v is None or isinstance(v, str | bool | int | float | np.integer | np.floating)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float | np.floating):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}" if a < 1000 else f"{v:.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def format_table(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per record, ``columns`` (default: every scalar key seen)."""
    if columns is None:
        columns = []
        for rec in records:
            for k, v in rec.items():
                if k not in columns and _scalar(v):
                    columns.append(k)
    if not columns:
        return ""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for rec in records:
        lines.append("| " + " | ".join(_fmt(rec.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(
    out_dir,
    name: str,
    records: list[dict],
    env: dict,
    columns: list[str] | None = None,
    *,
    extra_md: str | None = None,
    title: str | None = None,
) -> dict:
    """Writes ``out_dir/<name>.json`` and ``out_dir/<name>.md``; returns their paths.

    The JSON is ``{"environment": env, "records": records}``; the Markdown holds
    ``title``, the table of ``records`` (``columns``, default every scalar key),
    ``extra_md`` (optional further sections) and the environment as a list.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    payload = {"environment": _jsonable(env), "records": _jsonable(list(records))}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    parts = [f"# {title or name}", "", format_table(records, columns), ""]
    if extra_md:
        parts += [extra_md.rstrip(), ""]
    parts += ["## Environment", ""]
    parts += [f"- {k}: `{_fmt(v) if v != '' else '(unset)'}`" for k, v in env.items()]
    md_path.write_text("\n".join(parts) + "\n")
    return {"json": str(json_path), "md": str(md_path)}


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m benchmarks._harness --worker  (internal)")
