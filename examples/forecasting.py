"""Time-series forecasting: predict the next values of a series from its past,
with a recurrent state carried across training chunks.

The default series is the yearly mean sunspot number, 1700-2008 (309 years),
which ships inside ``statsmodels`` (``pip install statsmodels``, or
``pip install -e ".[examples]"``): it rises and falls in a cycle of about 11
years whose peaks vary from 50 to 190. ``--data CSV`` reads your own series
instead (one numeric column, or name it with ``--column``)::

    python examples/forecasting.py --out out/forecasting
    python examples/forecasting.py --data PATH/series.csv --column value --season 12 --out out/fc
    python examples/forecasting.py --out out/forecasting --resume   # continue a killed run

The first ``1 - --test-fraction`` of the series trains; the rest is held out.
The training part is cut into ``--batch`` contiguous streams (``js.data.SeriesBatcher``)
and each step trains on the next ``--seq`` years of every stream, one step
ahead, starting from the state the previous chunk left. A forecast from an
origin year t reads the ``--context`` true values up to t, then feeds its own
predictions back for ``--horizon`` years. Every origin in the held-out part
whose horizon stays in it is forecast, and the mean absolute error over all
origins and horizons 1..H is compared with two baselines: persistence (every
future year equals year t) and seasonal naive (year t + h equals year
t + h - m, one season of ``--season`` years earlier; 11 for the sunspots),
and with a linear AR(``--ar-lags``) fitted by least squares and iterated the
same way, for reference. ``--lags p`` feeds the last p values at every step
instead of one; ``--noise`` and ``--weight-decay`` regularise (the series is short).

An LSTM and a GRU (``--model lstm,gru``) train side by side, each with
``js.make_train_step`` and ``js.fit``, with checkpoints under ``ckpt/<model>``
every ``--checkpoint-every`` steps: ``--resume`` continues a killed run with
exactly the losses of the uninterrupted run. Writes into ``--out``:
``metrics.jsonl`` and ``eval.jsonl`` (``run`` = model), ``summary.json``
(``mae`` of the first model, ``mae_by_model``, ``mae_naive`` (seasonal naive),
``mae_persistence``, ``mae_linear_ar``, the MAE per horizon), ``forecasts.png`` (forecasts against
the truth and the baselines, and the error per horizon), ``curves.png`` and
``forecasts.txt``.
"""

from __future__ import annotations

import csv
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    append_evals,
    environment,
    js,
    parser,
    prepare_out,
    pyplot,
    run_logger,
    start,
    trim_run_logs,
    write_json,
)

CELLS = ("lstm", "gru", "rnn")
NO_SERIES = (
    "no series: the default (yearly sunspot numbers) needs statsmodels, which ships them "
    '(pip install statsmodels, or pip install -e ".[examples]"); or pass your own with '
    "--data CSV (one numeric column, or --column NAME)"
)
# Settings that define a run: a resumed run must agree on them (or pass --override).
HPARAMS = (
    "model", "layers", "hidden", "noise", "weight_decay", "lags", "batch", "seq", "steps", "lr", "clip", "seed", "test_fraction",
    "data", "column",
)  # fmt: skip


