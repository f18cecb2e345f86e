"""Character language models on tiny Shakespeare: recurrent (char-rnn), a causal
Transformer and the fixed-window neural LM, trained by jaxseq's truncated-BPTT loop.

    python examples/char_lm.py --data PATH/tinyshakespeare.txt --out out/char_lm
    python examples/char_lm.py --download --out out/char_lm   # fetch the corpus once (cached)
    python examples/char_lm.py --data ... --out out/char_lm --resume   # continue a run
    python examples/char_lm.py --data ... --model transformer --layers 4 --d-model 256
    python examples/char_lm.py --data ... --model window --context 16
    python examples/char_lm.py --data ... --compare lstm,gru,transformer,window --time-budget 300
    python examples/char_lm.py --data ... --compare lstm,mlstm,slstm,rglru,xlstm --time-budget 60

Models (``--model``): the recurrent cells of ``js.models.CELLS`` (lstm, gru, rnn,
minGRU/minLSTM, the mLSTM and sLSTM of xLSTM and Griffin's RG-LRU: mlstm, slstm,
rglru; sizes ``--layers --hidden --embed``, ``--heads`` for mlstm/slstm; the
RG-LRU layers run Griffin-style, in a ``js.Stack(..., residual=True, norm="rms")``:
each layer's input RMS-normalised, a final RMS norm before the head), ``xlstm``
(mLSTM layers with an sLSTM at index 1 of every eight, ``js.models.xlstm_stack``:
``--layers 2`` is mLSTM then sLSTM), ``transformer`` (pre-LN causal blocks,
``--layers --d-model --heads --max-len --positions rotary|learned``) and ``window``
(Bengio et al. 2003: concatenated embeddings of the last ``--context`` characters,
one tanh layer of ``--hidden`` units; ``--embed`` per character). A size flag not
given takes the model's default.

The text is cut into B contiguous streams (first 90% for training, last 10%
for validation); each step trains on the next K characters of every stream,
starting from the carry the previous chunk left: the recurrent state, the
Transformer's key/value cache (the last ``--max-len`` positions, without
gradient; with rotary positions every character sees that much context, in
training and evaluation), or the window model's last n-1 characters.
``--no-carry`` resets it at every chunk instead (learned Transformer positions
always do: they stop at ``--max-len``).

Writes into ``--out``: ``metrics.jsonl`` (one line per step: step, loss,
grad_norm, lr, tokens_per_s, ...), ``eval.jsonl`` (validation loss in
nats/char over training), ``summary.json`` (``val_loss``, ``tokens_per_s`` and
more), ``samples.txt`` (generated text after ``--prime``: greedy, temperature,
top-k, top-p), ``curves.png``, and checkpoints under ``ckpt/``. ``--compare``
trains each listed model in turn with the same ``--time-budget`` into
``--out/<model>/`` and writes ``compare.png`` (validation loss against training
time, all models) and ``val_loss_by_model`` in ``--out/summary.json``.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    environment,
    is_writer,
    js,
    parser,
    prepare_out,
    pyplot,
    read_data,
    start,
    write_json,
)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# lstm, gru, rnn, ..., mlstm, slstm, rglru: any cell the library adds; and the xLSTM stack
RECURRENT = (*js.models.CELLS, "xlstm")
HEADED = ("mlstm", "slstm", "xlstm")  # cells with heads: --heads
MODELS = (*RECURRENT, "transformer", "window")

# The defaults of the size flags and the learning rate, per kind of model.
DEFAULTS = {
    "recurrent": {"layers": 2, "hidden": 256, "embed": 128, "lr": 2e-3},
    "transformer": {"layers": 4, "lr": 1e-3},
    "window": {"hidden": 512, "embed": 32, "lr": 2e-3},
}

# Settings that define a run: a resumed run must agree on them (or pass --override).
HPARAMS = (
    "model", "layers", "hidden", "embed", "d_model", "heads", "max_len", "positions", "mlp",
    "context", "batch", "seq", "steps", "optimizer", "lr", "warmup", "schedule", "final_lr",
    "clip", "weight_decay", "dropout", "variational_dropout", "weight_dropout", "seed", "no_carry",
    "chunks_per_call", "train_fraction", "cooldown",
)  # fmt: skip


def _kind(model: str) -> str:
    return model if model in ("transformer", "window") else "recurrent"


def parse_args(argv=None):
    p = parser(
        __doc__, steps=2000, out="out/char_lm", lr=2e-3, batch=32, eval_every=250,
        batch_help="B, parallel streams",
    )  # fmt: skip
    p.set_defaults(lr=None)  # per model (DEFAULTS) unless given
    src = p.add_argument_group("data")
    src.add_argument("--data", help="path of the training text (e.g. tinyshakespeare.txt)")
    src.add_argument(
        "--download", action="store_true", help=f"fetch tiny Shakespeare from {URL} (cached)"
    )
    src.add_argument("--train-fraction", type=float, default=0.9)
    m = p.add_argument_group("model (a size flag not given takes the model's default)")
    m.add_argument("--model", choices=MODELS, default="lstm")
    m.add_argument(
        "--compare",
        default=None,
        help="comma-separated models trained in turn with the same --time-budget, "
        "e.g. lstm,gru,transformer,window",
    )
    m.add_argument("--layers", type=int, help="recurrent or Transformer layers (2 / 4)")
    m.add_argument(
        "--hidden", type=int, help="recurrent state size (256) or window tanh units (512)"
    )
    m.add_argument("--embed", type=int, help="character embedding size (128; window: 32 each)")
    m.add_argument("--d-model", type=int, default=256, help="Transformer: model size D")
    m.add_argument(
        "--heads",
        type=int,
        default=4,
        help="Transformer: attention heads; mlstm/slstm/xlstm: heads",
    )
    m.add_argument(
        "--max-len", type=int, default=256,
        help="Transformer: positions each character attends to (the key/value cache size)",
    )  # fmt: skip
    m.add_argument("--positions", choices=("rotary", "learned"), default="rotary")
    m.add_argument("--mlp", type=int, default=None, help="Transformer: MLP size (4 * D)")
    m.add_argument("--context", type=int, default=16, help="window: characters per prediction")
    m.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout on embeddings, between layers (residual branches) and before the head",
    )
    m.add_argument(
        "--variational-dropout",
        action="store_true",
        help="recurrent: one dropout mask per stream and chunk, shared by its K steps",
    )
    m.add_argument(
        "--weight-dropout",
        type=float,
        default=0.0,
        help="rnn, lstm, gru, slstm, xlstm: DropConnect on the recurrent weights (AWD-LSTM's "
        "weight drop), one mask per chunk",
    )
    t = p.add_argument_group("training")
    t.add_argument("--seq", type=int, default=64, help="K, truncation length (steps per chunk)")
    t.add_argument(
        "--time-budget", type=float, default=None,
        help="stop after this many seconds of training (evaluation and checkpoints excluded)",
    )  # fmt: skip
    t.add_argument("--minutes", type=float, default=None, help="--time-budget in minutes")
    t.add_argument("--optimizer", choices=js.training.OPTIMIZERS, default="adam")
    t.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    t.add_argument(
        "--schedule", choices=("constant", "cosine", "wsd"), default="constant",
        help="after the warmup: constant, cosine decay to --final-lr, or warmup-stable-decay "
        "(constant, then a 1 - sqrt decay over the last --cooldown of the steps)",
    )  # fmt: skip
    t.add_argument(
        "--final-lr", type=float, default=0.05, help="cosine, wsd: final lr as a fraction of --lr"
    )
    t.add_argument(
        "--cooldown", type=float, default=0.2, help="wsd: the decaying fraction of the steps"
    )
    t.add_argument("--weight-decay", type=float, default=0.0, help="adamw only")
    t.add_argument("--no-carry", action="store_true", help="reset the carry at every chunk")
    t.add_argument(
        "--chunks-per-call", type=int, default=1, help="chunks scanned inside one jitted call"
    )
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint-every", type=int, default=500)
    o.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    o.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    o.add_argument("--override", action="store_true", help="resume even if hyperparameters differ")
    o.add_argument(
        "--strict-resume",
        action="store_true",
        help="with --resume: stop at a damaged newest checkpoint (default: warn and resume "
        "from the newest intact one)",
    )
    o.add_argument("--eval-streams", type=int, default=32)
    o.add_argument("--sample-len", type=int, default=300)
    o.add_argument("--prime", default="ROMEO:\n", help="the text every sample starts from")
    o.add_argument("--temperature", type=float, default=0.8)
    o.add_argument("--top-k", type=int, default=10)
    o.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: kept mass")
    args = p.parse_args(argv)
    if not 0.0 < args.cooldown <= 1.0:
        p.error(f"--cooldown: expected a fraction of the steps in (0, 1], got {args.cooldown}")
    if args.minutes is not None:
        if args.time_budget is not None:
            p.error("--minutes and --time-budget: give one of them")
        args.time_budget = 60.0 * args.minutes
    if args.compare is not None:
        names = [s.strip() for s in args.compare.split(",") if s.strip()]
        bad = [s for s in names if s not in MODELS]
        if not names or bad or len(set(names)) != len(names):
            p.error(
                f"--compare: expected distinct models among {list(MODELS)}, got {args.compare!r}"
            )
        args.compare = names
    return args


def resolve(args, model: str):
    """A copy of ``args`` for ``model``: unset size flags and lr take the model's defaults."""
    a = type(args)(**vars(args))
    a.model = model
    for name, value in DEFAULTS[_kind(model)].items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if _kind(model) == "transformer" and a.positions == "learned":
        a.no_carry = True  # learned positions stop at --max-len: every chunk starts afresh
    return a


