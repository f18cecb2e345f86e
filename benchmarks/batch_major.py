"""Cost of batch-major inputs: an LSTM training step with time_major=False vs True.

(B, D=H, T) = (32, 256, 100): value and grad of sum(ys**2) over params and inputs,
both layouts compiled apart and timed side by side, interleaved, medians.

    python -m benchmarks.batch_major            # 30 repeats
    python -m benchmarks.batch_major --quick    # 5 repeats
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import jaxseq as js
from benchmarks._environment import environment
from benchmarks._timing import compile_jitted, time_interleaved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 repeats")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shape", default="32,256,100", help="B,H,T (D = H)")
    args = p.parse_args(argv)
    B, H, T = (int(v) for v in args.shape.split(","))
    repeats = 5 if args.quick else args.repeats
    cell = js.LSTM(H)
    kp, kx = jax.random.split(jax.random.key(0))
    params = cell.init(kp, H)
    xs_tm = jax.random.normal(kx, (T, B, H), jnp.float32)
    xs_bm = jnp.asarray(jnp.swapaxes(xs_tm, 0, 1))

    def step(time_major):
        def loss(p, xs):
            return jnp.sum(js.rollout(cell, p, xs, time_major=time_major)[1] ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1))

    def transposes(xs, ys):
        # what time_major=False adds: xs and ys forward, their cotangents backward
        return [jnp.swapaxes(a, 0, 1) + 1.0 for a in (xs, ys, xs, ys)]

    ys_bm = jnp.ones((B, T, H), jnp.float32)
    calls, info = {}, {}
    for name, fn, a in (
        ("time_major", step(True), (params, xs_tm)),
        ("batch_major", step(False), (params, xs_bm)),
        ("transposes_only", transposes, (xs_bm, ys_bm)),
    ):
        calls[name], info[name] = compile_jitted(fn, *a)
    res = time_interleaved(calls, repeats=repeats, warmup=3, info=info)
    ratio = res["batch_major"]["median_s"] / res["time_major"]["median_s"]
    for name, r in res.items():
        print(f"{name:16s} median {r['median_s'] * 1e3:8.2f} ms  compile {r['compile_s']:.2f} s")
    extra = res["batch_major"]["median_s"] - res["time_major"]["median_s"]
    print(
        f"batch_major / time_major: {ratio:.3f}x at (B, H, T) = ({B}, {H}, {T}); "
        f"difference {extra * 1e3:.2f} ms"
    )
    env = environment()
    print(json.dumps({k: env[k] for k in list(env)[:6]}, default=str))
    return ratio


if __name__ == "__main__":
    main()
