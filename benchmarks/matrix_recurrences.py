"""Matrix-state recurrences: ``js.recurrent.linear_attention`` per mode against T, and the RG-LRU.

Questions:

1. ``linear_attention``: how do its three modes (``recurrent``: a scan over steps;
   ``chunked``: matmuls inside chunks of 64, a recurrence across chunks;
   ``parallel``: the decay-masked ``T x T`` product) compare, forward and
   forward+backward (``jax.grad`` of ``sum(ys)`` with respect to ``q, k, v,
   log_decay``), as T grows? Shapes ``[T, B, K, D]`` with B=4, K=4 heads,
   Dk=Dv=64, float32, one decay per head (``log_decay [T, B, K]``, chunks of
   64) for every T and one decay per key (``[T, B, K, Dk]``, the library's
   default chunk for it, 32) at the T of ``--per-key-T``. The targets: chunked
   at least 4x faster than recurrent fwd+bwd at T=4096, memory growing
   linearly in T, and fwd+bwd at T=16384 within 2 GiB.
2. The same shapes through ``js.recurrent.mlstm_recurrence`` (chunked, chunks
   of 64; time-major ``[T, B, K, D]``, and heads-major ``[B, K, T, D]``: the
   peer's own arrays) and ``mlstm_kernels``' JAX native chunkwise mLSTM (a peer,
   when importable; the mLSTM adds a normaliser and a max-stabiliser to this
   recurrence), up to ``--mlstm-max-T``.
3. ``js.recurrent.RGLRU(H)`` rollout fwd+bwd at ``(B, T, H) = (4, 4096, 256)``
   against a plain ``lax.scan`` of the same recurrence (same coefficients), the
   cell stepped (``kernel="scan"``) and recurrentgemma's Flax ``RGLRU`` when
   importable.

Contenders of one configuration are timed side by side in interleaved
rounds (medians, ``block_until_ready``, warm-up calls untimed); compile time
(trace + lower + XLA compile) apart. Memory is XLA's buffer sizes of the
compiled program (``compiled.memory_analysis()``: ``temp_mb`` scratch,
``total_mb`` scratch + arguments + outputs). A configuration is skipped, with
the reason in its record, when its buffers exceed ``--max-mem-gb`` (the
parallel mode's ``[B K, T, T]`` products at large T) or when its time,
extrapolated from the previous T, exceeds ``--max-config-s``.

Peers are optional: install them apart from the project's environment and put
them on ``PYTHONPATH``::

    pip install --no-deps --target peers/ mlstm_kernels recurrentgemma \\
        einops jaxtyping wadler_lindig "typeguard<3" sentencepiece
    PYTHONPATH=peers python -m benchmarks.matrix_recurrences --out results/matrix_recurrences

Usage::

    python -m benchmarks.matrix_recurrences --out benchmarks/results/matrix_recurrences [--quick]

Writes ``matrix_recurrences.json``, ``matrix_recurrences.md`` and
``linear_attention_vs_T.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxseq as js
from benchmarks._environment import environment
from benchmarks._output import format_table, progress, write_results
from benchmarks._timing import time_interleaved

MODES = ("recurrent", "chunked", "parallel")
MLSTM = "mlstm_kernels"
MLSTM_OURS = "jaxseq mlstm_recurrence (chunked)"
MLSTM_OURS_HM = "jaxseq mlstm_recurrence (chunked, heads-major)"
T_FULL = (256, 1024, 4096, 16384)
T_QUICK = (64, 256)
CHUNK = 64
PER_KEY_CHUNK = 32  # linear_attention's default chunk for a per-key decay
COLUMNS = [
    "section", "decay", "T", "pass", "mode", "status", "median_ms", "p10_ms", "p90_ms",
    "vs_chunked", "compile_s", "temp_mb", "total_mb", "reason",
]  # fmt: skip


# ----------------------------------------------------------------------------- peers


def load_mlstm():
    """``mlstm_kernels``' JAX native chunkwise mLSTM, or raises ImportError with why.

    Its ``jax.chunkwise`` package imports the Triton backends (``jax_triton``) on
    import, which do not install on CPU; the native backend alone is loaded from
    its files under a package name of its own.
    """
    spec = importlib.util.find_spec("mlstm_kernels")
    if spec is None:
        raise ImportError("mlstm_kernels not installed (see the module docstring)")
    native = Path(spec.submodule_search_locations[0]) / "jax" / "chunkwise" / "native"
    name = "_mlstm_chunkwise_native"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(native)]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.fwbw").mlstm_chunkwise__native_autograd


def load_recurrentgemma():
    """recurrentgemma's Flax ``RGLRU`` layer, or raises ImportError with why."""
    if importlib.util.find_spec("recurrentgemma") is None:
        raise ImportError("recurrentgemma not installed (see the module docstring)")
    return importlib.import_module("recurrentgemma.jax.layers").RGLRU


