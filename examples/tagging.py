"""Sequence tagging with a bidirectional LSTM and padding masks.

The task needs context from both sides. Each sequence is 4-16 random symbols
(an alphabet of 10); every symbol is tagged

* ``U`` (unique): it occurs only once in the sequence,
* ``F`` (first): its first occurrence, and it occurs again LATER,
* ``R`` (repeat): it occurred EARLIER.

``R`` needs the left context, ``F`` versus ``U`` the right context, so a
left-to-right tagger can only guess there; a bidirectional one can be exact.
Sequences of different lengths are right-padded in a batch, and the padding is
masked in the loss, the accuracy and the backward direction (``lengths``).
The same run trains a bidirectional LSTM tagger and a forward-only LSTM
tagger of the same size side by side::

    python examples/tagging.py --out out/tagging
    python examples/tagging.py --alphabet 20 --max-len 30 --steps 2000 --out out/tagging_big

Each model trains with ``js.make_train_step`` and ``js.fit`` and is scored on
the held-out set by ``js.training.evaluate`` (``tag_metrics``). Writes into
``--out``: ``metrics.jsonl`` and ``eval.jsonl`` (every step and every
evaluation of every model, ``run`` = model), ``summary.json`` (token and
sequence accuracy on a held-out set per model; the headline token accuracies
under ``accuracy_bidirectional`` and ``accuracy_unidirectional``, None when that
model did not run; where it ran), ``curves.png`` and
``predictions.txt`` (a few test sequences with gold and predicted tags).
"""

from __future__ import annotations

import itertools
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
    write_json,
)

TAGS = "UFR"  # unique, first of a repeated symbol, repeat
PAD = 0
EVAL_BATCH = 256  # held-out sequences per batch
MAIN_METRICS = ("test_loss", "test_token_acc", "test_seq_acc")  # logged at every evaluation


def tag_metrics(logits, batch) -> dict:
    """Per-sequence metrics for ``js.training.evaluate``: logits ``[T, B, C]``.

    Token-level metrics are ``(total, count)`` pairs per sequence (summed over its
    valid tags), so their means are over tokens; ``test_seq_acc`` is per sequence.
    """
    tags, lengths = batch["tags"], batch["tags_lengths"]
    mask = js.masks.lengths_to_mask(lengths, tags.shape[0])  # [T, B]
    pred = jnp.argmax(logits, axis=-1)
    right = (pred == tags) & mask
    nll = js.training.token_cross_entropy(logits, tags)  # [T, B], padding selected away below
    out = {
        "test_loss": (jnp.sum(jnp.where(mask, nll, 0.0), axis=0), lengths),
        "test_token_acc": (jnp.sum(right, axis=0), lengths),
        "test_seq_acc": ~jnp.any(mask & ~right, axis=0),
    }
    for k, tag in enumerate(TAGS):  # accuracy on the tokens whose gold tag is k
        gold = mask & (tags == k)
        out[f"test_acc_{tag}"] = (jnp.sum(gold & right, axis=0), jnp.sum(gold, axis=0))
    return out


def tag_sequence(symbols) -> np.ndarray:
    """Tags of one sequence: 0 unique, 1 first occurrence of a repeated symbol, 2 repeat."""
    symbols = list(symbols)
    tags = np.zeros(len(symbols), np.int32)
    seen = set()
    for i, s in enumerate(symbols):
        if s in seen:
            tags[i] = 2
        elif s in symbols[i + 1 :]:
            tags[i] = 1
        seen.add(s)
    return tags


def make_batch(rng: np.random.Generator, batch: int, alphabet: int, min_len: int, max_len: int):
    """``(tokens int32[T, B], tags int32[T, B], lengths int32[B])``, right-padded, time-major."""
    lengths = rng.integers(min_len, max_len + 1, size=batch).astype(np.int32)
    seqs = [rng.integers(1, alphabet + 1, size=n) for n in lengths]
    tokens, _ = js.data.pad_sequences(seqs, PAD, length=max_len)
    tags, _ = js.data.pad_sequences([tag_sequence(s) for s in seqs], 0, length=max_len)
    return tokens, tags, lengths


def _none_if_nan(x: float):
    return None if np.isnan(x) else x


def parse_args(argv=None):
    p = parser(__doc__, steps=400, out="out/tagging", lr=1e-2, batch=32)
    p.add_argument("--alphabet", type=int, default=10)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64, help="per direction")
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--test-size", type=int, default=512)
    p.add_argument("--no-compare", action="store_true", help="train only the bidirectional tagger")
    args = p.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        p.error(
            f"--min-len/--max-len: expected 1 <= min <= max, got {args.min_len}, {args.max_len}"
        )
    return args


