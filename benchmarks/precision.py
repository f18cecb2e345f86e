"""bf16 mixed precision against float32: the loss curve of a small LSTM language model
at equal steps, and the time of one train step on this backend (interleaved).

    python -m benchmarks.precision --out results          # ~400 steps + H=256 step timing
    python -m benchmarks.precision --out results --quick  # a smoke run

bf16 keeps float32 master weights and optimizer state and runs the forward and
backward in bfloat16 (``make_train_step(..., precision="bf16")``). Its speed-up is an
accelerator matter (bfloat16 matrix units, half the bytes moved); on CPU it is not
expected to be faster. Writes precision.json / .md and precision_curve.png.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

import jaxseq as js
from benchmarks._environment import environment
from benchmarks._output import format_table, write_results
from benchmarks._timing import compile_jitted, time_interleaved


def toy_ids(n_repeats=2000, seed=0):
    """A periodic sequence of 8 token ids with 10% replaced at random."""
    rng = np.random.default_rng(seed)
    ids = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 3, 2, 1, 5]), n_repeats)
    noisy = rng.random(ids.shape) < 0.1
    return np.where(noisy, rng.integers(0, 8, ids.shape), ids).astype(np.int32)


def curve(precision, steps, hidden, quiet):
    lm = js.models.char_lm(8, num_layers=1, hidden_size=hidden, embedding_size=16)
    batches = js.data.StreamBatcher(toy_ids(), 16, 32)
    opt = js.make_optimizer("adam", 3e-3, max_norm=1.0)
    key = jax.random.key(0)
    state = js.init_state(lm.init(key), opt, key, lm.initial_carry((16,)))
    step = js.make_train_step(
        js.training.lm_loss_fn(lm), opt, chunks_per_call=50, precision=precision
    )
    losses = []
    js.fit(step, state, batches, num_steps=steps, progress=not quiet,
           on_step=lambda s, r: losses.append(r["loss"]))  # fmt: skip
    return np.array(losses)


def step_time(hidden, batch, seq, repeats):
    lm = js.models.char_lm(65, num_layers=2, hidden_size=hidden, embedding_size=128)
    chunk = js.data.StreamBatcher(np.arange(batch * (seq + 1) * 2) % 65, batch, seq).at_step(0)
    opt = js.make_optimizer("adam", 2e-3)
    key = jax.random.key(0)
    state = js.init_state(lm.init(key), opt, key, lm.initial_carry((batch,)))
    calls, info = {}, {}
    for p in ("fp32", "bf16"):
        step = js.make_train_step(js.training.lm_loss_fn(lm), opt, precision=p, donate=False)
        calls[p], info[p] = compile_jitted(lambda s, c, f=step: f(s, c), state, chunk)
    return time_interleaved(calls, repeats=repeats, warmup=2, info=info)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    steps, hidden = (100, 32) if a.quick else (400, 64)
    c = {p: curve(p, steps, hidden, a.quiet) for p in ("fp32", "bf16")}
    win = {p: v.reshape(-1, 50).mean(1) for p, v in c.items()}
    records = [
        {"what": f"loss, steps {50 * i + 1}-{50 * (i + 1)} (mean)", "fp32": float(f),
         "bf16": float(b), "bf16 - fp32": float(b - f)}
        for i, (f, b) in enumerate(zip(win["fp32"], win["bf16"]))
    ]  # fmt: skip
    records.append({"what": "max |bf16 - fp32| of a step's loss",
                    "bf16 - fp32": float(np.abs(c["bf16"] - c["fp32"]).max())})  # fmt: skip
    hb, b, k = (64, 8, 16) if a.quick else (256, 32, 64)
    t = step_time(hb, b, k, 5 if a.quick else 20)
    records.append({"what": f"train step median s (2-layer LSTM H={hb}, B={b}, K={k})",
                    "fp32": t["fp32"]["median_s"], "bf16": t["bf16"]["median_s"],
                    "bf16 - fp32": t["bf16"]["median_s"] - t["fp32"]["median_s"]})  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p, v in c.items():
        ax.plot(np.arange(1, len(v) + 1), v, label=p, lw=1)
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title="bf16 mixed precision vs fp32")
    ax.legend()
    fig.tight_layout()
    os.makedirs(a.out, exist_ok=True)
    fig.savefig(f"{a.out}/precision_curve.png", dpi=120)
    env = environment()
    print(format_table(records))
    write_results(a.out, "precision", records, env, title="bf16 mixed precision vs fp32")


if __name__ == "__main__":
    main()
