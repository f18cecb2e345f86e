"""Benchmarks for jaxseq: one script per question, a shared timing harness.

Run them as modules from the repository root, e.g.
``python -m benchmarks.scan_vs_unrolled --out results``; see ``benchmarks/README.md``.
"""