def _peer(loader):
    """``(object, None)`` or ``(None, "ExcType: message")``."""
    try:
        return loader(), None
    except Exception as e:  # noqa: BLE001 - any import failure is recorded, not raised
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- helpers


def _compile(fn, args, max_bytes: float):
    """``(call, info)`` or ``(None, reason)``: compiled, memory checked, run once."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    info = {"compile_s": time.perf_counter() - t0, "lower_s": lower_s}
    info.update(memory(compiled))
    total = info.get("total_mb")
    if total is not None and total * 2**20 > max_bytes:
        return None, info, f"XLA buffers {total / 1024:.1f} GiB > --max-mem-gb"
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    info["first_call_s"] = time.perf_counter() - t0
    return (lambda: compiled(*args)), info, None


def memory(compiled) -> dict:
    """XLA's buffer sizes (MiB) of a compiled program; empty when the backend has none."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional per backend
        ma = None
    if ma is None:
        return {}
    out = {
        "temp_mb": ma.temp_size_in_bytes / 2**20,
        "args_mb": ma.argument_size_in_bytes / 2**20,
        "out_mb": ma.output_size_in_bytes / 2**20,
    }
    out["total_mb"] = out["temp_mb"] + out["args_mb"] + out["out_mb"]
    return out


def _record(base: dict, name: str, timing: dict | None, info: dict | None, reason=None) -> dict:
    rec = {**base, "mode": name}
    rec.update({k: v for k, v in (info or {}).items()})
    if timing is None:
        rec.update(status="skipped", reason=reason)
        return rec
    rec.update(
        status="ok",
        median_ms=1e3 * timing["median_s"],
        p10_ms=1e3 * timing["p10_s"],
        p90_ms=1e3 * timing["p90_s"],
        repeats=timing["repeats"],
    )
    return rec


def _measure(base, fns: dict, args: dict, cfg, estimates: dict) -> list[dict]:
    """Compiles every contender, skips those over the limits, times the rest interleaved."""
    calls, infos, records = {}, {}, {}
    for name, fn in fns.items():
        est = estimates.get(name)
        if est is not None and est > cfg.max_config_s:
            records[name] = _record(
                base, name, None, None,
                f"extrapolated {est:.0f} s for {cfg.repeats + cfg.warmup + 1} calls "
                f"> --max-config-s {cfg.max_config_s:g}",
            )  # fmt: skip
            continue
        call, info, reason = _compile(fn, args[name], cfg.max_mem_gb * 2**30)
        if call is None:
            records[name] = _record(base, name, None, info, reason)
        else:
            calls[name], infos[name] = call, info
    times = time_interleaved(calls, repeats=cfg.repeats, warmup=cfg.warmup) if calls else {}
    for name in calls:
        records[name] = _record(base, name, times[name], infos[name])
    out = [records[n] for n in fns]
    ref = records.get("chunked", {}).get("median_ms")
    for r in out:
        if ref and r.get("median_ms"):
            r["vs_chunked"] = r["median_ms"] / ref
    return out