def build_model(args, vocab_size: int):
    """The library model ``args.model`` names, with its size flags."""
    kind = _kind(args.model)
    if kind != "recurrent" and args.weight_dropout:
        raise SystemExit(f"--weight-dropout: the recurrent models only, not --model {args.model}")
    if kind == "transformer":
        if args.positions == "learned" and args.seq > args.max_len:
            raise SystemExit(
                f"--seq {args.seq}: learned positions stop at --max-len {args.max_len}; "
                "use a shorter --seq, a larger --max-len or --positions rotary"
            )
        return js.models.transformer_lm(
            vocab_size, num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
            max_len=args.max_len, positions=args.positions, mlp_size=args.mlp,
            dropout_rate=args.dropout,
        )  # fmt: skip
    if kind == "window":
        return js.models.window_lm(
            vocab_size, context=args.context, embedding_size=args.embed,
            hidden_size=args.hidden, dropout_rate=args.dropout,
        )  # fmt: skip
    return js.models.char_lm(
        vocab_size, cell=args.model, num_layers=args.layers, hidden_size=args.hidden,
        embedding_size=args.embed, dropout_rate=args.dropout,
        variational_dropout=args.variational_dropout,
        weight_dropout=args.weight_dropout,
        cell_kwargs={"num_heads": args.heads} if args.model in HEADED else None,
    )  # fmt: skip


