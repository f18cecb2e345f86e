"""Host memory reuse: keep freed buffers in the process instead of handing them back.

On CPU, XLA allocates a jitted call's temporaries (the activations a training
step saves for its backward, the gradients, the random bits of dropout masks)
with the C library's ``malloc`` on every call and frees them on return. glibc
serves blocks above its mmap threshold (128 KiB to 32 MiB, adapting) with
fresh ``mmap`` pages and returns them with ``munmap``, so every call first-touches
its temporaries again: a page fault per 4 KiB. :func:`reuse_host_memory` raises
the mmap and trim thresholds, so those blocks come from the heap and stay there
for the next call. PyTorch allocates the same way and gains too.

The cost is memory: the process keeps its peak heap instead of shrinking after
a step. What it saves on a CPU training step is measured by
``python -m benchmarks.char_lm_e2e --host-memory reuse`` against
``--host-memory default`` (figures in ``benchmarks/README.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = [
    "reuse_host_memory",
]

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_state: dict[str, int | None] = {"threshold": None}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # not glibc (e.g. musl): nothing to tune
    return libc


def reuse_host_memory(threshold: int = 1 << 30) -> bool:
    """Serves host allocations up to ``threshold`` bytes from the heap and keeps them there.

    Sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``threshold``
    (default 1 GiB; larger blocks are still mapped and unmapped per use). It
    affects the whole process (every library's allocations) from the call on,
    and is a no-op returning False where the C library is not glibc (macOS,
    Windows, musl). Call it once at startup of a CPU training run; on GPU/TPU it
    makes little difference (device memory has its own allocator).

    Args:
      threshold: positive int, bytes (at most ``2**31 - 1`` would not fit some
        glibc builds' ``int`` parameter: it is clipped there).

    Returns:
      True when the thresholds were set.

    >>> import jaxseq as js
    >>> js.training.reuse_host_memory() in (True, False)
    True
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
        raise ValueError(f"threshold: expected a positive int (bytes), got {threshold!r}")
    libc = _libc()
    if libc is None:
        return False
    value = min(int(threshold), 2**31 - 1)
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, value)
    )
    if ok:
        _state["threshold"] = value
    return ok


def host_memory_setting() -> int | None:
    """The threshold :func:`reuse_host_memory` set in this process (None: not called or no-op).

    >>> from jaxseq.training.host_memory import host_memory_setting
    >>> host_memory_setting() is None or host_memory_setting() > 0
    True
    """
    return _state["threshold"]
