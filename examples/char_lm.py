"""Character language model on tiny Shakespeare (char-rnn), trained with
jaxseq's truncated-BPTT loop.

    python examples/char_lm.py --data PATH/tinyshakespeare.txt --out out/char_lm
    python examples/char_lm.py --download --out out/char_lm   # fetch the corpus once (cached)
    python examples/char_lm.py --data ... --out out/char_lm --resume   # continue a run

The text is cut into B contiguous streams (first 90% for training, last 10%
for validation); each step trains on the next K characters of every stream,
starting from the hidden state the previous chunk left (``--no-carry``
resets it at every chunk instead: plain BPTT over K-character windows).

Writes into ``--out``: ``metrics.jsonl`` (one line per step: step, loss,
grad_norm, lr, tokens_per_s, ...), ``eval.jsonl`` (validation loss in
nats/char over training), ``summary.json`` (``val_loss`` and more),
``samples.txt`` (generated text: greedy, temperatures, top-k, from a priming
string), ``curves.png``, and checkpoints under ``ckpt/``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import js, parser, prepare_out, read_data, write_json  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Settings that define a run: a resumed run must agree on them (or pass --override).
HPARAMS = (
    "model", "layers", "hidden", "embed", "batch", "seq", "steps", "optimizer", "lr",
    "warmup", "schedule", "final_lr", "clip", "weight_decay", "dropout", "variational_dropout", "seed",
    "no_carry", "chunks_per_call", "train_fraction",
)  # fmt: skip


def parse_args(argv=None):
    p = parser(
        __doc__, steps=2000, out="out/char_lm", lr=2e-3, batch=32, eval_every=250,
        batch_help="B, parallel streams",
    )  # fmt: skip
    src = p.add_argument_group("data")
    src.add_argument("--data", help="path of the training text (e.g. tinyshakespeare.txt)")
    src.add_argument(
        "--download", action="store_true", help=f"fetch tiny Shakespeare from {URL} (cached)"
    )
    src.add_argument("--train-fraction", type=float, default=0.9)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("lstm", "gru", "rnn"), default="lstm")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--embed", type=int, default=128)
    m.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout on embeddings, between layers and before the head",
    )
    m.add_argument(
        "--variational-dropout",
        action="store_true",
        help="one dropout mask per stream and chunk, shared by its K steps",
    )
    t = p.add_argument_group("training")
    t.add_argument("--seq", type=int, default=64, help="K, truncation length (steps per chunk)")
    t.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    t.add_argument("--optimizer", choices=js.training.OPTIMIZERS, default="adam")
    t.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    t.add_argument(
        "--final-lr", type=float, default=0.05, help="cosine: final lr as a fraction of --lr"
    )
    t.add_argument("--weight-decay", type=float, default=0.0, help="adamw only")
    t.add_argument("--no-carry", action="store_true", help="reset the hidden state at every chunk")
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
    o.add_argument("--eval-streams", type=int, default=32)
    o.add_argument("--sample-len", type=int, default=300)
    o.add_argument("--prime", default="ROMEO:\n")
    o.add_argument("--temperature", type=float, default=0.8)
    o.add_argument("--top-k", type=int, default=10)
    return p.parse_args(argv)


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    text = load_text(args)
    vocab = js.data.CharVocab.from_text(text)
    train_text, val_text = js.data.split_text(text, args.train_fraction)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)

    model = js.models.char_lm(
        vocab.size, cell=args.model, num_layers=args.layers, hidden_size=args.hidden,
        embedding_size=args.embed, dropout_rate=args.dropout,
        variational_dropout=args.variational_dropout,
    )  # fmt: skip
    # data first: bad sizes fail here, before anything compiles
    batcher = js.data.StreamBatcher(
        train_ids, args.batch, args.seq, reset_every_chunk=args.no_carry, vocab_size=vocab.size
    )
    eval_streams = min(args.eval_streams, max(1, (len(val_ids) - 1) // (args.seq + 1)))
    val_batcher = js.data.StreamBatcher(val_ids, eval_streams, args.seq, vocab_size=vocab.size)
    steps = args.steps - args.steps % args.chunks_per_call
    opt = js.make_optimizer(
        args.optimizer, args.lr, max_norm=args.clip, warmup_steps=args.warmup,
        total_steps=steps if args.schedule == "cosine" else None,
        final_lr_ratio=args.final_lr, weight_decay=args.weight_decay,
    )  # fmt: skip

    key = jax.random.key(args.seed)
    k_init, k_train, k_sample = jax.random.split(key, 3)
    params = model.init(k_init)
    state = js.init_state(params, opt, k_train, model.initial_carry((args.batch,)))
    hparams = {h: getattr(args, h) for h in HPARAMS}
    hparams["vocab"] = vocab.chars
    os.makedirs(args.out, exist_ok=True)
    ckpt = js.checkpoint.Checkpointer(
        os.path.join(args.out, "ckpt"), keep=args.keep, model_config=model.config(), hparams=hparams
    )
    elapsed = 0.0
    if args.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state, override=args.override)
        elapsed = float(meta.get("train_s", 0.0))
        print(f"resumed from step {int(state.step)} ({elapsed:.0f} s of training)", file=sys.stderr)
    elif not args.resume:
        prepare_out(args.out)  # a fresh run: no logs of an earlier one

    mesh = None
    if jax.device_count() > 1:
        mesh = js.training.make_mesh()
        state = js.training.shard_state(state, mesh)
    step_fn = js.make_train_step(
        js.training.lm_loss_fn(model), opt, chunks_per_call=args.chunks_per_call
    )
    eval_step = js.training.make_eval_step(model)

    def eval_fn(st):
        t0 = time.perf_counter()
        v = js.training.evaluate_lm(model, st.params, val_batcher, eval_step=eval_step, mesh=None)
        return {"val_loss": v, "eval_s": round(time.perf_counter() - t0, 2)}

    t_start = time.perf_counter()
    state, info = js.fit(
        step_fn, state, batcher, num_steps=steps,
        max_seconds=None if args.minutes is None else 60.0 * args.minutes, elapsed_s=elapsed,
        out_dir=args.out, checkpointer=ckpt, checkpoint_every=args.checkpoint_every,
        eval_fn=eval_fn, eval_every=args.eval_every, mesh=mesh, progress=not args.quiet,
    )  # fmt: skip
    wall = time.perf_counter() - t_start
    ckpt.close()

    params = jax.device_get(state.params)
    summary = {
        "val_loss": info["evals"][-1]["val_loss"] if info["evals"] else None,
        "val_bits_per_char": None,
        "step": info["steps"],
        "stopped": info["stopped"],
        "train_s": round(info["train_s"], 2),
        "wall_s_this_run": round(wall, 2),
        "tokens_per_s": round(info["tokens_per_s"], 1),
        "tokens_seen": info["steps"] * args.batch * args.seq,
        "epochs": round(info["steps"] / batcher.num_chunks, 3),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "hparams": hparams,
    }
    if summary["val_loss"] is not None:
        summary["val_bits_per_char"] = float(js.losses.nats_to_bits(summary["val_loss"]))
    if args.no_carry:  # also the loss of the way it was trained: from zeros at every chunk
        vb = js.data.StreamBatcher(val_ids, eval_streams, args.seq, reset_every_chunk=True)
        summary["val_loss_reset_every_chunk"] = js.training.evaluate_lm(
            model, params, vb, eval_step=eval_step
        )

    prime = vocab.encode(args.prime or "\n")
    lines = []
    for label, kw in (
        ("greedy", {"greedy": True}),
        (f"temperature {args.temperature}", {"temperature": args.temperature}),
        (f"temperature {args.temperature}, top-k {args.top_k}", {"temperature": args.temperature, "top_k": min(args.top_k, vocab.size)}),
        ("temperature 1.0", {"temperature": 1.0}),
    ):  # fmt: skip
        ids = js.decoding.sample(k_sample, model, params, prime, args.sample_len, **kw)
        lines.append(
            f"=== {label}, primed with {args.prime!r} ===\n{args.prime}{vocab.decode(ids)}\n"
        )
    with open(os.path.join(args.out, "samples.txt"), "w") as f:
        f.write("\n".join(lines))
    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if k != "hparams"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
