"""What ``js.checked`` costs: the same jitted functions with and without their value checks.

Question: how much slower is a function run under :func:`jaxseq.checked` (lengths and
token ids checked inside the compiled program, an error value threaded out), and
under ``checked(..., nan_checks=True)`` (every floating-point operation tested for
NaN), than the plain ``jax.jit`` of the same function? Side by side in one process,
interleaved rounds, medians; compile time apart.

Contenders, for each workload:

* ``jit``: ``jax.jit(fn)``, no checks (debug checks are no-ops);
* ``checked``: ``js.checked(fn)``;
* ``checked_nan``: ``js.checked(fn, nan_checks=True)``.

Workloads: the gradient of an LSTM rollout with ``lengths`` (B=32, H=256, T=100),
and the gradient of a character language model's cross-entropy (2-layer LSTM,
V=65, H=256, B=32, K=64: token ids checked in the embedding and in the loss).

Usage::

    python -m benchmarks.checks --out results/checks [--repeats 20] [--quick]

Writes ``checks.json`` and ``checks.md``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

import jaxseq as js
from benchmarks._environment import environment
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import time_interleaved


def _rollout_grad(b, h, t):
    cell = js.LSTM(h)
    key = jax.random.key(0)
    params = cell.init(key, h)
    xs = jax.random.normal(key, (t, b, h))
    lengths = jnp.arange(b, dtype=jnp.int32) % t + 1

    def fn(p, xs, lengths):
        return jax.grad(lambda p: jnp.mean(js.rollout(cell, p, xs, lengths=lengths)[1] ** 2))(p)

    return fn, (params, xs, lengths)


def _lm_grad(b, h, k, v=65):
    model = js.char_lm(v, num_layers=2, hidden_size=h, embedding_size=64)
    key = jax.random.key(0)
    params = model.init(key)
    tokens = jax.random.randint(key, (k + 1, b), 0, v)
    carry = model.initial_carry((b,))

    def fn(p, tokens):
        def loss(p):
            _, logits = model.apply(p, carry, tokens[:-1])
            return js.cross_entropy(logits, tokens[1:])

        return jax.grad(loss)(p)

    return fn, (params, tokens)


def _measure(name, fn, args, repeats, warmup):
    variants = {
        "jit": jax.jit(fn),
        "checked": js.checked(fn),
        "checked_nan": js.checked(fn, nan_checks=True),
    }
    calls, info = {}, {}
    for vname, f in variants.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        info[vname] = {"compile_s": time.perf_counter() - t0}
        calls[vname] = lambda f=f: f(*args)
    times = time_interleaved(calls, repeats=repeats, warmup=warmup, info=info)
    base = times["jit"]["median_s"]
    records = []
    for vname in variants:
        tm = times[vname]
        records.append(
            {
                "workload": name,
                "variant": vname,
                "median_ms": 1e3 * tm["median_s"],
                "ratio_to_jit": tm["median_s"] / base,
                "first_call_s": info[vname]["compile_s"],
            }
        )
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/checks")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small shapes, 5 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 5
        workloads = [
            ("lstm_rollout_grad", *_rollout_grad(8, 32, 20)),
            ("char_lm_grad", *_lm_grad(8, 32, 16)),
        ]
    else:
        workloads = [
            ("lstm_rollout_grad B32 H256 T100", *_rollout_grad(32, 256, 100)),
            ("char_lm_grad B32 H256 K64", *_lm_grad(32, 256, 64)),
        ]
    records = []
    for name, fn, fargs in progress(workloads, "workloads"):
        records += _measure(name, fn, fargs, args.repeats, args.warmup)
    print(format_table(records))
    paths = write_results(args.out, "checks", records, environment(), title="Cost of js.checked")
    print(f"wrote {paths['json']}, {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