def main(argv=None) -> dict:
    args = start(parse_args(argv))
    prepare_out(args.out)
    v = args.alphabet + 1
    test = make_batch(
        np.random.default_rng(10_000 + args.seed), args.test_size, args.alphabet,
        args.min_len, args.max_len,
    )  # fmt: skip
    t_tokens, t_tags, t_len = test
    test_batches = js.data.PaddedBatcher(  # in order; duplicates filling the last batch count 0
        {
            "tokens": [t_tokens[:n, b] for b, n in enumerate(t_len)],
            "tags": [t_tags[:n, b] for b, n in enumerate(t_len)],
        },
        min(EVAL_BATCH, args.test_size), shuffle=False,
    )  # fmt: skip
    counts = np.bincount(
        t_tags[np.asarray(js.masks.lengths_to_mask(t_len, args.max_len))], minlength=3
    )
    summary = {
        "task": "repeats", "alphabet": args.alphabet, "lengths": [args.min_len, args.max_len],
        "tag_counts_test": dict(zip(TAGS, counts.tolist())),
        "majority_tag_accuracy": float(counts.max() / counts.sum()),
        "steps": args.steps, "batch": args.batch, "hidden": args.hidden, "seed": args.seed,
        "accuracy_bidirectional": None, "accuracy_unidirectional": None,
        **environment(), "models": {},
    }  # fmt: skip
    variants = [("bilstm", True)] + ([] if args.no_compare else [("lstm_forward", False)])
    curves, preds = {}, {}
    for mi, (name, bidir) in enumerate(variants):
        model = js.models.tagger(
            len(TAGS), vocab_size=v, embedding_size=args.embed, cell="lstm",
            hidden_size=args.hidden, num_layers=args.layers, bidirectional=bidir,
        )  # fmt: skip
        params = model.init(jax.random.key(args.seed * 100 + mi))

        def loss_fn(p, carry, batch, key, model=model):
            tokens, tags, lengths = batch
            logits = model.apply(p, tokens, lengths=lengths)
            loss = js.cross_entropy(logits, tags, lengths=lengths)
            return loss, (carry, {"token_acc": js.training.accuracy(logits, tags, lengths=lengths)})

        def apply(p, batch, model=model):  # logits [T, B, C]
            return model.apply(p, batch["tokens"], lengths=batch["tokens_lengths"])

        def evaluate(p, apply=apply):
            return js.training.evaluate(apply, p, test_batches, tag_metrics)

        rng = np.random.default_rng(args.seed * 7919 + mi)
        batches = (
            make_batch(rng, args.batch, args.alphabet, args.min_len, args.max_len)
            for _ in itertools.count()
        )  # fresh random sequences every step, the same ones for the same seed
        opt = js.make_optimizer("adam", args.lr, max_norm=args.clip)
        state = js.init_state(params, opt, jax.random.key(args.seed + 1))
        state, info = js.fit(
            js.make_train_step(loss_fn, opt, precision=args.precision), state, batches, num_steps=args.steps,
            eval_fn=lambda st, evaluate=evaluate: {
                k: v for k, v in evaluate(st.params).items() if k in MAIN_METRICS
            },
            eval_every=args.eval_every, on_step=run_logger(args.out, name),
            progress=not args.quiet,
        )  # fmt: skip
        append_evals(args.out, name, info["evals"])
        params, hist = state.params, info["evals"]
        curves[name] = hist
        metrics = evaluate(params)
        final = {k: metrics[k] for k in MAIN_METRICS}
        per_tag = {tag: _none_if_nan(metrics[f"test_acc_{tag}"]) for tag in TAGS}
        shown = min(8, args.test_size)  # the sequences of predictions.txt
        logits = model.apply(params, t_tokens[:, :shown], lengths=t_len[:shown])
        preds[name] = np.asarray(jnp.argmax(logits, axis=-1))
        summary["models"][name] = {
            **final, "per_tag_acc": per_tag, "train_s": round(info["train_s"], 3)
        }  # fmt: skip
        direction = "bidirectional" if bidir else "unidirectional"
        summary[f"accuracy_{direction}"] = final["test_token_acc"]

    with open(os.path.join(args.out, "predictions.txt"), "w") as f:
        f.write("symbols, gold tags, then each model's tags (U unique, F first, R repeat)\n\n")
        for b in range(min(8, args.test_size)):
            n = int(t_len[b])
            f.write(" ".join(f"{s:>2d}" for s in t_tokens[:n, b]) + "\n")
            f.write(" ".join(f"{TAGS[k]:>2s}" for k in t_tags[:n, b]) + "  gold\n")
            for name, pr in preds.items():
                f.write(" ".join(f"{TAGS[k]:>2s}" for k in pr[:n, b]) + f"  {name}\n")
            f.write("\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hist in curves.items():
        ax.plot([h["step"] for h in hist], [h["test_token_acc"] for h in hist], "-o", ms=3,
                label=name)  # fmt: skip
    ax.axhline(summary["majority_tag_accuracy"], color="k", ls="--", lw=1, label="majority tag")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out token accuracy")
    ax.set_title("repeat tagging: U / F / R")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=100)
    plt.close(fig)

    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        print(f"majority tag accuracy {summary['majority_tag_accuracy']:.3f}")
        for name, r in summary["models"].items():
            print(
                f"  {name:13s} token acc {r['test_token_acc']:.4f}, sequence acc "
                f"{r['test_seq_acc']:.4f}, per tag {r['per_tag_acc']}, {r['train_s']:.0f} s"
            )
    return summary


if __name__ == "__main__":
    main()
