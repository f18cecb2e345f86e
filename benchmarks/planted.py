"""Planted bugs: each known way the code has been wrong must fail at least one test.

Mutation testing (:mod:`benchmarks.mutation`) makes thousands of small random
changes; this script plants a short list of *realistic* bugs, the kind that
once survived the suite (a gradient silently stopped, a precision silently
lowered, a mask silently dropped), one at a time in a scratch copy of the
repository, and runs the test files that should catch each:

    python -m benchmarks.planted --out results/planted
    python -m benchmarks.planted --only stop_gradient_scan_projection

A bug that no test catches is reported as SURVIVED and the script exits 1.
Writes ``<out>/planted.json`` and ``<out>/planted.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Bug(NamedTuple):
    """``edits``: (file, old text, new text); each old text must occur exactly once."""

    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


BUGS = (
    Bug(
        "stop_gradient_scan_projection",
        "stop_gradient on the params of the scan path's hoisted input projection",
        (
            (
                "jaxseq/",
                "inputs = cell.project(params, xs) if hoisted else xs",
                "inputs = cell.project(jax.lax.stop_gradient(params), xs) if hoisted else xs",
            ),
        ),
        ("tests/test_rollout.py", "tests/test_kernels.py"),
    ),
    Bug(
        "seq2seq_bridge_divides_by_S",
        "the seq2seq bridge divides the summed encoder states by S, not the source lengths",
        (
            (
                "jaxseq/",
                "mean = jnp.sum(states.astype(jnp.float32), axis=1) / jnp.maximum(\n"
                "            src_lengths.astype(jnp.float32), 1.0\n"
                "        ).reshape(b, 1)",
                "mean = jnp.sum(states.astype(jnp.float32), axis=1) / states.shape[1]",
            ),
        ),
        ("tests/test_models_taggers_classifiers_seq2seq.py", "tests/test_models.py"),
    ),
    Bug(
        "transformer_relu_for_gelu",
        "ReLU instead of GELU in the Transformer block's MLP",
        (("jaxseq/", "jax.nn.gelu(", "jax.nn.relu("),),
        ("tests/test_transformer.py",),
    ),
    Bug(
        "mha_drops_b_v",
        "multi-head attention ignores the value bias b_v",
        (
            (
                "jaxseq/",
                "_project_heads(ctx, params.w_v, params.b_v)",
                "_project_heads(ctx, params.w_v, None)",
            ),
        ),
        ("tests/test_attention.py", "tests/test_transformer.py"),
    ),
    Bug(
        "cells_matmul_bf16",
        "the cells' matmuls accumulate in bfloat16",
        (
            (
                "jaxseq/",
                "    return jax.lax.dot_general(\n"
                "        x, w, (((x.ndim - 1,), (0,)), ((), ())), "
                "preferred_element_type=acc_dtype(x, w)\n    )",
                "    return jax.lax.dot_general(\n"
                "        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),"
                " (((x.ndim - 1,), (0,)), ((), ())),"
                " preferred_element_type=jnp.bfloat16\n    ).astype(acc_dtype(x, w))",
            ),
        ),
        ("tests/test_cells.py",),
    ),
    Bug(
        "attention_softmax_bf16",
        "attention scores and softmax in bfloat16",
        (
            (
                "jaxseq/",
                "    acc = acc_dtype(q, k)\n"
                "    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=acc)",
                "    acc = jnp.bfloat16\n"
                "    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=acc)",
            ),
            (
                "jaxseq/",
                "        return jax.nn.softmax(scores, axis=-1)\n",
                "        return jax.nn.softmax(scores.astype(jnp.bfloat16), axis=-1)\n",
            ),
        ),
        ("tests/test_attention.py", "tests/test_transformer.py"),
    ),
    Bug(
        "loss_log_softmax_input_dtype",
        "log-softmax of the loss in the input dtype instead of float32",
        (
            (
                "jaxseq/",
                "jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)",
                "jax.nn.log_softmax(logits, axis=-1).astype(jnp.float32)",
            ),
        ),
        ("tests/test_losses.py",),
    ),
    Bug(
        "eval_step_drops_mask",
        "make_eval_step drops the mask and doubles the count",
        (
            (
                "jaxseq/",
                "return carry, jnp.sum(jnp.where(mask, tok, 0.0)), jnp.sum(mask.astype(jnp.float32))",
                "return carry, jnp.sum(tok), 2.0 * jnp.sum(mask.astype(jnp.float32))",
            ),
        ),
        ("tests/test_train.py",),
    ),
)


def _plant(work: Path, bug: Bug) -> None:
    for rel, old, new in bug.edits:
        # ``rel`` is a file or a folder of the package: the bug goes into the one file
        # under it that holds the text, so it follows code moved between modules.
        where = work / rel
        files = sorted(where.rglob("*.py")) if where.is_dir() else [where]
        hits = [(f, f.read_text().count(old)) for f in files]
        hits = [(f, n) for f, n in hits if n]
        if len(hits) != 1 or hits[0][1] != 1:
            found = ", ".join(f"{f.relative_to(work)} x{n}" for f, n in hits) or "nowhere"
            raise RuntimeError(
                f"{bug.name}: expected the text to plant over exactly once under {rel}, "
                f"found it {found} (the code changed: update the bug)"
            )
        path = hits[0][0]
        path.write_text(path.read_text().replace(old, new))


def _run(bug: Bug, scratch: Path) -> dict:
    work = scratch / bug.name
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "__pycache__", "results"))
    _plant(work, bug)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu")
    # Running from the copy's root imports the copy's (bugged) jaxseq, not the installed one.
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "name": bug.name,
        "what": bug.what,
        "tests": list(bug.tests),
        "caught": proc.returncode == 1,
        "returncode": proc.returncode,
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated bug names")
    ap.add_argument("--out", default="results/planted")
    args = ap.parse_args(argv)
    bugs = BUGS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = sorted(wanted - {b.name for b in BUGS})
        if unknown:
            ap.error(f"--only: unknown {unknown}; choose from {[b.name for b in BUGS]}")
        bugs = tuple(b for b in BUGS if b.name in wanted)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxseq-planted-") as scratch:
        for bug in bugs:
            rec = _run(bug, Path(scratch))
            verdict = "caught" if rec["caught"] else f"SURVIVED (exit {rec['returncode']})"
            print(f"{bug.name}: {verdict} {rec['failed']} in {rec['seconds']} s", flush=True)
            rows.append(rec)
    (out / "planted.json").write_text(json.dumps(rows, indent=1))
    md = ["# Planted bugs", "", "| bug | caught | first failing test | test files |"]
    md.append("|---|---|---|---|")
    for r in rows:
        first = r["failed"][0] if r["failed"] else ""
        md.append(
            f"| {r['what']} | {'yes' if r['caught'] else '**no**'} | `{first}` "
            f"| {', '.join(r['tests'])} |"
        )
    (out / "planted.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
