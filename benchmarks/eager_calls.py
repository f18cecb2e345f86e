"""What a call outside ``jit`` costs: the library's functions called eagerly against
``jax.jit`` of the same call.

Question: a user calls ``js.recurrent.linear_attention(q, k, v, g)`` in a notebook,
without ``jax.jit``. How long do the first call (at new shapes) and a repeated call
take, next to the same call under ``jax.jit``? Eager calls of the functions below
check their arguments and then run as one compiled program (as ``js.rollout``
does); op by op they compiled tens of small programs per new shape.

Each function and mode runs in a fresh child process (so the first call pays every
compilation it causes, with no persistent compilation cache), in rounds that
alternate the two modes; medians over the rounds. Per child: the first call's time
and the number of programs it compiled (``jax.monitoring``'s backend-compile events),
then the median of ``--repeats`` further calls, each to ``block_until_ready``.

Usage::

    python -m benchmarks.eager_calls --out results/eager_calls [--rounds 3] [--quick]

Writes ``eager_calls.json`` and ``eager_calls.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks._environment import environment
from benchmarks._output import format_table, progress, write_results
from benchmarks._processes import child_env

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _calls():
    """``{name: build}``, ``build() -> (fn, args)``: one call of each function on small
    inputs (built on demand, so a child compiles nothing for the other functions)."""
    import jax
    import jax.numpy as jnp

    import jaxseq as js

    key = jax.random.key(0)
    normal = lambda i, *shape: jax.random.normal(jax.random.fold_in(key, i), shape)

    def matrix_state(solver):
        q, g = normal(1, 8, 2, 2, 4), -jax.nn.softplus(normal(2, 8, 2, 2))
        return solver, (q, g)

    def module(obj, call, x):
        return call, (obj.init(key, x.shape[-1]), x)

    mha = js.attention.MultiHeadAttention(num_heads=4, key_size=8)
    block = js.attention.TransformerBlock(num_heads=4)
    lm = js.models.transformer_lm(11, num_layers=2, d_model=32, num_heads=4, max_len=16)
    cell = js.LSTM(16)
    return {
        "linear_attention": lambda: matrix_state(
            lambda q, g: js.recurrent.linear_attention(q, q, q, g)),
        "mlstm_recurrence": lambda: matrix_state(
            lambda q, g: js.recurrent.mlstm_recurrence(q, q, q, g, g)),
        "linear_recurrence": lambda: (lambda a, b: js.linear_recurrence(a, b),
                                      (jnp.full((8, 2, 3), 0.5), normal(3, 8, 2, 3))),
        "blockwise_attention": lambda: (lambda x: js.blockwise_attention(x, x, x, causal=True),
                                        (normal(4, 2, 4, 64, 16),)),  # [*B, T, D]
        "batched_dot_product_attention": lambda: (
            lambda x: js.batched_dot_product_attention(x, x, x, causal=True),
            (normal(5, 2, 64, 4, 16),)),  # [*B, T, K, D]
        "dot_product_attention": lambda: (
            lambda x: js.dot_product_attention(x, x, x, causal=True), (normal(6, 12, 32),)),
        "multi_head_attention": lambda: module(
            mha, lambda p, x: mha.apply(p, x, causal=True), normal(7, 12, 32)),
        "transformer_block": lambda: module(
            block, lambda p, x: block.apply(p, x), normal(8, 12, 32)),
        "TransformerLM.apply": lambda: (lambda p, t: lm.apply(p, None, t),
                                        (lm.init(key), jnp.ones((16, 3), jnp.int32))),
        "rollout (LSTM)": lambda: (lambda p, x: js.rollout(cell, p, x)[1],
                                   (cell.init(key, 4), normal(9, 8, 2, 4))),
    }  # fmt: skip


def _child(name: str, mode: str, repeats: int) -> dict:
    """One function in one mode, in this (fresh) process."""
    import jax

    fn, args = _calls()[name]()
    jax.block_until_ready(args)
    if mode == "jit":
        fn = jax.jit(fn)
    seen = []
    listen = lambda event, duration, **kw: seen.append(1) if event == _COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(listen)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "programs": len(seen), "again_ms": 1e3 * statistics.median(times)}


def _run_child(name: str, mode: str, repeats: int) -> dict:
    env = child_env()
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    cmd = [sys.executable, "-m", "benchmarks.eager_calls", "--child", name, mode]
    r = subprocess.run(
        [*cmd, "--repeats", str(repeats)], env=env, capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0 or "RESULT" not in r.stdout:
        return {"status": "error", "reason": r.stderr[-1000:]}
    return json.loads(r.stdout.split("RESULT", 1)[1])


def measure(names, rounds: int, repeats: int) -> list[dict]:
    """Medians over ``rounds`` of each function's eager and jitted child (the mode that
    runs first alternates between rounds)."""
    runs = {(n, m): [] for n in names for m in ("eager", "jit")}
    order = [
        (n, m)
        for r in range(rounds)
        for n in names
        for m in (("eager", "jit") if r % 2 == 0 else ("jit", "eager"))
    ]
    for n, m in progress(order, "children"):
        runs[(n, m)].append(_run_child(n, m, repeats))
    records = []
    for n in names:
        rec = {"function": n}
        for m in ("eager", "jit"):
            ok = [r for r in runs[(n, m)] if "first_s" in r]
            if not ok:
                rec.update(status="error", reason=runs[(n, m)][0]["reason"])
                break
            rec[f"{m}_first_s"] = statistics.median(r["first_s"] for r in ok)
            rec[f"{m}_again_ms"] = statistics.median(r["again_ms"] for r in ok)
            rec[f"{m}_programs"] = max(r["programs"] for r in ok)
        else:
            rec["first_eager_over_jit"] = rec["eager_first_s"] / rec["jit_first_s"]
            rec["again_eager_over_jit"] = rec["eager_again_ms"] / rec["jit_again_ms"]
        records.append(rec)
    return records


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/eager_calls")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="one function, one round, 3 repeats")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT" + json.dumps(_child(*args.child, args.repeats)))
        return {}
    names = list(_calls())
    if args.quick:
        names, args.rounds, args.repeats = ["dot_product_attention"], 1, 3
    records = measure(names, args.rounds, args.repeats)
    print(format_table(records))
    paths = write_results(
        args.out, "eager_calls", records, environment(), title="Calls outside jit against jax.jit"
    )
    print(f"wrote {paths['json']}, {paths['md']}")
    return {"records": records, "paths": paths}


if __name__ == "__main__":
    main()
