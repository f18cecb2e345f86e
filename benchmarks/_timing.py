"""Timing: compile apart from steady state, warm-up, median of N with ``block_until_ready``.

* :func:`time_jitted` -- jit ``fn``; time lower+compile apart, the first call,
  then ``warmup`` untimed and ``repeats`` timed calls.
* :func:`compile_jitted` -- the compile half alone, for :func:`time_interleaved`.
* :func:`time_interleaved` -- several contenders side by side, one call of each
  per round, the order rotating.
* :func:`time_callable` -- the same keys for any callable (torch, ...).
* :func:`skipped` -- the record of a configuration that was not run, with why.

Timing records (``status == "ok"``) hold seconds: ``compile_s`` (trace + lower +
XLA compile; None for non-JAX callables), ``first_call_s``, ``median_s``,
``min_s``, ``p10_s``, ``p90_s`` and ``repeats``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "compile_jitted",
    "skipped",
    "time_callable",
    "time_interleaved",
    "time_jitted",
]

# Set by the compile-budget worker (``benchmarks._processes``): called with
# ("compile_start", None) and ("compile_end", seconds) around every lower+compile.
_EVENT_HOOK: Callable[[str, Any], None] | None = None


def _emit(event: str, value: Any = None) -> None:
    if _EVENT_HOOK is not None:
        _EVENT_HOOK(event, value)


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
    burst: int = 0,
) -> dict[str, dict]:
    """Times several zero-argument callables side by side, one call of each per round.

    Rounds rotate the order, so a change in machine load during the
    measurement hits every contender alike. ``info[name]`` (e.g. from
    :func:`compile_jitted`) supplies ``compile_s``/``first_call_s``; returns a
    timing dict (the keys of :func:`time_jitted`) per name.

    ``burst > 0``: in each round a contender runs one untimed call, then ``burst`` timed
    calls back to back (``repeats * burst`` samples each). For calls of a few
    milliseconds, which are slower right after another runtime's threads held the cores.
    """
    _check_counts(repeats, warmup)
    if not isinstance(burst, int) or burst < 0:
        raise ValueError(f"burst: expected a non-negative int, got {burst!r}")
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
                if burst:
                    _block(calls[n]())
                for _ in range(max(burst, 1)):
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