def load_sunspots():
    """``(years int[N], values float64[N])`` of the yearly sunspot numbers in statsmodels."""
    try:
        from statsmodels.datasets import sunspots
    except ImportError:
        raise SystemExit(NO_SERIES) from None
    data = sunspots.load_pandas().data
    return data["YEAR"].to_numpy().astype(int), data["SUNACTIVITY"].to_numpy(np.float64)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def read_csv_series(path: str, column: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(index int[N], values float64[N], column name)`` from a CSV file.

    The first row is a header when one of its cells is not a number. Without
    ``column`` the file must have exactly one numeric column; ``column`` is a
    header name or a 0-based index. Raises ``SystemExit`` naming the flag at fault.
    """
    if not os.path.exists(path):
        raise SystemExit(f"--data: no such file: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise SystemExit(f"--data: {path} is empty")
    header = None
    if any(_number(c) is None for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise SystemExit(f"--data: {path} has a header and no values")
    width = len(rows[0])
    names = header or [str(i) for i in range(width)]
    if column is not None:
        if column in names:
            col = names.index(column)
        elif column.isdigit() and int(column) < width:
            col = int(column)
        else:
            raise SystemExit(
                f"--column: expected one of {names} (or an index < {width}), got {column!r}"
            )
    elif width == 1:
        col = 0
    else:
        numeric = [
            j for j in range(width) if all(_number(r[j]) is not None for r in rows if j < len(r))
        ]
        if len(numeric) != 1:
            raise SystemExit(
                f"--column: {path} has {len(numeric)} numeric columns "
                f"({[names[j] for j in numeric]}); name the series with --column NAME or an index"
            )
        col = numeric[0]
    values = []
    for i, r in enumerate(rows):
        v = _number(r[col]) if col < len(r) else None
        if v is None or not np.isfinite(v):
            line = i + 1 + (header is not None)
            raise SystemExit(
                f"--data: line {line} of {path}: expected a number in column {names[col]!r}, got {r!r}"
            )
        values.append(v)
    return np.arange(len(values)), np.asarray(values, np.float64), names[col]


def estimate_season(train: np.ndarray, max_lag: int) -> int:
    """The lag in ``[2, max_lag]`` with the largest autocorrelation of the training part."""
    x = train - train.mean()
    denom = float(np.dot(x, x)) or 1.0
    lags = np.arange(2, max(max_lag, 2) + 1)
    acf = np.array([np.dot(x[:-k], x[k:]) / denom for k in lags])
    return int(lags[int(np.argmax(acf))])


def lag_windows(x: np.ndarray, h: int) -> np.ndarray:
    """``[N, H]``: row t holds ``x[t-H+1 .. t]`` (rows before H-1 start with zeros)."""
    padded = np.concatenate([np.zeros(h - 1, x.dtype), x])
    return np.stack([padded[j : j + len(x)] for j in range(h)], axis=1)


def linear_ar(series: np.ndarray, n_train: int, origins: np.ndarray, horizon: int, p: int):
    """Forecasts ``[O, H]`` of a linear AR(p) fitted by least squares on ``series[:n_train]``,
    iterated like the recurrent models (each prediction fed back)."""
    x = np.stack([series[t - p : t] for t in range(p, n_train)])
    coef = np.linalg.lstsq(np.c_[x, np.ones(len(x))], series[p:n_train], rcond=None)[0]
    out = np.zeros((len(origins), horizon))
    for i, o in enumerate(origins):
        hist = list(series[o - p + 1 : o + 1])
        for h in range(horizon):
            out[i, h] = np.dot(hist[-p:], coef[:-1]) + coef[-1]
            hist.append(out[i, h])
    return out


def baselines(series: np.ndarray, origins: np.ndarray, horizon: int, season: int):
    """``(persistence, seasonal naive)`` forecasts ``[O, H]`` from each origin.

    Persistence: ``y[t + h] = y[t]``; seasonal naive: ``y[t + h] = y[t + h - k m]``
    with the smallest k that reaches back to ``t`` or earlier.
    """
    h = np.arange(1, horizon + 1)
    back = h - season * np.ceil(h / season).astype(int)  # <= 0
    persistence = np.repeat(series[origins][:, None], horizon, axis=1)
    seasonal = series[origins[:, None] + back[None, :]]
    return persistence, seasonal


def parse_args(argv=None):
    p = parser(__doc__, steps=1000, out="out/forecasting", lr=1e-3, batch=4, eval_every=250,
               batch_help="B, parallel streams of the training part")  # fmt: skip
    d = p.add_argument_group("data")
    d.add_argument(
        "--data", help="a CSV file with your series (default: sunspots from statsmodels)"
    )
    d.add_argument("--column", help="the CSV column of the series (header name or 0-based index)")
    d.add_argument("--test-fraction", type=float, default=0.2, help="held-out last part")
    d.add_argument("--season", type=int, default=None,
                   help="seasonal-naive period (default: 11 for the sunspots, else the "
                        "training part's autocorrelation peak)")  # fmt: skip
    m = p.add_argument_group("model")
    m.add_argument("--model", default="lstm,gru", help=f"comma-separated, from {CELLS}")
    m.add_argument("--layers", type=int, default=1)
    m.add_argument("--hidden", type=int, default=16)
    m.add_argument("--noise", type=float, default=0.0,
                   help="std of Gaussian noise added to the training inputs (scaled units)")  # fmt: skip
    m.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    m.add_argument("--lags", type=int, default=1, help="p, the last p values are each step's input")
    t = p.add_argument_group("training and forecasts")
    t.add_argument("--seq", type=int, default=16, help="K, truncation length (steps per chunk)")
    t.add_argument("--horizon", type=int, default=11, help="H, steps forecast from each origin")
    t.add_argument("--ar-lags", type=int, default=9,
                   help="p of the linear AR(p) reference (least squares)")  # fmt: skip
    t.add_argument("--context", type=int, default=None,
                   help="true values read before each forecast (default: the stream length)")  # fmt: skip
    o = p.add_argument_group("checkpoints")
    o.add_argument("--checkpoint-every", type=int, default=500)
    o.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    o.add_argument("--override", action="store_true", help="resume even if hyperparameters differ")
    o.add_argument(
        "--strict-resume",
        action="store_true",
        help="with --resume: stop at a damaged newest checkpoint (default: warn and resume "
        "from the newest intact one)",
    )
    args = p.parse_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in models if m not in CELLS]
    if not models or bad or len(set(models)) != len(models):
        p.error(f"--model: expected distinct names from {CELLS}, got {args.model!r}")
    args.models = models
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction: expected a value in (0, 1), got {args.test_fraction}")
    for flag in ("horizon", "seq", "hidden", "layers", "steps", "batch", "lags", "ar_lags"):
        if getattr(args, flag) < 1:
            p.error(
                f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}"
            )
    return args


def make_model(cell: str, hidden: int, layers: int) -> js.Stack:
    return js.Stack([js.models.CELLS[cell](hidden) for _ in range(layers)])


def main(argv=None) -> dict:
    args = start(parse_args(argv))
    if args.data:
        index, values, name = read_csv_series(args.data, args.column)
        source = f"{args.data} ({name})"
    else:
        index, values = load_sunspots()
        source = "statsmodels.datasets.sunspots (yearly mean sunspot number)"
    n = len(values)
    n_train = int(round(n * (1.0 - args.test_fraction)))
    n_test = n - n_train
    if n_test < args.horizon + 1:
        raise SystemExit(
            f"--horizon: {args.horizon} needs a held-out part of at least {args.horizon + 1} "
            f"values, got {n_test} of {n} (raise --test-fraction or lower --horizon)"
        )
    train = values[:n_train]
    season = args.season or (11 if not args.data else estimate_season(train, n_train // 3))
    if not 1 <= season < n_train:
        raise SystemExit(f"--season: expected a period in [1, {n_train}), got {season}")
    if 2 * args.ar_lags + 2 > n_train:
        raise SystemExit(f"--ar-lags: {args.ar_lags} is too many for {n_train} training values")
    mean, std = float(train.mean()), float(train.std()) or 1.0
    # row t holds the last p = --lags values up to t: the model's input at step t
    windows = lag_windows(((values - mean) / std).astype(np.float32), args.lags)  # [N, p]

    # data first: bad sizes fail here, before anything compiles
    try:
        batcher = js.data.SeriesBatcher(windows[:n_train], args.batch, args.seq)
    except ValueError as e:
        raise SystemExit(f"--batch/--seq: {e}") from None
    stream_len = n_train // args.batch
    context = args.context or stream_len
    # forecast origins: every t whose H next values lie in the held-out part
    origins = np.arange(n_train - 1, n - args.horizon)
    if origins[0] + 1 < context:
        raise SystemExit(
            f"--context: {context} is longer than the {origins[0] + 1} values before the first origin"
        )
    ctx = np.stack([windows[o - context + 1 : o + 1] for o in origins], axis=1)  # [W, O, p]
    truth = np.stack([values[o + 1 : o + 1 + args.horizon] for o in origins])  # [O, H]
    persistence, seasonal = baselines(values, origins, args.horizon, season)
    mae_persistence = float(np.mean(np.abs(persistence - truth)))
    mae_naive = float(np.mean(np.abs(seasonal - truth)))
    ar = linear_ar(values, n_train, origins, args.horizon, args.ar_lags)

    os.makedirs(args.out, exist_ok=True)
    if not args.resume:
        prepare_out(args.out)
    hparams = {h: getattr(args, h) for h in HPARAMS}
    summary = {
        "series": source, "n": n, "n_train": n_train, "n_test": n_test,
        "first_test_index": int(index[n_train]), "horizon": args.horizon, "season": season,
        "origins": len(origins), "context": context, "steps": args.steps, "hparams": hparams,
        "models": {}, **environment(),
    }  # fmt: skip
    forecasts = {}
    for mi, name in enumerate(args.models):
        stack = make_model(name, args.hidden, args.layers)
        k_init, k_head, k_train = jax.random.split(jax.random.key(args.seed * 100 + mi), 3)
        params = {
            "stack": stack.init(k_init, args.lags),
            "head": js.nn.Dense(1).init(k_head, stack.output_size),
        }

        def loss_fn(p, carry, chunk, key, stack=stack):
            xs = chunk.inputs  # [K, B, p]: the last p values up to t
            if args.noise > 0:
                xs = xs + args.noise * jax.random.normal(key, xs.shape, xs.dtype)
            carry, ys = js.rollout(stack, p["stack"], xs, carry, reset=chunk.reset)
            # the target: the value after t (the newest of the next window)
            loss = js.training.mse(js.nn.dense(p["head"], ys), chunk.targets[..., -1:], chunk.mask)
            return loss, (carry, {"mse": loss})

        @jax.jit
        def forecast(p, ctx, stack=stack):
            """``ctx [W, O, p]`` true windows up to each origin -> ``[O, H]`` forecasts,
            each step's prediction fed back as the newest value of the next window."""
            carry, ys = js.rollout(stack, p["stack"], ctx)
            window, x = ctx[-1], js.nn.dense(p["head"], ys[-1])  # [O, p], [O, 1]
            out = [x]
            for _ in range(args.horizon - 1):
                window = jnp.concatenate([window[:, 1:], x], axis=-1)
                carry, y = js.rollout(stack, p["stack"], window[None], carry)
                x = js.nn.dense(p["head"], y[0])
                out.append(x)
            return jnp.concatenate(out, axis=-1) * std + mean

        def eval_fn(st, forecast=forecast, name=name):
            """Held-out MAE, logged at once (a killed run keeps the evaluations it made)."""
            pred = np.asarray(forecast(st.params, ctx))
            rec = {"test_mae": float(np.mean(np.abs(pred - truth)))}
            append_evals(args.out, name, [{"step": int(st.step), **rec}])
            return rec

        opt = js.make_optimizer(
            "adamw" if args.weight_decay else "adam", args.lr, max_norm=args.clip,
            weight_decay=args.weight_decay,
        )  # fmt: skip
        state = js.init_state(params, opt, k_train, stack.initial_carry((args.batch,)))
        ckpt = js.Checkpointer(
            os.path.join(args.out, "ckpt", name), keep=2, hparams={**hparams, "run": name}
        )
        if args.resume and ckpt.latest_step() is not None:
            state, _ = ckpt.restore(state, override=args.override, strict=args.strict_resume)
            print(f"{name}: resumed from step {int(state.step)}", file=sys.stderr)
        trim_run_logs(args.out, name, int(state.step))
        state, info = js.fit(
            js.make_train_step(loss_fn, opt, precision=args.precision), state, batcher, num_steps=args.steps,
            checkpointer=ckpt, checkpoint_every=args.checkpoint_every, eval_fn=eval_fn,
            eval_every=args.eval_every, on_step=run_logger(args.out, name), progress=not args.quiet,
        )  # fmt: skip
        ckpt.close()
        pred = np.asarray(forecast(state.params, ctx))
        forecasts[name] = pred
        err = np.abs(pred - truth)
        summary["models"][name] = {
            "mae": float(err.mean()), "mae_by_horizon": err.mean(0).round(3).tolist(),
            "step": int(state.step), "stopped": info["stopped"], "train_s": round(info["train_s"], 2),
        }  # fmt: skip

    first = args.models[0]
    best_baseline = min(mae_naive, mae_persistence)
    summary.update(
        mae=summary["models"][first]["mae"],
        mae_by_model={k: r["mae"] for k, r in summary["models"].items()},
        mae_naive=mae_naive,
        mae_persistence=mae_persistence,
        mae_linear_ar=float(np.mean(np.abs(ar - truth))),
        mae_naive_by_horizon=np.abs(seasonal - truth).mean(0).round(3).tolist(),
        mae_persistence_by_horizon=np.abs(persistence - truth).mean(0).round(3).tolist(),
        mae_linear_ar_by_horizon=np.abs(ar - truth).mean(0).round(3).tolist(),
        improvement_over_best_baseline=1.0 - summary["models"][first]["mae"] / best_baseline,
        train_s=round(sum(r["train_s"] for r in summary["models"].values()), 2),
    )
    write_forecasts(
        args, index, values, n_train, origins, truth, forecasts, persistence, seasonal, ar
    )
    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        print(f"held-out MAE over horizons 1..{args.horizon} from {len(origins)} origins:")
        for k, r in summary["models"].items():
            print(f"  {k:12s} {r['mae']:8.3f}  ({r['train_s']:.0f} s)")
        print(f"  {'seasonal':12s} {mae_naive:8.3f}  (naive, m = {season})")
        print(f"  {'persistence':12s} {mae_persistence:8.3f}")
        print(f"  {'linear AR':12s} {summary['mae_linear_ar']:8.3f}  (p = {args.ar_lags})")
    return summary


def write_forecasts(
    args, index, values, n_train, origins, truth, forecasts, persistence, seasonal, ar
):
    """``forecasts.png`` (trajectories from every H-th origin, and MAE per horizon) and ``forecasts.txt``."""
    plt = pyplot()
    h = args.horizon
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    lo = max(0, n_train - 3 * h)
    ax.plot(index[lo:], values[lo:], "k-", lw=1.5, label="truth")
    ax.axvspan(index[n_train], index[-1], color="0.92", zorder=0, label="held out")
    colors = {"lstm": "C0", "gru": "C1", "rnn": "C4"}
    for j, i in enumerate(range(0, len(origins), h)):
        xs = index[origins[i] + 1 : origins[i] + 1 + h]
        lab = j == 0
        for name, pred in forecasts.items():
            ax.plot(xs, pred[i], "-", color=colors.get(name), lw=1.5, label=name if lab else None)
        ax.plot(xs, seasonal[i], ":", color="C2", label="seasonal naive" if lab else None)
        ax.plot(xs, persistence[i], "--", color="C3", lw=1, label="persistence" if lab else None)
    ax.set_title(f"forecasts {h} steps ahead from every {h}-th origin of the held-out part")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(True, alpha=0.3)
    hs = np.arange(1, h + 1)
    for name, pred in forecasts.items():
        ax2.plot(hs, np.abs(pred - truth).mean(0), "-o", ms=3, color=colors.get(name), label=name)
    ax2.plot(hs, np.abs(seasonal - truth).mean(0), ":o", ms=3, color="C2", label="seasonal naive")
    ax2.plot(hs, np.abs(persistence - truth).mean(0), "--o", ms=3, color="C3", label="persistence")
    ax2.plot(hs, np.abs(ar - truth).mean(0), "-.", color="0.4", label=f"linear AR({args.ar_lags})")
    ax2.set_xlabel("horizon h (steps ahead)")
    ax2.set_ylabel("held-out MAE")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "forecasts.png"), dpi=100)
    plt.close(fig)
    with open(os.path.join(args.out, "forecasts.txt"), "w") as f:
        names = list(forecasts)
        f.write(f"forecasts from every {h}-th origin: index, truth, " + ", ".join(names)
                + ", seasonal naive, persistence\n")  # fmt: skip
        for i in range(0, len(origins), h):
            f.write(f"\norigin {index[origins[i]]} (value {values[origins[i]]:.1f})\n")
            for k in range(h):
                row = (
                    [truth[i, k]]
                    + [forecasts[m][i, k] for m in names]
                    + [seasonal[i, k], persistence[i, k]]
                )
                f.write(
                    f"{index[origins[i] + 1 + k]:>6} " + " ".join(f"{v:8.1f}" for v in row) + "\n"
                )


if __name__ == "__main__":
    main()
