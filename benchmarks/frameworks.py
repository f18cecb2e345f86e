"""jaxseq against Flax, Haiku and PyTorch, and against the GEMM bound.

For LSTM, GRU and tanh RNN at (B, D=H, T) = (32, 256, 100), (64, 512, 100)
and (1, 128, 1000), forward and training step (forward + backward of
``sum(ys**2)``, gradients w.r.t. params and inputs), float32, times:

* ``jaxseq`` -- ``js.rollout`` with its defaults;
* ``flax`` -- ``nn.RNN`` over ``OptimizedLSTMCell`` / ``GRUCell`` / ``SimpleCell``;
* ``linen`` -- ``jaxseq.flax.linen.RNN(js.LSTM(H))`` etc., the linen module over
  ``js.rollout`` (``model.apply``);
* ``nnx`` -- ``jaxseq.flax.nnx.RNN``, the NNX module (``nnx.split`` once, then
  ``nnx.merge`` inside the jitted function, gradients w.r.t. its ``nnx.State``);
* ``haiku`` -- ``hk.dynamic_unroll`` over ``hk.LSTM`` / ``hk.GRU`` / ``hk.VanillaRNN``;
* ``torch`` -- ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on CPU, threads pinned to JAX's
  thread count (forward under ``torch.inference_mode``);
* ``gemm`` -- the GEMM bound: the same matmuls run alone, as large batched
  GEMMs over all steps (forward: ``X W_ih`` and ``H W_hh``; training adds the
  four backward products), i.e. the time if every FLOP ran at large-matmul speed.

Host memory: jaxseq's import sets glibc's ``malloc`` to keep XLA's per-call buffers
for the whole process, every implementation alike (``jaxseq.host_memory``);
``JAXSEQ_HOST_MEMORY=system`` in the environment leaves it alone. The policy is
recorded in the environment.

All in one process, side by side: every implementation of a configuration is
compiled first, then timed interleaved (each round calls each one once, in
rotating order), so load changes hit all alike. The ``jaxseq/<peer>`` columns
are ratios of median times (below 1: jaxseq is faster); ``linen/flax`` and
``nnx/flax`` compare the Flax modules over jaxseq with Flax's own ``nn.RNN``.
jaxseq, flax, linen and nnx run the same weights (``cell.init`` converted). A peer that is not
installed is reported as skipped.

Usage::

    python -m benchmarks.frameworks --out results
    python -m benchmarks.frameworks --out results --quick   # LSTM only, 5 repeats
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

from benchmarks._environment import environment, jax_thread_count
from benchmarks._flops import GATES, gflops, rnn_flops
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import compile_jitted, skipped, time_interleaved

CELLS = ("lstm", "gru", "rnn")
MODES = ("forward", "train")
CONFIGS = ((32, 256, 100), (64, 512, 100), (1, 128, 1000))
IMPLS = ("jaxseq", "flax", "linen", "nnx", "haiku", "torch", "gemm")
PEERS = ("flax", "haiku", "torch")
FLAX_MODULES = ("linen", "nnx")  # jaxseq.flax's modules, also compared with flax's nn.RNN
# Module each implementation needs; tests point one at a missing name to simulate its absence.
PEER_MODULES = {
    "jaxseq": "jaxseq",
    "flax": "flax",
    "linen": "flax",
    "nnx": "flax",
    "haiku": "haiku",
    "torch": "torch",
    "gemm": "jax",
}
INSTALL_HINT = {
    "flax": "pip install -e '.[bench]'",
    "linen": "pip install -e '.[bench]'",
    "nnx": "pip install -e '.[bench]'",
    "haiku": "pip install -e '.[bench]'",
    "torch": "pip install -e '.[bench]' --extra-index-url https://download.pytorch.org/whl/cpu",
}


def available(impl: str) -> bool:
    try:
        return importlib.util.find_spec(PEER_MODULES[impl]) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- JAX programs


def _jax_programs(forward):
    """``forward(params, xs) -> ys`` -> (forward, train) functions to jit."""
    import jax
    import jax.numpy as jnp

    def loss(p, xs):
        return jnp.sum(jnp.square(forward(p, xs).astype(jnp.float32)))

    return forward, jax.value_and_grad(loss, argnums=(0, 1))


def _jaxseq_setup(cell: str, B: int, D: int, H: int, T: int, key):
    """The jaxseq cell, its params and time-major inputs: the weights every JAX row shares."""
    import jax
    import jax.numpy as jnp

    import jaxseq as js

    c = {"lstm": js.LSTM, "gru": js.GRU, "rnn": js.RNN}[cell](H)
    kp, kx = jax.random.split(key)
    return c, c.init(kp, D), jax.random.normal(kx, (T, B, D), jnp.float32)


def build_jaxseq(cell: str, B: int, D: int, H: int, T: int, key):
    import jaxseq as js

    c, params, xs = _jaxseq_setup(cell, B, D, H, T, key)
    return _jax_programs(lambda p, xs: js.rollout(c, p, xs)[1]), (params, xs)


def build_flax(cell: str, B: int, D: int, H: int, T: int, key):
    import flax.linen as nn

    import jaxseq as js

    c, params, xs = _jaxseq_setup(cell, B, D, H, T, key)
    fc = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[cell](H)
    model = nn.RNN(fc, time_major=True)
    variables = {"params": {"cell": js.interop.to_flax(c, params)["params"]}}
    return _jax_programs(lambda p, xs: model.apply(p, xs)), (variables, xs)


def build_linen(cell: str, B: int, D: int, H: int, T: int, key):
    import jaxseq.flax

    c, params, xs = _jaxseq_setup(cell, B, D, H, T, key)
    model = jaxseq.flax.linen.RNN(c, time_major=True)
    variables = {"params": {"cell": params}}
    return _jax_programs(lambda p, xs: model.apply(p, xs)), (variables, xs)


def build_nnx(cell: str, B: int, D: int, H: int, T: int, key):
    import jax
    from flax import nnx

    import jaxseq.flax

    c, params, xs = _jaxseq_setup(cell, B, D, H, T, key)
    model = jaxseq.flax.nnx.RNN(c, D, rngs=nnx.Rngs(0), time_major=True)
    model.params = nnx.data(jax.tree_util.tree_map(nnx.Param, params))
    graphdef, state = nnx.split(model)
    return _jax_programs(lambda s, xs: nnx.merge(graphdef, s)(xs)), (state, xs)


def build_haiku(cell: str, B: int, D: int, H: int, T: int, key):
    import haiku as hk
    import jax
    import jax.numpy as jnp

    def f(xs):
        core = {"lstm": hk.LSTM, "gru": hk.GRU, "rnn": hk.VanillaRNN}[cell](H)
        ys, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]), time_major=True)
        return ys

    model = hk.without_apply_rng(hk.transform(f))
    kp, kx = jax.random.split(key)
    xs = jax.random.normal(kx, (T, B, D), jnp.float32)
    params = model.init(kp, xs)
    return _jax_programs(model.apply), (params, xs)


def build_gemm(cell: str, B: int, D: int, H: int, T: int, key):
    """The rollout's matmuls alone, each as one GEMM over all T*B rows (the GEMM bound)."""
    import jax
    import jax.numpy as jnp

    gh = GATES[cell] * H
    ks = jax.random.split(key, 5)
    n = T * B
    args = (
        jax.random.normal(ks[0], (D, gh), jnp.float32),  # w_ih
        jax.random.normal(ks[1], (H, gh), jnp.float32),  # w_hh
        jax.random.normal(ks[2], (n, D), jnp.float32),  # X
        jax.random.normal(ks[3], (n, H), jnp.float32),  # H_{t-1} stacked
        jax.random.normal(ks[4], (n, gh), jnp.float32),  # dG
    )

    def forward(w_ih, w_hh, x, h, dg):
        return x @ w_ih, h @ w_hh

    def train(w_ih, w_hh, x, h, dg):
        return (x @ w_ih, h @ w_hh, dg @ w_ih.T, dg @ w_hh.T, x.T @ dg, h.T @ dg)

    return (forward, train), args