# ----------------------------------------------------------------------------- linear attention


def la_inputs(t, batch, heads, dk, dv, per_key: bool):
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (t, batch, heads, dk)) / math.sqrt(dk)
    k = jax.random.normal(kk, (t, batch, heads, dk)) / math.sqrt(dk)
    v = jax.random.normal(kv, (t, batch, heads, dv))
    g_shape = (t, batch, heads, dk) if per_key else (t, batch, heads)
    log_decay = jax.nn.log_sigmoid(3.0 + jax.random.normal(kg, g_shape))
    return q, k, v, log_decay


def la_fn(mode: str, train: bool, per_key: bool = False):
    chunk = PER_KEY_CHUNK if per_key else CHUNK

    def fwd(q, k, v, g):
        return js.recurrent.linear_attention(q, k, v, g, mode=mode, chunk=chunk)[1]

    if not train:
        return fwd
    return jax.grad(lambda q, k, v, g: jnp.sum(fwd(q, k, v, g)), argnums=(0, 1, 2, 3))


def mlstm_fn(kernel, train: bool):
    def fwd(q, k, v, i, f):
        return kernel(q, k, v, i, f, chunk_size=CHUNK)

    if not train:
        return fwd
    return jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2, 3, 4))


def ours_mlstm_fn(train: bool, layout: str = "time_major"):
    def fwd(q, k, v, i, f):
        return js.recurrent.mlstm_recurrence(
            q, k, v, i, f, mode="chunked", chunk=CHUNK, layout=layout
        )[1]

    if not train:
        return fwd
    return jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2, 3, 4))


def time_major(args):
    """The peer's batch-major ``[B, K, T, ...]`` inputs as ``[T, B, K, ...]`` (same values),
    made before timing."""
    return tuple(jnp.moveaxis(x, 2, 0) for x in args)


def mlstm_inputs(t, batch, heads, dk, dv):
    """Batch-major ``[B, K, T, D]`` and gate pre-activations ``[B, K, T]``, made apart
    (no transposes in the timed program)."""
    kq, kk, kv, ki, kf = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(kq, (batch, heads, t, dk))
    k = jax.random.normal(kk, (batch, heads, t, dk))
    v = jax.random.normal(kv, (batch, heads, t, dv))
    i = jax.random.normal(ki, (batch, heads, t))
    f = 3.0 + jax.random.normal(kf, (batch, heads, t))
    return q, k, v, i, f


def _estimates(prev: dict, t: int, calls: int) -> dict:
    """Seconds for ``calls`` calls at ``t`` from the last T measured per contender
    (linear in T; quadratic for the parallel mode)."""
    out = {}
    for name, (t0, ms) in prev.items():
        power = 2 if name == "parallel" else 1
        out[name] = ms / 1e3 * (t / t0) ** power * calls
    return out


def _parallel_fits(t, batch, heads, max_gb) -> str | None:
    gib = batch * heads * t * t * 4 / 2**30
    if gib > max_gb:
        return f"one [B K, T, T] float32 product is {gib:.1f} GiB > --max-mem-gb {max_gb:g}"
    return None


def _mlstm_contenders(cfg, t, train, mlstm, mlstm_error, fns, all_args):
    """Adds the mLSTM rows of a scalar-decay configuration (the peer and
    ``js.recurrent.mlstm_recurrence`` beside it, same inputs) to ``fns``/``all_args``;
    returns why they are skipped (None when they run)."""
    if mlstm is None:
        return mlstm_error
    if t > cfg.mlstm_max_t:
        return (
            f"T > --mlstm-max-T {cfg.mlstm_max_t}: its loop over the T/{CHUNK} chunks is a "
            "Python loop unrolled into the program, so compile time grows with T "
            "(minutes per program at T=4096 on 2 CPU cores)"
        )
    peer_args = mlstm_inputs(t, cfg.batch, cfg.heads, cfg.dk, cfg.dv)
    fns[MLSTM_OURS] = ours_mlstm_fn(train)
    all_args[MLSTM_OURS] = time_major(peer_args)
    fns[MLSTM_OURS_HM] = ours_mlstm_fn(train, "heads_major")  # the peer's arrays as they are
    all_args[MLSTM_OURS_HM] = peer_args
    fns[MLSTM] = mlstm_fn(mlstm, train)
    all_args[MLSTM] = peer_args
    return None


