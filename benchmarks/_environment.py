"""Where a result came from: versions, backend, device, CPU model, threads, flags."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import os
import platform
import sys

import numpy as np

__all__ = ["cpu_model", "environment", "jax_thread_count", "package_version"]


def jax_thread_count() -> int:
    """Threads XLA's CPU backend uses for one computation: the cores this process may use.

    (``--xla_cpu_multi_thread_eigen=false`` does not limit it: XLA's CPU matmuls run
    through its own thread pool. Restrict the process instead, e.g. ``taskset -c 0``.)
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU flags that decide whether bfloat16 pays: AMX tiles (Intel Sapphire Rapids and
#: later), AVX512-BF16 (bf16 dot products in vector registers: Intel Cooper Lake and
#: later, AMD Zen 4 and later), AVX512F and AVX2.
CPU_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_features() -> str:
    """The bfloat16-relevant CPU flags present (``/proc/cpuinfo``), e.g.
    ``"avx512_bf16 avx512f avx2"``; ``"none"`` when none is, ``"unknown"`` off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    have = [x for x in CPU_FEATURES if x in flags]
                    return " ".join(have) if have else "none"
    except OSError:
        pass
    return "unknown"


def module_available(name: str) -> bool:
    """Whether module ``name`` can be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def package_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _jaxseq_version() -> str:
    try:
        import jaxseq

        return jaxseq.__version__
    except ImportError:
        return package_version("jaxseq")


def _host_memory() -> str:
    """jaxseq's malloc settings in this process (``jaxseq.host_memory``; the
    ``benchmarks`` package imports jaxseq first)."""
    import jaxseq

    s = jaxseq.host_memory.state()
    return s["policy"] if s["policy"] == "keep" else f"{s['policy']} ({s['reason']})"


def environment() -> dict:
    """Where a result came from: versions, backend, device, CPU, threads, flags, date (UTC)."""
    import jax

    devices = jax.devices()
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "jaxseq": _jaxseq_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else "none",
        "device_count": len(devices),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "jax_cpu_threads": jax_thread_count(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "host_memory": _host_memory(),
    }
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = os.environ.get(var, "")
    try:  # other work on the machine inflates times; say how busy it was
        env["load_avg_1_5_15m"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    env["numpy"] = np.__version__
    env["flax"] = package_version("flax")
    env["haiku"] = package_version("dm-haiku")
    env["torch"] = package_version("torch")
    if "torch" in sys.modules:  # only report torch threads when a script imported it
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env
