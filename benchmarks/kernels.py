"""The fused recurrent kernels: compile time vs T, checkpointing, profile, unroll rule.

Four questions about ``js.rollout`` of the built-in cells (training step =
forward + backward of ``sum(ys**2)`` w.r.t. the parameters, float32):

* ``compile`` -- is compile time flat in T? LSTM (B=32, D=H=256), T in
  {10, 100, 1000}: ``compile_s`` of the jitted training step, default kernel
  and ``kernel="scan"``; target: compile(T=1000) / compile(T=10) <= 1.5.
* ``memory`` -- LSTM (32, 256) at T=10000, default vs ``checkpoint_every=32``:
  XLA's buffer sizes of the compiled step (arguments + outputs + temporaries)
  and, in child processes, peak resident memory and the median step time;
  target: at least 4x less memory at no more than 1.5x the time.
* ``profile`` -- where the time goes at the issue's LSTM configurations: the
  training step against (a) the same matmuls run alone as large GEMMs over all
  steps (the GEMM bound), (b) a scan doing only the per-step recurrent matmuls
  (forward ``h W_hh`` and backward ``dG W_hh^T``) and (c) an empty scan of the
  same trip count (loop overhead).
* ``unroll`` -- the measurement behind ``unroll="auto"``: the fused training
  step at unroll 1, 2, 4, 8 for the three configurations (median time and
  compile time).
* ``gates`` -- why the kernels compute gate activations over whole rows: a
  100-step scan of only the LSTM / GRU gate math (pre-activations given),
  written with ``sigmoid``/``tanh`` of column slices (the textbook form, as in
  ``LSTM.recur``) against the kernels' whole-row form (one ``tanh`` over all
  ``G*H`` columns), and the same math over all steps at once without a loop.

Every comparison is timed side by side in one process, interleaved (one call
of each contender per round), median of ``--repeats``.

Usage::

    python -m benchmarks.kernels --out results            # everything
    python -m benchmarks.kernels --out results --only compile,profile --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np

from benchmarks._environment import environment
from benchmarks._flops import gflops, rnn_flops
from benchmarks._output import format_table, progress, write_results
from benchmarks._processes import peak_memory_subprocess
from benchmarks._timing import compile_jitted, time_interleaved, time_jitted

CONFIGS = ((32, 256, 100), (64, 512, 100), (1, 128, 1000))


def _setup(cell_name, batch, hidden, steps, seed=0):
    import jax

    import jaxseq as js

    cell = {"lstm": js.LSTM, "gru": js.GRU, "rnn": js.RNN}[cell_name](hidden)
    params = cell.init(jax.random.key(seed), hidden)
    # Drawn by numpy directly in float32: jax.random.normal at T=10000 peaks at
    # several times the array's size, which would swamp the memory question's baseline.
    rng = np.random.default_rng(seed + 1)
    xs = jax.device_put(rng.standard_normal((steps, batch, hidden), dtype=np.float32))
    return cell, params, xs


def train_step(cell, wrt_inputs=False, **rollout_kw):
    """``(params, xs) -> (loss, grads)`` for ``loss = sum(ys**2)`` (not jitted).

    Gradients w.r.t. the parameters, and also the inputs with ``wrt_inputs``
    (as in ``benchmarks.frameworks``, and as the GEMM bound of ``profile`` counts).
    """
    import jax
    import jax.numpy as jnp

    import jaxseq as js

    def loss(params, xs):
        _, ys = js.rollout(cell, params, xs, **rollout_kw)
        return jnp.sum(ys**2)

    return jax.value_and_grad(loss, argnums=(0, 1) if wrt_inputs else 0)


# ----------------------------------------------------------------------------- compile


def bench_compile(steps_list=(10, 100, 1000), quiet=False):
    records = []
    for kernel in ("auto", "scan"):
        for steps in progress(steps_list, f"compile ({kernel})", quiet=quiet):
            cell, params, xs = _setup("lstm", 32, 256, steps)
            _, info = compile_jitted(train_step(cell, kernel=kernel), params, xs)
            records.append(
                {
                    "question": "compile",
                    "kernel": kernel,
                    "B": 32,
                    "H": 256,
                    "T": steps,
                    "compile_s": info["compile_s"],
                    "lower_s": info["lower_s"],
                }
            )
    for kernel in ("auto", "scan"):
        rows = {r["T"]: r["compile_s"] for r in records if r["kernel"] == kernel}
        ratio = rows[max(rows)] / rows[min(rows)]
        records.append(
            {
                "question": "compile",
                "kernel": kernel,
                "T": f"{max(rows)}/{min(rows)}",
                "ratio": ratio,
                "target": "<= 1.5",
                "met": ratio <= 1.5,
            }
        )
    return records


# ----------------------------------------------------------------------------- memory


def _xla_bytes(fn, *args) -> dict:
    import jax

    ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    if ma is None:
        return {}
    out = {
        "xla_temp_mb": ma.temp_size_in_bytes / 2**20,
        "xla_args_mb": ma.argument_size_in_bytes / 2**20,
        "xla_out_mb": ma.output_size_in_bytes / 2**20,
    }
    out["xla_total_mb"] = out["xla_temp_mb"] + out["xla_args_mb"] + out["xla_out_mb"]
    return out


def _child(args) -> None:
    """Child process of ``memory``: one configuration, prints a JSON line."""
    import jax

    cell, params, xs = _setup("lstm", args.batch, 256, args.steps)
    if args.every == -1:  # baseline: same imports and inputs, no training step
        jax.block_until_ready(xs)
        print(json.dumps({"median_s": None}))
        return
    kw = {} if args.every == 0 else {"checkpoint_every": args.every}
    rec = time_jitted(train_step(cell, **kw), params, xs, repeats=args.repeats, warmup=1)
    print(json.dumps(rec))


def bench_memory(steps=10000, every=32, batch=32, repeats=3, quiet=False):
    records = []
    cell, params, xs = _setup("lstm", batch, 256, steps)
    for label, kw in (("default", {}), (f"checkpoint_every={every}", {"checkpoint_every": every})):
        rec = {"question": "memory", "variant": label, "B": batch, "H": 256, "T": steps}
        rec.update(_xla_bytes(train_step(cell, **kw), params, xs))
        records.append(rec)
    del params, xs
    for rec, ev in progress(list(zip(records, (0, every))), "memory (children)", quiet=quiet):
        child = peak_memory_subprocess(
            "benchmarks.kernels",
            ["--child", "--steps", steps, "--every", ev, "--batch", batch, "--repeats", repeats],
        )
        rec["peak_rss_mb"] = child.get("peak_rss_mb")
        if child.get("status") == "ok":
            timing = json.loads(child["stdout"].strip().splitlines()[-1])
            rec["median_s"] = timing["median_s"]
            rec["compile_s"] = timing["compile_s"]
            rec["repeats"] = timing["repeats"]
        else:
            rec["status"] = child.get("status")
            rec["reason"] = child.get("reason")
    base = peak_memory_subprocess(
        "benchmarks.kernels", ["--child", "--steps", steps, "--every", -1, "--batch", batch]
    )
    base_mb = base.get("peak_rss_mb")
    for rec in records:
        if base_mb is not None and rec.get("peak_rss_mb") is not None:
            rec["rss_minus_baseline_mb"] = rec["peak_rss_mb"] - base_mb
    d, c = records
    summary = {"question": "memory", "variant": "default / checkpoint", "T": steps}
    for k in ("xla_total_mb", "xla_temp_mb", "peak_rss_mb", "rss_minus_baseline_mb"):
        if d.get(k) and c.get(k):
            summary[k.replace("_mb", "_ratio")] = d[k] / c[k]
    if d.get("median_s") and c.get("median_s"):
        summary["time_ratio_ckpt_over_default"] = c["median_s"] / d["median_s"]
    summary["baseline_rss_mb"] = base_mb
    summary["target"] = "memory ratio >= 4, time ratio <= 1.5"
    records.append(summary)
    return records


# ----------------------------------------------------------------------------- profile


def _profile_calls(batch, hidden, steps):
    """Zero-arg calls: full step, GEMM bound, per-step recurrent matmuls in a scan, empty scan."""
    import jax
    import jax.numpy as jnp

    cell, params, xs = _setup("lstm", batch, hidden, steps)
    g = 4 * hidden
    calls, info = {}, {}

    def add(name, fn, *args):
        calls[name], info[name] = compile_jitted(fn, *args)

    add("train_step", train_step(cell, wrt_inputs=True), params, xs)

    def gemm_bound(w_ih, w_hh, xs):
        # forward X W_ih, H W_hh; backward dG W_ih^T, dG W_hh^T, X^T dG, H^T dG
        x2 = xs.reshape(-1, xs.shape[-1])
        zx = x2 @ w_ih
        zh = x2 @ w_hh
        dg = zx + zh
        return (dg @ w_ih.T, dg @ w_hh.T, x2.T @ dg, x2.T @ zh)

    add("gemm_bound", gemm_bound, params.w_ih, params.w_hh, xs)

    def recurrent_matmuls(w_hh, h0):
        def fwd(h, _):
            z = h @ w_hh
            return z[:, :hidden], None

        def bwd(d, _):
            dz = jnp.concatenate([d] * 4, axis=-1)
            return jax.lax.dot_general(dz, w_hh, (((1,), (1,)), ((), ()))), None

        h, _ = jax.lax.scan(fwd, h0, None, length=steps)
        d, _ = jax.lax.scan(bwd, h, None, length=steps)
        return d

    add("recurrent_matmuls_in_scan", recurrent_matmuls, params.w_hh, jnp.ones((batch, hidden)))

    def empty_loops(h0):
        h, _ = jax.lax.scan(lambda h, _: (h + 1.0, None), h0, None, length=steps)
        h, _ = jax.lax.scan(lambda h, _: (h * 0.5, None), h, None, length=steps)
        return h

    add("empty_scans", empty_loops, jnp.ones((batch, hidden)))
    flops = rnn_flops("lstm", batch, hidden, hidden, steps, training=True)
    del g
    return calls, info, flops


def bench_profile(repeats=10, quiet=False):
    records = []
    for batch, hidden, steps in progress(CONFIGS, "profile", quiet=quiet):
        calls, info, flops = _profile_calls(batch, hidden, steps)
        res = time_interleaved(calls, repeats=repeats, warmup=2, info=info)
        total = res["train_step"]["median_s"]
        rec = {"question": "profile", "B": batch, "H": hidden, "T": steps}
        for name, r in res.items():
            rec[f"{name}_ms"] = r["median_s"] * 1e3
        rec["train_gflops"] = gflops(flops, total)
        rec["gemm_bound_fraction"] = res["gemm_bound"]["median_s"] / total
        rec["recurrent_matmul_loop_fraction"] = res["recurrent_matmuls_in_scan"]["median_s"] / total
        rec["empty_loop_fraction"] = res["empty_scans"]["median_s"] / total
        rec["loop_overhead_us_per_step"] = res["empty_scans"]["median_s"] / (2 * steps) * 1e6
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- unroll


def bench_unroll(unrolls=(1, 2, 4, 8), repeats=10, quiet=False):
    import jaxseq as js
    from jaxseq.recurrent import dispatch

    records = []
    for cell_name in ("lstm",):
        for batch, hidden, steps in progress(CONFIGS, "unroll", quiet=quiet):
            cell, params, xs = _setup(cell_name, batch, hidden, steps)
            calls, info = {}, {}
            for u in unrolls:
                calls[u], info[u] = compile_jitted(train_step(cell, unroll=u), params, xs)
            res = time_interleaved(calls, repeats=repeats, warmup=2, info=info)
            best = min(res, key=lambda u: res[u]["median_s"])
            auto = dispatch.auto_unroll(steps, dispatch.step_work(cell, (batch,)))
            for u, r in res.items():
                records.append(
                    {
                        "question": "unroll",
                        "cell": cell_name,
                        "B": batch,
                        "H": hidden,
                        "T": steps,
                        "unroll": u,
                        "median_ms": r["median_s"] * 1e3,
                        "compile_s": r["compile_s"],
                        "fastest": u == best,
                        "auto_picks": u == auto,
                    }
                )
    del js
    return records


# ----------------------------------------------------------------------------- gates


def _gate_forms(cell_name, hidden):
    """``(slices, whole_row)`` step functions ``(zs, h, c) -> (h, c)``.

    ``zs``: LSTM ``(z,)`` with ``z = xp + h W_hh: [N, 4H]``; GRU ``(xp, hp)``, each ``[N, 3H]``.
    """
    import jax
    import jax.numpy as jnp

    from jaxseq.recurrent import rules

    hs = hidden
    if cell_name == "lstm":

        def slices(zs, h, c):
            (z,) = zs
            i, f, g, o = (z[:, k * hs : (k + 1) * hs] for k in range(4))
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            return jax.nn.sigmoid(o) * jnp.tanh(c), c

        def whole_row(zs, h, c):
            (z,) = zs
            a = rules._lstm_gates(z, hs)
            c = a[:, hs : 2 * hs] * c + a[:, :hs] * a[:, 2 * hs : 3 * hs]
            return a[:, 3 * hs :] * jnp.tanh(c), c

        return slices, whole_row

    def slices(zs, h, c):
        xp, hp = zs
        r = jax.nn.sigmoid(xp[:, :hs] + hp[:, :hs])
        u = jax.nn.sigmoid(xp[:, hs : 2 * hs] + hp[:, hs : 2 * hs])
        n = jnp.tanh(xp[:, 2 * hs :] + r * hp[:, 2 * hs :])
        return (1.0 - u) * n + u * h, c

    def whole_row(zs, h, c):
        xp, hp = zs
        ru = 0.5 * jnp.tanh(0.5 * (xp + hp)) + 0.5
        r, u = ru[:, :hs], ru[:, hs : 2 * hs]
        n = jnp.tanh(xp + jnp.concatenate([r, r, r], axis=-1) * hp)[:, 2 * hs :]
        return (1.0 - u) * n + u * h, c

    return slices, whole_row


def _gates_in_scan(form, hidden, zs):
    import jax
    import jax.numpy as jnp

    def body(hc, z):
        h, c = hc
        # h feeds the next step's pre-activations: a true recurrence
        h, c = form((z[0] + h[:, :1],) + z[1:], h, c)
        return (h, c), h

    h0 = jnp.zeros((zs[0].shape[1], hidden), zs[0].dtype)
    return jax.lax.scan(body, (h0, h0), zs)[1]


def _gates_no_loop(form, hidden, zs):
    z = tuple(a.reshape(-1, a.shape[-1]) for a in zs)
    return form(z, z[0][:, :hidden], z[0][:, hidden : 2 * hidden])[0]


def bench_gates(configs=((32, 256, 100), (64, 512, 100)), repeats=10, quiet=False):
    import jax

    records = []
    for cell_name in progress(("lstm", "gru"), "gates", quiet=quiet):
        for batch, hidden, steps in configs:
            width = (4 if cell_name == "lstm" else 3) * hidden
            keys = jax.random.split(jax.random.key(0), 2 if cell_name == "gru" else 1)
            zs = tuple(jax.random.normal(k, (steps, batch, width)) for k in keys)
            calls, info = {}, {}
            for name, form in zip(("slices", "whole_row"), _gate_forms(cell_name, hidden)):
                in_scan = functools.partial(_gates_in_scan, form, hidden)
                no_loop = functools.partial(_gates_no_loop, form, hidden)
                calls[f"{name}_in_scan"], info[f"{name}_in_scan"] = compile_jitted(in_scan, zs)
                calls[f"{name}_no_loop"], info[f"{name}_no_loop"] = compile_jitted(no_loop, zs)
            res = time_interleaved(calls, repeats=repeats, warmup=2, info=info)
            rec = {"question": "gates", "cell": cell_name, "B": batch, "H": hidden, "T": steps}
            for name, r in res.items():
                rec[f"{name}_ms"] = r["median_s"] * 1e3
            rec["slices_over_whole_row_in_scan"] = (
                res["slices_in_scan"]["median_s"] / res["whole_row_in_scan"]["median_s"]
            )
            records.append(rec)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--only", default="compile,memory,profile,unroll,gates", help="comma list")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per contender")
    p.add_argument("--quick", action="store_true", help="smaller memory run (T=2000), 5 repeats")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # internal: child process of the memory question
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10000, help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    repeats = 5 if args.quick else args.repeats
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    records = []
    t0 = time.perf_counter()
    if "compile" in only:
        records += bench_compile(quiet=args.quiet)
    if "profile" in only:
        records += bench_profile(repeats=repeats, quiet=args.quiet)
    if "unroll" in only:
        records += bench_unroll(repeats=repeats, quiet=args.quiet)
    if "gates" in only:
        records += bench_gates(repeats=repeats, quiet=args.quiet)
    if "memory" in only:
        steps = 2000 if args.quick else 10000
        records += bench_memory(steps=steps, repeats=3, quiet=args.quiet)
    env = environment()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    paths = write_results(args.out, "kernels", records, env, title="Fused recurrent kernels")
    print(format_table(records))
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