def linear_attention_sweep(cfg, mlstm, mlstm_error) -> list[dict]:
    b, h, dk, dv = cfg.batch, cfg.heads, cfg.dk, cfg.dv
    configs = []
    if "scalar" in cfg.decays:
        configs += [("scalar", t, p) for t in cfg.T for p in ("fwd", "fwd+bwd")]
    if "per_key" in cfg.decays:
        configs += [("per_key", t, p) for t in cfg.per_key_T for p in ("fwd", "fwd+bwd")]
    records, prev = [], {}
    for decay, t, pas in progress(configs, "linear_attention", quiet=cfg.quiet):
        train, per_key = pas == "fwd+bwd", decay == "per_key"
        base = {"section": "linear_attention", "decay": decay, "T": t, "pass": pas, "B": b,
                "K": h, "Dk": dk, "Dv": dv, "chunk": PER_KEY_CHUNK if per_key else CHUNK}  # fmt: skip
        args = la_inputs(t, b, h, dk, dv, per_key)
        fns = {m: la_fn(m, train, per_key) for m in MODES}
        all_args = {m: args for m in MODES}
        pre = _parallel_fits(t, b, h, cfg.max_mem_gb)
        if pre:
            fns.pop("parallel")
        peer_skip = None
        if not per_key and not cfg.no_mlstm:
            peer_skip = _mlstm_contenders(cfg, t, train, mlstm, mlstm_error, fns, all_args)
        key = (decay, pas)
        est = _estimates(prev.get(key, {}), t, cfg.repeats + cfg.warmup + 1)
        recs = _measure(base, fns, all_args, cfg, est)
        if pre:
            recs.insert(2, _record(base, "parallel", None, None, pre))
        if peer_skip is not None:
            recs.append(_record(base, MLSTM, None, None, peer_skip))
        for r in recs:
            if r["status"] == "ok":
                prev.setdefault(key, {})[r["mode"]] = (t, r["median_ms"])
        records += recs
    return records


# ----------------------------------------------------------------------------- RG-LRU


def rglru_sweep(cfg, rg_cls, rg_error) -> list[dict]:
    b, t, hid = cfg.rglru_shape
    base = {"section": "rglru", "decay": "", "T": t, "pass": "fwd+bwd", "B": b, "H": hid}
    cell = js.recurrent.RGLRU(hid)
    params = cell.init(jax.random.key(0), hid)
    xs = jax.random.normal(jax.random.key(1), (t, b, hid))

    def rollout(kernel):
        def loss(p, x):
            return jnp.sum(js.rollout(cell, p, x, kernel=kernel)[1])

        return jax.grad(loss, argnums=(0, 1))

    def lax_scan_loss(p, x):
        a, u = cell.coefficients(p, x @ p.w_ih + p.b[None, None])
        step = lambda hh, au: ((au[0] * hh + au[1]),) * 2
        return jnp.sum(jax.lax.scan(step, jnp.zeros((b, hid)), (a, u))[1])

    fns = {
        "jaxseq_rollout": rollout("auto"),
        "jaxseq_stepped": rollout("scan"),
        "lax_scan": jax.grad(lax_scan_loss, argnums=(0, 1)),
    }
    args = {n: (params, xs) for n in fns}
    if rg_cls is not None:
        layer = rg_cls(width=hid, num_heads=1)
        x_bm = jnp.swapaxes(xs, 0, 1)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        rg_params = layer.init(jax.random.key(2), x_bm, pos)

        def rg_loss(p, x):
            return jnp.sum(layer.apply(p, x, pos, return_cache=False)[0])

        fns["recurrentgemma"] = jax.grad(rg_loss, argnums=(0, 1))
        args["recurrentgemma"] = (rg_params, x_bm)
    recs = _measure(base, fns, args, cfg, {})
    ref = recs[0].get("median_ms")
    for r in recs:
        r.pop("vs_chunked", None)
        if ref and r.get("median_ms"):
            r["vs_jaxseq"] = r["median_ms"] / ref
    if rg_cls is None:
        recs.append(_record(base, "recurrentgemma", None, None, rg_error))
    return recs