JAX_BUILDERS = {
    "jaxseq": build_jaxseq,
    "flax": build_flax,
    "linen": build_linen,
    "nnx": build_nnx,
    "haiku": build_haiku,
    "gemm": build_gemm,
}


# ----------------------------------------------------------------------------- torch


def torch_threads() -> int:
    """Pins torch's intra-op threads to JAX's thread count; returns it."""
    import torch

    n = jax_thread_count()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work ran before)
        pass
    return n


def prepare_torch(cell: str, B: int, D: int, H: int, T: int, mode: str, seed: int = 0):
    """A zero-argument torch step and its first-call time (``compile_s`` None)."""
    import torch

    torch_threads()
    torch.manual_seed(seed)
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](D, H)
    x = torch.randn(T, B, D)
    if mode == "forward":

        def fn():
            with torch.inference_mode():
                return mod(x)[0]

    else:
        x.requires_grad_(True)

        def fn():
            mod.zero_grad(set_to_none=True)
            x.grad = None
            loss = mod(x)[0].square().sum()
            loss.backward()
            return loss.detach()

    t0 = time.perf_counter()
    fn()
    return fn, {"compile_s": None, "first_call_s": time.perf_counter() - t0}


def prepare(impl: str, cell: str, B: int, D: int, H: int, T: int, mode: str, seed: int = 0):
    """``(call, info)`` for one implementation at one configuration, compiled and run once."""
    if impl == "torch":
        return prepare_torch(cell, B, D, H, T, mode, seed)
    import jax

    (fwd, train), args = JAX_BUILDERS[impl](cell, B, D, H, T, jax.random.key(seed))
    return compile_jitted(fwd if mode == "forward" else train, *args)


# ----------------------------------------------------------------------------- sweep


def measure_config(cell, B, D, H, T, mode, impls=IMPLS, *, repeats=10, warmup=2, seed=0):
    """Timing dict per implementation, all timed interleaved (one call of each per round)."""
    results, calls, info = {}, {}, {}
    for impl in impls:
        if not available(impl):
            hint = INSTALL_HINT.get(impl, "")
            results[impl] = skipped(f"{PEER_MODULES[impl]} not installed ({hint})")
            continue
        try:
            calls[impl], info[impl] = prepare(impl, cell, B, D, H, T, mode, seed)
        except Exception as e:  # a peer's API changed: report it, keep the others
            results[impl] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    results.update(time_interleaved(calls, repeats=repeats, warmup=warmup, info=info))
    return {impl: results[impl] for impl in impls}


