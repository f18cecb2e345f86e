"""Host memory for XLA:CPU's per-call buffers: glibc's ``malloc`` keeps what it frees.

Every call of a compiled XLA:CPU program allocates one temporary buffer for all of
its intermediates (a train step's activations and gradients: hundreds of MB for a
small Transformer) and frees it when the call ends. glibc's ``malloc`` serves a
block over 32 MiB with ``mmap`` and returns it with ``munmap``, so every call
faulted its whole buffer in again, one zero-filled 4 KiB page at a time, in the
kernel (``benchmarks/README.md`` has the figures).

When jaxseq is imported before JAX has started a backend, it sets three ``mallopt``
options so that such blocks come from the heap and stay there for the next call:

- ``M_MMAP_MAX = 0``: no block is served by ``mmap``;
- ``M_ARENA_MAX = 1``: one arena for every thread. A per-thread arena falls back to
  ``mmap`` for a block larger than its 64 MiB heap whatever ``M_MMAP_MAX`` says, and
  XLA's own threads allocate the buffer;
- ``M_TRIM_THRESHOLD = 1 GiB``: freed memory at the heap's top goes back to the
  system only past 1 GiB.

The costs: the process keeps the memory it freed (up to 1 GiB at the heap's top, and
any freed block below it) for its next allocations, and threads allocating at the
same moment share one arena's lock (PyTorch's bf16 autocast on a CPU, in the same
process, measured slower). Set ``JAXSEQ_HOST_MEMORY=system`` in the environment to
leave ``malloc`` as it is. Nothing is changed where it would not help: another C
library than glibc, a JAX backend that had already started (its threads have their
own arenas), or JAX set up for an accelerator (``JAX_PLATFORMS`` naming another
platform first, or an accelerator plugin installed with ``JAX_PLATFORMS`` unset).
Threads that another library started and used before jaxseq's import keep their
arenas too, and XLA's threads may be given one of them: import jaxseq first.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

__all__ = ["state"]

ENV = "JAXSEQ_HOST_MEMORY"
TRIM_THRESHOLD = 1 << 30  # bytes of freed heap top kept
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")

_state = {"policy": "system", "reason": "not configured"}


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(bridge, "_backends", None))


def _accelerator() -> str | None:
    """What sets JAX up for an accelerator, or ``None`` when it will run on the CPU."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        first = platforms.split(",")[0].strip()
        return None if first == "cpu" else f"JAX_PLATFORMS={platforms}"
    for name in _ACCELERATOR_MODULES:
        if importlib.util.find_spec(name) is not None:
            return f"{name} is installed"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return f"JAX plugin {plugins[0].name!r} is installed" if len(plugins) else None


def _why_not() -> str | None:
    """Why the settings are not applied in this process, or ``None``."""
    wanted = (os.environ.get(ENV) or "keep").strip().lower()  # unset or empty: keep
    if wanted == "system":
        return f"{ENV}=system"
    if wanted != "keep":
        return f"{ENV}={wanted!r} is neither 'keep' nor 'system'"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not Linux with glibc"
    if _backend_started():
        return "a JAX backend had started before jaxseq was imported"
    return _accelerator()


def _configure() -> None:
    """Applies the settings once, at import (see the module's docstring)."""
    why = _why_not()
    if why is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            refused = [opt for opt, value in _SETTINGS if libc.mallopt(opt, value) != 1]
            why = f"mallopt refused option {refused[0]}" if refused else None
        except (OSError, AttributeError) as e:
            why = f"mallopt unavailable: {e}"
    if why is None:
        _state.update(policy="keep", reason="mallopt applied")
    else:
        _state.update(policy="system", reason=why)


def state() -> dict:
    """Whether jaxseq set ``malloc`` to keep freed host memory in this process.

    Returns ``{"policy": "keep" | "system", "reason": str}``: ``"keep"`` when the
    settings of this module's docstring were applied at import, ``"system"`` with the
    reason when ``malloc`` was left as it is.

    >>> import jaxseq as js
    >>> js.host_memory.state()["policy"] in ("keep", "system")
    True
    """
    return dict(_state)


_configure()  # at import: jaxseq/__init__.py imports this module first