# ----------------------------------------------------------------------------- summary


def _find(records, **kw):
    return next((r for r in records if all(r.get(k) == v for k, v in kw.items())), None)


def summary(records, cfg) -> list[str]:
    lines = []
    for decay in ("scalar", "per_key"):
        lines += _decay_summary(records, decay)
    return lines


def _decay_summary(records, decay: str) -> list[str]:
    """The target lines of one decay: the fwd+bwd ratio at T=4096 (or its largest T)
    and the chunked mode's buffers against T."""
    lines = []
    sel = dict(section="linear_attention", decay=decay, **{"pass": "fwd+bwd"})
    ts = sorted({r["T"] for r in records if all(r.get(k) == v for k, v in sel.items())})
    if not ts:
        return lines
    target_t = 4096 if 4096 in ts else ts[-1]
    rec = _find(records, T=target_t, mode="recurrent", **sel)
    chk = _find(records, T=target_t, mode="chunked", **sel)
    if rec and chk and rec.get("median_ms") and chk.get("median_ms"):
        ratio = rec["median_ms"] / chk["median_ms"]
        lines.append(
            f"- {decay} decay, recurrent / chunked, fwd+bwd at T={target_t}: **{ratio:.1f}x** "
            f"({rec['median_ms']:.1f} ms / {chk['median_ms']:.1f} ms, chunk {chk['chunk']}; "
            "target >= 4x)"
        )
    chunked = sorted(
        (r for r in records if r.get("mode") == "chunked" and r.get("total_mb") is not None
         and all(r.get(k) == v for k, v in sel.items())),
        key=lambda r: r["T"],
    )  # fmt: skip
    if len(chunked) >= 2:
        lo, hi = chunked[0], chunked[-1]
        growth = hi["total_mb"] / lo["total_mb"]
        lines.append(
            f"- {decay} decay, chunked fwd+bwd XLA buffers: {lo['total_mb']:.3g} MiB at "
            f"T={lo['T']} -> {hi['total_mb']:.3g} MiB at T={hi['T']} ({growth:.1f}x for "
            f"{hi['T'] // lo['T']}x T; {hi['total_mb'] / hi['T'] * 1024:.0f} KiB per step)"
        )
        lines.append(
            f"- {decay} decay, fits 2 GiB at T={hi['T']}: **{hi['total_mb'] <= 2048}** "
            f"({hi['total_mb']:.3g} MiB)"
        )
    return lines