def load_text(args) -> str:
    path = args.data
    if not path and args.download:
        try:
            path = js.data.download(URL, SHA256, filename="tinyshakespeare.txt")
        except RuntimeError as e:
            raise SystemExit(
                f"{e}\nNo network? Pass the corpus with --data PATH instead."
            ) from None
    return read_data(path, "a text file (e.g. tinyshakespeare.txt), or --download")


def write_samples(args, model, params, vocab, key) -> None:
    """``samples.txt``: greedy, temperature, top-k and top-p continuations of ``--prime``."""
    prime = vocab.encode(args.prime or "\n")
    length = args.sample_len
    note = ""
    if getattr(model, "positions", None) == "learned":  # no position past max_len
        if len(prime) >= model.max_len:
            prime = prime[len(prime) - model.max_len + 1 :]
            note += f" (prime cut to its last {len(prime)} characters: --max-len)"
        if len(prime) + length > model.max_len:
            length = model.max_len - len(prime)
            note += f" ({length} characters: learned positions stop at --max-len {model.max_len})"
    settings = [
        ("greedy", {"greedy": True}),
        (f"temperature {args.temperature}", {"temperature": args.temperature}),
        (
            f"temperature {args.temperature}, top-k {args.top_k}",
            {"temperature": args.temperature, "top_k": min(args.top_k, vocab.size)},
        ),
    ]
    if "top_p" in inspect.signature(js.decoding.sample).parameters:
        settings.append(
            (
                f"temperature {args.temperature}, top-p {args.top_p}",
                {"temperature": args.temperature, "top_p": args.top_p},
            )
        )
    settings.append(("temperature 1.0", {"temperature": 1.0}))
    lines = []
    text = vocab.decode(prime)
    for label, kw in settings:
        ids = js.decoding.sample(key, model, params, prime, length, **kw)
        lines.append(f"=== {label}, primed with {text!r}{note} ===\n{text}{vocab.decode(ids)}\n")
    with open(os.path.join(args.out, "samples.txt"), "w") as f:
        f.write("\n".join(lines))


