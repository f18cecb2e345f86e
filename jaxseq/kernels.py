"""Fast recurrent kernels for the built-in cells (used by ``js.rollout``).

This module decides how a rollout of a built-in cell is executed; see
:func:`auto_unroll` for the rule behind ``unroll="auto"``.
"""

from __future__ import annotations

__all__ = ["auto_unroll"]


def auto_unroll(t: int) -> int:
    """Unroll factor for ``unroll="auto"`` given the sequence length ``t``."""
    return 1 if t < 8 else 4