def run(
    cells=CELLS,
    configs=CONFIGS,
    modes=MODES,
    impls=IMPLS,
    *,
    repeats: int = 10,
    warmup: int = 2,
    quiet: bool = False,
) -> list[dict]:
    """One record per (cell, config, mode) holding every implementation's timing and the ratios."""
    jobs = [(c, cfg, m) for c in cells for cfg in configs for m in modes]
    records = []
    for cell, (b, h, t), mode in progress(jobs, "frameworks", quiet=quiet):
        d = h
        flops = rnn_flops(cell, b, d, h, t, training=(mode == "train"))
        rec = {"cell": cell, "B": b, "D": d, "H": h, "T": t, "mode": mode, "flops": flops}
        timings = measure_config(cell, b, d, h, t, mode, impls, repeats=repeats, warmup=warmup)
        for impl, res in timings.items():
            rec[impl] = res
            if res["status"] == "ok":
                rec[f"{impl}_ms"] = 1e3 * res["median_s"]
                rec[f"{impl}_gflops"] = gflops(flops, res["median_s"])
                if res.get("compile_s") is not None:
                    rec[f"{impl}_compile_s"] = res["compile_s"]
            else:
                rec[f"{impl}_ms"] = res["status"]
        base = rec.get("jaxseq_ms")
        for impl in impls:
            if impl == "jaxseq":
                continue
            other = rec.get(f"{impl}_ms")
            ok = isinstance(base, float) and isinstance(other, float)
            rec[f"jaxseq/{impl}"] = base / other if ok else None
        for impl in FLAX_MODULES:
            if impl in impls and "flax" in impls:
                mine, theirs = rec.get(f"{impl}_ms"), rec.get("flax_ms")
                ok = isinstance(mine, float) and isinstance(theirs, float)
                rec[f"{impl}/flax"] = mine / theirs if ok else None
        records.append(rec)
    return records


def columns(impls) -> list[str]:
    cols = ["cell", "B", "H", "T", "mode"]
    cols += [f"{i}_ms" for i in impls]
    # jaxseq against the peers, then against its own Flax modules, then those against Flax.
    cols += [f"jaxseq/{i}" for i in impls if i != "jaxseq" and i not in FLAX_MODULES]
    cols += [f"jaxseq/{i}" for i in impls if i in FLAX_MODULES]
    if "flax" in impls:
        cols += [f"{i}/flax" for i in FLAX_MODULES if i in impls]
    cols += [f"{i}_gflops" for i in impls if i in ("jaxseq", "gemm")]
    return cols


def skipped_md(records: list[dict], impls) -> str:
    reasons = {}
    for r in records:
        for i in impls:
            if r[i]["status"] != "ok":
                reasons.setdefault(i, r[i].get("reason", r[i]["status"]))
    if not reasons:
        return ""
    return "\n".join(["## Skipped", ""] + [f"- {i}: {why}" for i, why in reasons.items()])


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--quick", action="store_true", help="LSTM only, 5 repeats")
    p.add_argument("--cells", default=None, help="comma list of lstm,gru,rnn")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of forward,train")
    p.add_argument(
        "--configs",
        default=None,
        help="comma list of BxHxT (D=H), default 32x256x100,64x512x100,1x128x1000",
    )
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.cells = (args.cells or ("lstm" if args.quick else ",".join(CELLS))).split(",")
    args.modes = args.modes.split(",")
    args.impls = args.impls.split(",")
    for name, vals, allowed in (
        ("--cells", args.cells, CELLS),
        ("--modes", args.modes, MODES),
        ("--impls", args.impls, IMPLS),
    ):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"{name}: expected names from {allowed}, got {bad}")
    if "jaxseq" not in args.impls:
        args.impls.insert(0, "jaxseq")
    if args.configs:
        args.configs = [tuple(_ints(c.replace("x", ","))) for c in args.configs.split(",")]
        if any(len(c) != 3 for c in args.configs):
            p.error("--configs: expected BxHxT items, e.g. 32x256x100")
    else:
        args.configs = list(CONFIGS)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "torch" in args.impls and available("torch"):
        torch_threads()  # before anything else runs, so the interop setting sticks
    env = environment()
    t0 = time.perf_counter()
    records = run(
        args.cells,
        args.configs,
        args.modes,
        args.impls,
        repeats=args.repeats,
        warmup=args.warmup,
        quiet=args.quiet,
    )
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    env["repeats"] = args.repeats
    cols = columns(args.impls)
    extra = skipped_md(records, args.impls)
    paths = write_results(
        args.out, "frameworks", records, env, cols, extra_md=extra, title="jaxseq vs peers"
    )
    print(format_table(records, cols))
    if extra:
        print("\n" + extra)
    print(f"\nwrote {', '.join(paths.values())} in {env['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
