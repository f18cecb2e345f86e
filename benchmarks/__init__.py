"""Benchmarks for jaxseq: one script per question over a shared harness (``_timing``,
``_flops``, ``_environment``, ``_output``, ``_processes``: one module per job).

Run them as modules from the repository root, e.g.
``python -m benchmarks.scan_vs_unrolled --out results``; see ``benchmarks/README.md``.
"""
