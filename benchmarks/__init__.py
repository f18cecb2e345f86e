"""Benchmarks for jaxseq: one script per question over a shared harness (``_timing``,
``_flops``, ``_environment``, ``_output``, ``_processes``: one module per job).

Run them as modules from the repository root, e.g.
``python -m benchmarks.scan_vs_unrolled --out results``; see ``benchmarks/README.md``.
"""

# jaxseq first, before any benchmark starts a JAX backend: its import sets malloc up for
# XLA:CPU's per-call buffers (jaxseq.host_memory), as in a user's program that imports it
import jaxseq  # noqa: E402, F401