def train(args, text: str) -> dict:
    """Trains ``args.model`` (resolved) into ``args.out``; returns its summary."""
    vocab = js.data.CharVocab.from_text(text)
    train_text, val_text = js.data.split_text(text, args.train_fraction)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)

    model = build_model(args, vocab.size)
    # data first: bad sizes fail here, before anything compiles
    batcher = js.data.StreamBatcher(
        train_ids, args.batch, args.seq, reset_every_chunk=args.no_carry, vocab_size=vocab.size
    )
    eval_streams = min(args.eval_streams, max(1, (len(val_ids) - 1) // (args.seq + 1)))
    n_dev = jax.device_count()  # evaluation streams split evenly over the devices
    eval_streams = max(n_dev, eval_streams - eval_streams % n_dev)
    val_batcher = js.data.StreamBatcher(
        val_ids, eval_streams, args.seq, vocab_size=vocab.size,
        reset_every_chunk=getattr(model, "positions", None) == "learned",
    )  # fmt: skip
    steps = args.steps - args.steps % args.chunks_per_call
    opt = js.make_optimizer(
        args.optimizer, args.lr, max_norm=args.clip, warmup_steps=args.warmup,
        total_steps=steps if args.schedule in ("cosine", "wsd") else None,
        cooldown_steps=max(1, round(args.cooldown * steps)) if args.schedule == "wsd" else None,
        final_lr_ratio=args.final_lr, weight_decay=args.weight_decay,
    )  # fmt: skip

    key = jax.random.key(args.seed)
    k_init, k_train, k_sample = jax.random.split(key, 3)
    params = model.init(k_init)
    state = js.init_state(params, opt, k_train, model.initial_carry((args.batch,)))
    hparams = {h: getattr(args, h) for h in HPARAMS}
    if not args.weight_dropout:  # recorded only when set: earlier runs still resume
        del hparams["weight_dropout"]
    if args.schedule != "wsd":
        del hparams["cooldown"]
    hparams["vocab"] = vocab.chars
    os.makedirs(args.out, exist_ok=True)
    ckpt = js.Checkpointer(
        os.path.join(args.out, "ckpt"), keep=args.keep, model_config=model.config(), hparams=hparams
    )
    mesh = None
    if jax.device_count() > 1:  # several devices or processes: data parallel over all
        mesh = js.training.make_mesh()
        state = js.training.shard_state(state, mesh)
    elapsed = 0.0
    if args.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state, override=args.override, strict=args.strict_resume)
        elapsed = float(meta.get("train_s", 0.0))
        print(f"resumed from step {int(state.step)} ({elapsed:.0f} s of training)", file=sys.stderr)
    elif not args.resume:
        prepare_out(args.out)  # a fresh run: no logs of an earlier one

    step_fn = js.make_train_step(
        js.training.lm_loss_fn(model), opt, chunks_per_call=args.chunks_per_call,
        precision=args.precision,
    )  # fmt: skip
    eval_step = js.training.make_eval_step(model)

    def eval_fn(st):
        t0 = time.perf_counter()
        v = js.training.evaluate_lm(model, st.params, val_batcher, eval_step=eval_step, mesh=mesh)
        return {"val_loss": v, "eval_s": round(time.perf_counter() - t0, 2)}

    t_start = time.perf_counter()
    state, info = js.fit(
        step_fn, state, batcher, num_steps=steps, max_seconds=args.time_budget,
        elapsed_s=elapsed, out_dir=args.out, checkpointer=ckpt,
        checkpoint_every=args.checkpoint_every, eval_fn=eval_fn, eval_every=args.eval_every,
        mesh=mesh, progress=not args.quiet,
    )  # fmt: skip
    wall = time.perf_counter() - t_start
    ckpt.close()

    params = jax.device_get(state.params)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    summary = {
        "val_loss": info["evals"][-1]["val_loss"] if info["evals"] else None,
        "val_bits_per_char": None,
        "model": args.model,
        "model_config": model.config(),
        "parameters": n_params,
        "step": info["steps"],
        "stopped": info["stopped"],
        "time_budget_s": args.time_budget,
        "train_s": round(info["train_s"], 2),
        "wall_s_this_run": round(wall, 2),
        "tokens_per_s": round(info["tokens_per_s"], 1),
        "tokens_seen": info["steps"] * args.batch * args.seq,
        "epochs": round(info["steps"] / batcher.num_chunks, 3),
        "evals": [
            {"step": e["step"], "train_s": e["train_s"], "val_loss": e["val_loss"]}
            for e in info["evals"]
        ],
        **environment(),
        "precision": args.precision,
        "hparams": hparams,
    }
    if summary["val_loss"] is not None:
        summary["val_bits_per_char"] = float(js.training.nats_to_bits(summary["val_loss"]))
    if args.no_carry and getattr(model, "positions", None) != "learned":
        # also the loss of the way it was trained: from an empty carry at every chunk
        vb = js.data.StreamBatcher(val_ids, eval_streams, args.seq, reset_every_chunk=True)
        summary["val_loss_reset_every_chunk"] = js.training.evaluate_lm(
            model, params, vb, eval_step=eval_step
        )
    if is_writer():
        write_samples(args, model, params, vocab, k_sample)
    write_json(os.path.join(args.out, "summary.json"), summary)
    return summary


def plot_comparison(path: str, summaries: dict) -> None:
    """Validation loss against training time, one line per model, in one PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summaries.items():
        ev = s["evals"]
        label = f"{name} ({s['tokens_per_s']:,.0f} tok/s)"
        ax.plot(
            [e["train_s"] / 60 for e in ev], [e["val_loss"] for e in ev], "o-", ms=3, label=label
        )
    ax.set_xlabel("training time (minutes, evaluation excluded)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("char_lm: validation loss against training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merge_logs(out: str, names) -> None:
    """``out/metrics.jsonl`` and ``out/eval.jsonl``: every model's lines, tagged ``run``."""
    for log in ("metrics.jsonl", "eval.jsonl"):
        with open(os.path.join(out, log), "w") as f:
            for name in names:
                path = os.path.join(out, name, log)
                if os.path.exists(path):
                    for line in open(path):
                        if line.strip():
                            f.write(json.dumps({"run": name, **json.loads(line)}) + "\n")


def compare(args, text: str) -> dict:
    """Trains every model of ``--compare`` with the same time budget, one after another."""
    os.makedirs(args.out, exist_ok=True)
    summaries = {}
    for name in args.compare:
        a = resolve(args, name)
        a.out = os.path.join(args.out, name)
        if not args.quiet:
            print(f"--- {name} ---", file=sys.stderr)
        summaries[name] = train(a, text)
    _merge_logs(args.out, args.compare)
    plot_comparison(os.path.join(args.out, "compare.png"), summaries)
    by_model = {n: s["val_loss"] for n, s in summaries.items()}
    best = min((n for n in by_model if by_model[n] is not None), key=by_model.get, default=None)
    summary = {
        "val_loss": by_model.get(best),
        "best_model": best,
        "val_loss_by_model": by_model,
        "tokens_per_s_by_model": {n: s["tokens_per_s"] for n, s in summaries.items()},
        "steps_by_model": {n: s["step"] for n, s in summaries.items()},
        "train_s_by_model": {n: s["train_s"] for n, s in summaries.items()},
        "parameters_by_model": {n: s["parameters"] for n, s in summaries.items()},
        "time_budget_s": args.time_budget,
        **environment(),
        "runs": {n: s["hparams"] for n, s in summaries.items()},
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    return summary


def main(argv=None) -> dict:
    args = start(parse_args(argv))
    text = load_text(args)
    if args.compare:
        summary = compare(args, text)
    else:
        summary = train(resolve(args, args.model), text)
    if not args.quiet and is_writer():
        skip = ("hparams", "runs", "evals")
        print(json.dumps({k: v for k, v in summary.items() if k not in skip}, indent=2))
    return summary


if __name__ == "__main__":
    main()