def plot(records: list[dict], path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    la = [r for r in records if r["section"] == "linear_attention" and r["decay"] == "scalar"]
    if not la:
        return False
    for ax, pas in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for mode in (*MODES, MLSTM_OURS, MLSTM_OURS_HM, MLSTM):
            rs = sorted(
                (r for r in la if r["mode"] == mode and r["pass"] == pas and r["status"] == "ok"),
                key=lambda r: r["T"],
            )
            if rs:
                style = "--" if mode in (MLSTM, MLSTM_OURS, MLSTM_OURS_HM) else "-"
                xs, ys = [r["T"] for r in rs], [r["median_ms"] for r in rs]
                ax.plot(xs, ys, style, marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (steps)")
        ax.set_ylabel(f"{pas}, median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    r0 = la[0]
    fig.suptitle(
        f"linear_attention, scalar decay, B={r0['B']}, K={r0['K']}, Dk=Dv={r0['Dk']}, "
        f"float32, {jax.default_backend()}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/matrix_recurrences")
    ap.add_argument("--quick", action="store_true", help=f"T in {T_QUICK}, small shapes")
    ap.add_argument("--T", default=None, help="comma list of T (default 256,1024,4096,16384)")
    ap.add_argument(
        "--per-key-T", default=None, help="comma list of T of the per-key rows (default 4096)"
    )
    ap.add_argument(
        "--decays",
        default="scalar,per_key",
        help="comma list of the decays to run (scalar, per_key)",
    )
    ap.add_argument("--no-rglru", action="store_true", help="skip the RG-LRU rows")
    ap.add_argument("--no-mlstm", action="store_true", help="skip the mLSTM rows")
    ap.add_argument("-B", "--batch", type=int, default=4)
    ap.add_argument("-K", "--heads", type=int, default=4)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--rglru-shape", default="4,4096,256", help="B,T,H of the RG-LRU rows")
    ap.add_argument(
        "--mlstm-max-T",
        dest="mlstm_max_t",
        type=int,
        default=1024,
        help="largest T of the mlstm_kernels rows (its compile time grows with T)",
    )
    ap.add_argument("--no-peers", action="store_true", help="do not import the peers")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-mem-gb", type=float, default=8.0)
    ap.add_argument("--max-config-s", type=float, default=90.0)
    ap.add_argument("--quiet", action="store_true")
    cfg = ap.parse_args(argv)
    if cfg.T:
        cfg.T = tuple(int(v) for v in cfg.T.split(","))
    else:
        cfg.T = T_QUICK if cfg.quick else T_FULL
    if cfg.quick:
        cfg.repeats, cfg.warmup = min(cfg.repeats, 3), min(cfg.warmup, 1)
        if cfg.rglru_shape == "4,4096,256":
            cfg.rglru_shape = "4,512,64"
    cfg.rglru_shape = tuple(int(v) for v in cfg.rglru_shape.split(","))
    if len(cfg.rglru_shape) != 3:
        ap.error(f"--rglru-shape: expected B,T,H, got {cfg.rglru_shape}")
    return run(cfg)


def run(cfg) -> int:
    """The whole benchmark for parsed options ``cfg``; writes the files in ``cfg.out``."""
    if cfg.per_key_T is None:
        cfg.per_key_T = (4096 if 4096 in cfg.T else max(cfg.T),)
    elif isinstance(cfg.per_key_T, str):
        cfg.per_key_T = tuple(int(v) for v in cfg.per_key_T.split(","))
    if isinstance(cfg.decays, str):
        cfg.decays = tuple(cfg.decays.split(","))
    none = "not imported (--no-peers)"
    mlstm, mlstm_err = (None, none) if cfg.no_peers else _peer(load_mlstm)
    rg, rg_err = (None, none) if cfg.no_peers else _peer(load_recurrentgemma)
    records = linear_attention_sweep(cfg, mlstm, mlstm_err)
    if not cfg.no_rglru:
        records += rglru_sweep(cfg, rg, rg_err)
    print(format_table(records, COLUMNS))
    lines = summary(records, cfg)
    print("\n".join(lines))
    extra = "## Summary\n\n" + "\n".join(lines) if lines else None
    paths = write_results(
        cfg.out,
        "matrix_recurrences",
        records,
        environment(),
        COLUMNS + ["vs_jaxseq"],
        extra_md=extra,
        title="Matrix-state recurrences: linear_attention per mode, and the RG-LRU",
    )
    png = Path(cfg.out) / "linear_attention_vs_T.png"
    plotted = plot(records, png)
    print(f"wrote {paths['json']}, {paths['md']}" + (f", {png}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
