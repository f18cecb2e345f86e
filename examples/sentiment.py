"""Sentiment classification, many to one: one label for a whole review.

"The food was good, not bad at all" is positive and "the food was bad, not good
at all" is negative: the same words, in another order. The generated corpus is
made of such reviews, where word order and negation decide the label:

* ``the food was not great`` (negation flips the adjective),
* ``the food was great , not awful at all`` (the first adjective counts),
* ``the staff was poor but the view was lovely`` (after "but", the second clause counts),
* ``the food was fine and the waiter was not sloppy`` (both clauses agree).

A held-out set of order pairs tests exactly that: each pair is two reviews
with the same words (the same bag of words) and opposite labels, e.g. the two
sentences above, or the two clauses of a "but" review swapped. A model that
only counts words gives both members of a pair the same answer, so it gets
exactly half of them right; a recurrent model can read the order.

Three models train side by side, each with ``js.make_train_step`` and
``js.fit`` over ``js.data.PaddedBatcher`` batches (padded, with lengths) and
scored on the held-out reviews by ``js.training.evaluate``:
a bag-of-words model (the mean of the word embeddings, a tanh layer and a
softmax), and recurrent classifiers (``js.models.classifier``: embeddings,
a tanh RNN or an LSTM, the state after the last word, a softmax)::

    python examples/sentiment.py --out out/sentiment
    python examples/sentiment.py --model bow,lstm,gru --steps 1500 --out out/sentiment
    python examples/sentiment.py --data PATH/reviews.tsv --out out/reviews   # text<TAB>label

``--data`` reads a real corpus, one ``text<TAB>label`` line per review (any
label strings); the last ``--test-fraction`` of a seeded shuffle is held out,
and there are no order pairs. Writes into ``--out``: ``metrics.jsonl`` and
``eval.jsonl`` (``run`` = model), ``summary.json`` (``test_accuracy`` of the
LSTM (else of the last recurrent model), ``bow_test_accuracy``,
``order_test_accuracy`` (the LSTM's, on the order pairs), and every model's
figures under ``models``), ``results.md`` (the table), ``curves.png`` and
``predictions.txt`` (order pairs with each model's answer).
"""

from __future__ import annotations

import os
import re
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

MODELS = ("bow", "rnn", "lstm", "gru")
EVAL_BATCH = 256  # examples per held-out batch
# per-example metric of js.training.evaluate: logits [B, C] against the labels
TEST_METRICS = {"test_accuracy": lambda logits, batch: jnp.argmax(logits, -1) == batch["label"]}
PAD, UNK = "<pad>", "<unk>"
NOUNS = (
    "food", "service", "staff", "music", "room", "view", "pasta", "coffee", "wine", "dessert",
    "waiter", "menu", "soup", "bread",
)  # fmt: skip
POSITIVE = ("good", "great", "lovely", "excellent", "nice", "superb", "pleasant", "fine", "perfect", "wonderful")  # fmt: skip
NEGATIVE = ("bad", "awful", "terrible", "poor", "horrible", "mediocre", "dreadful", "disappointing", "dull", "sloppy")  # fmt: skip
INTENSIFIERS = ("very", "really", "quite", "truly")
NEUTRAL = (
    "we went there last week .", "i came for dinner .", "my friend took me there .",
    "we had lunch there on sunday .", "the place is near the station .", "we paid and went home .",
    "it was a rainy evening .", "we sat by the window .", "we had booked a table for four .",
    "the menu changes every month .",
)  # fmt: skip


def _adj(rng, polarity: int) -> str:
    return str(rng.choice(POSITIVE if polarity else NEGATIVE))


def clause(rng, polarity: int, form: int | None = None) -> str:
    """One clause about a noun whose sentiment is ``polarity`` (1 positive, 0 negative).

    Forms: 0 ``was [very] ADJ``; 1 ``was not [very] ADJ'`` (the opposite adjective,
    negated); 2 ``was ADJ , not ADJ' at all`` (the first adjective counts).
    """
    noun = rng.choice(NOUNS)
    form = int(rng.integers(3)) if form is None else form
    lead = f"the {noun} was"
    intens = f"{rng.choice(INTENSIFIERS)} " if rng.random() < 0.3 else ""
    if form == 0:
        return f"{lead} {intens}{_adj(rng, polarity)}"
    if form == 1:
        return f"{lead} not {intens}{_adj(rng, 1 - polarity)}"
    return f"{lead} {_adj(rng, polarity)} , not {_adj(rng, 1 - polarity)} at all"


def neutral(rng, most: int) -> list[str]:
    """0 to ``most`` sentences that say nothing about the food (so the model must remember)."""
    return [str(x) for x in rng.choice(NEUTRAL, size=int(rng.integers(most + 1)), replace=False)]


def review(rng, label: int, filler: int = 2) -> str:
    """A review of sentiment ``label``: one clause, two that agree ("and"), or two that
    disagree, where the clause after "but" decides; up to ``filler`` neutral sentences
    before and after."""
    kind = rng.integers(3)
    if kind == 0:
        body = clause(rng, label)
    elif kind == 1:
        body = f"{clause(rng, label)} and {clause(rng, label)}"
    else:
        body = f"{clause(rng, 1 - label)} but {clause(rng, label)}"
    return " ".join(neutral(rng, filler) + [body + " ."] + neutral(rng, filler))


def order_pair(rng, filler: int = 2) -> tuple[str, str]:
    """``(positive, negative)``: two reviews with the same words and opposite labels
    (and the same neutral sentences around them)."""
    kind = rng.integers(3)
    noun, noun2 = rng.choice(NOUNS, size=2, replace=False)
    pos, neg = _adj(rng, 1), _adj(rng, 0)
    if kind == 0:  # "X , not Y at all": the adjectives swapped
        fmt = "the {n} was {a} , not {b} at all"
        p, n = fmt.format(n=noun, a=pos, b=neg), fmt.format(n=noun, a=neg, b=pos)
    elif kind == 1:  # "A but B": the two clauses swapped
        c_neg, c_pos = f"the {noun} was {neg}", f"the {noun2} was {pos}"
        p, n = f"{c_neg} but {c_pos}", f"{c_pos} but {c_neg}"
    else:  # the negation moved: "A and not B" (both good) vs "not A and B" (both bad)
        p = f"the {noun} was {pos} and the {noun2} was not {neg}"
        n = f"the {noun} was not {pos} and the {noun2} was {neg}"
    before, after = neutral(rng, filler), neutral(rng, filler)
    return " ".join(before + [p + " ."] + after), " ".join(before + [n + " ."] + after)


def generate(seed: int, n_train: int, n_test: int, n_pairs: int, filler: int = 2):
    """``(train, test, pairs)`` lists of ``(text, label)``; ``pairs`` alternate positive,
    negative (pair i is items 2i, 2i+1). Test and pair reviews never occur in train."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n_train).tolist()
    train = [(review(rng, lab, filler), lab) for lab in labels]
    seen = {t for t, _ in train}
    test = []
    while len(test) < n_test:
        lab = int(rng.integers(2))
        t = review(rng, lab, filler)
        if t not in seen:
            test.append((t, lab))
    pairs, used = [], set()
    while len(pairs) < 2 * n_pairs:
        p, n = order_pair(rng, filler)
        if p in seen or n in seen or p in used:
            continue
        used.add(p)
        pairs += [(p, 1), (n, 0)]
    return train, test, pairs


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())


def read_tsv(path: str, test_fraction: float, seed: int):
    """``(train, test, label names)`` from ``text<TAB>label`` lines (labels: any strings)."""
    if not os.path.exists(path):
        raise SystemExit(f"--data: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            text, sep, label = line.rstrip("\n").rpartition("\t")
            if not sep or not text.strip() or not label.strip():
                raise SystemExit(
                    f"--data: line {i} of {path}: expected text<TAB>label, got {line[:80]!r}"
                )
            rows.append((text, label.strip()))
    names = sorted({lab for _, lab in rows})
    if len(names) < 2:
        raise SystemExit(f"--data: expected at least 2 distinct labels in {path}, got {names}")
    ids = {n: i for i, n in enumerate(names)}
    rows = [(t, ids[lab]) for t, lab in rows]
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = max(1, int(round(len(rows) * test_fraction)))
    if n_test >= len(rows):
        raise SystemExit(
            f"--test-fraction: leaves no training example of the {len(rows)} in {path}"
        )
    rows = [rows[i] for i in order]
    return rows[:-n_test], rows[-n_test:], names


class Vocab:
    """Words of the training texts seen at least ``min_count`` times; 0 padding, 1 unknown."""

    def __init__(self, texts, min_count: int = 1):
        counts: dict[str, int] = {}
        for t in texts:
            for w in tokenize(t):
                counts[w] = counts.get(w, 0) + 1
        words = sorted(w for w, c in counts.items() if c >= min_count)
        self.words = [PAD, UNK] + words
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str, max_len: int) -> np.ndarray:
        ids = [self.ids.get(w, 1) for w in tokenize(text)][:max_len]
        return np.asarray(ids or [1], np.int32)


def bow_init(key, vocab_size: int, embed: int, hidden: int, classes: int):
    ke, kh, ko = jax.random.split(key, 3)
    return {
        "embedding": 0.1 * js.nn.Embedding(embed).init(ke, vocab_size),
        "hidden": js.nn.Dense(hidden).init(kh, embed),
        "head": js.nn.Dense(classes).init(ko, hidden),
    }


def bow_apply(params, tokens, lengths):
    """Bag of words: ``tokens int[T, B]`` -> logits ``[B, C]`` from the mean embedding of
    the valid words (padding selected away before the sum); order plays no part."""
    valid = js.masks.lengths_to_mask(lengths, tokens.shape[0])[..., None]  # [T, B, 1]
    e = js.nn.embed(params["embedding"], jnp.where(valid[..., 0], tokens, 0))
    mean = jnp.sum(jnp.where(valid, e, 0.0), axis=0) / jnp.maximum(lengths, 1)[:, None]
    return js.nn.dense(params["head"], jnp.tanh(js.nn.dense(params["hidden"], mean)))


def parse_args(argv=None):
    p = parser(__doc__, steps=500, out="out/sentiment", lr=3e-3, batch=64, eval_every=100)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="a TSV corpus, text<TAB>label per line (default: generated)")
    d.add_argument("--train-size", type=int, default=4000, help="generated training reviews")
    d.add_argument("--test-size", type=int, default=1000, help="generated test reviews")
    d.add_argument("--pairs", type=int, default=500, help="generated held-out order pairs")
    d.add_argument("--filler", type=int, default=2,
                   help="generated: up to this many neutral sentences before and after")  # fmt: skip
    d.add_argument("--test-fraction", type=float, default=0.2, help="--data: held-out part")
    d.add_argument("--min-count", type=int, default=1, help="rarer words are <unk>")
    d.add_argument("--max-len", type=int, default=200, help="words kept per review")
    d.add_argument("--buckets", type=int, default=1, help="length buckets of the batches")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="bow,rnn,lstm", help=f"comma-separated, from {MODELS}")
    m.add_argument("--embed", type=int, default=32)
    m.add_argument("--hidden", type=int, default=64)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if not models or bad or len(set(models)) != len(models):
        p.error(f"--model: expected distinct names from {MODELS}, got {args.model!r}")
    args.models = models
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction: expected a value in (0, 1), got {args.test_fraction}")
    if args.filler < 0:
        p.error(f"--filler: expected a count >= 0, got {args.filler}")
    for flag in ("train_size", "test_size", "pairs", "max_len", "buckets", "embed", "hidden"):
        if getattr(args, flag) < 1:
            p.error(
                f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}"
            )
    return args


def main(argv=None) -> dict:
    args = start(parse_args(argv))
    if args.data:
        train, test, label_names = read_tsv(args.data, args.test_fraction, args.seed)
        pairs = []
    else:
        train, test, pairs = generate(
            args.seed, args.train_size, args.test_size, args.pairs, args.filler
        )
        label_names = ["negative", "positive"]
    classes = len(label_names)
    vocab = Vocab([t for t, _ in train], args.min_count)
    v = len(vocab.words)

    def encode(rows):
        return [vocab.encode(t, args.max_len) for t, _ in rows]

    labels = np.asarray([lab for _, lab in train], np.int32)
    if len(train) < args.batch:
        raise SystemExit(f"--batch: {args.batch} is more than the {len(train)} training examples")
    # batches: tokens [T, B] with tokens_lengths [B], label [B], example_mask [B]
    batcher = js.data.PaddedBatcher(
        {"tokens": encode(train), "label": labels}, args.batch, num_buckets=args.buckets,
        seed=args.seed,
    )  # fmt: skip
    # held-out batches in order: the duplicates that fill the last batch are weighted out
    # by example_mask inside js.training.evaluate
    test_batches = js.data.PaddedBatcher(
        {"tokens": encode(test), "label": np.asarray([lab for _, lab in test], np.int32)},
        min(EVAL_BATCH, len(test)), shuffle=False,
    )  # fmt: skip
    pair_batches = None
    if pairs:  # one example per pair: the positive review and the negative one
        pair_batches = js.data.PaddedBatcher(
            {"positive": encode(pairs[0::2]), "negative": encode(pairs[1::2])},
            min(EVAL_BATCH, len(pairs) // 2), shuffle=False,
        )  # fmt: skip
    n_test = len(test)
    test_labels = np.asarray([lab for _, lab in test], np.int32)
    majority = float(np.bincount(test_labels, minlength=classes).max() / n_test)

    prepare_out(args.out)
    summary = {
        "data": args.data or "generated", "labels": label_names, "vocab_size": v,
        "train_size": len(train), "test_size": n_test, "order_pairs": len(pairs) // 2,
        "majority_test_accuracy": majority, "steps": args.steps, "batch": args.batch,
        "embed": args.embed, "hidden": args.hidden, "seed": args.seed, "models": {},
        **environment(),
    }  # fmt: skip
    curves, answers = {}, {}
    shown = (pairs or test)[:20]  # the reviews of predictions.txt
    for mi, name in enumerate(args.models):
        key = jax.random.key(args.seed * 100 + mi)
        if name == "bow":
            params = bow_init(key, v, args.embed, args.hidden, classes)
            apply = bow_apply
        else:
            model = js.models.classifier(
                classes, vocab_size=v, embedding_size=args.embed, cell=name,
                hidden_size=args.hidden,
            )  # fmt: skip
            params = model.init(key)

            def apply(p, tokens, lengths, model=model):
                return model.apply(p, tokens, lengths=lengths)

        def loss_fn(p, carry, batch, key, apply=apply):
            logits = apply(p, batch["tokens"], batch["tokens_lengths"])
            mask = batch["example_mask"]
            loss = js.cross_entropy(logits, batch["label"], mask)
            return loss, (carry, {"accuracy": js.training.accuracy(logits, batch["label"], mask)})

        def classify(p, batch, apply=apply):  # logits [B, C]
            return apply(p, batch["tokens"], batch["tokens_lengths"])

        def order(p, batch, apply=apply):  # per pair: is each review's label right
            pos = jnp.argmax(apply(p, batch["positive"], batch["positive_lengths"]), -1) == 1
            neg = jnp.argmax(apply(p, batch["negative"], batch["negative_lengths"]), -1) == 0
            return {
                "order_test_accuracy": (pos.astype(jnp.float32) + neg.astype(jnp.float32)) / 2,
                "order_pairs_both_right": pos & neg,
            }

        def scores(params, classify=classify, order=order):
            out = js.training.evaluate(classify, params, test_batches, TEST_METRICS)
            if pair_batches is not None:
                out.update(js.training.evaluate(order, params, pair_batches))
            return out

        opt = js.make_optimizer("adam", args.lr, max_norm=args.clip)
        state = js.init_state(params, opt, jax.random.key(args.seed + 1))
        state, info = js.fit(
            js.make_train_step(loss_fn, opt, precision=args.precision), state, batcher, num_steps=args.steps,
            eval_fn=lambda st, scores=scores: scores(st.params),
            eval_every=args.eval_every, on_step=run_logger(args.out, name), progress=not args.quiet,
        )  # fmt: skip
        append_evals(args.out, name, info["evals"])
        curves[name] = info["evals"]
        answers[name] = probabilities(apply, state.params, encode(shown))
        summary["models"][name] = {**scores(state.params), "train_s": round(info["train_s"], 2)}

    res = summary["models"]
    recurrent = [m for m in args.models if m != "bow"]
    main_model = "lstm" if "lstm" in res else (recurrent[-1] if recurrent else args.models[-1])
    summary.update(
        headline_model=main_model,
        test_accuracy=res[main_model]["test_accuracy"],
        order_test_accuracy=res[main_model].get("order_test_accuracy"),
        bow_test_accuracy=res["bow"]["test_accuracy"] if "bow" in res else None,
        bow_order_test_accuracy=res["bow"].get("order_test_accuracy") if "bow" in res else None,
        train_s=round(sum(r["train_s"] for r in res.values()), 2),
    )
    table = ["| model | test accuracy | order pairs: accuracy | order pairs: both right |",
             "|---|---|---|---|"]  # fmt: skip
    for name, r in res.items():
        o = [r.get("order_test_accuracy"), r.get("order_pairs_both_right")]
        cells = [f"{100 * x:.1f}%" if x is not None else "-" for x in [r["test_accuracy"], *o]]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    write_predictions(args.out, shown, answers, label_names)
    plot_curves(args.out, curves, majority, bool(pairs))
    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        print("\n".join(table))
        print(f"majority class: {100 * majority:.1f}% of the test set")
    return summary


def probabilities(apply, params, tokens) -> np.ndarray:
    """``[N, C]`` class probabilities of a few examples (one padded batch)."""
    padded, lengths = js.data.pad_sequences(tokens)
    logits = apply(params, padded, lengths)
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


def write_predictions(out, rows, answers, label_names) -> None:
    with open(os.path.join(out, "predictions.txt"), "w") as f:
        f.write("review, gold label, then each model's probability of the gold label\n\n")
        for i, (text, lab) in enumerate(rows):
            probs = "  ".join(f"{m} {answers[m][i, lab]:.2f}" for m in answers)
            f.write(f"{text}\n    {label_names[lab]:>8s}  {probs}\n")


def plot_curves(out, curves, majority, has_pairs) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, hist) in enumerate(curves.items()):
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["test_accuracy"] for h in hist], "-o", ms=3, color=f"C{i}",
                label=f"{name}: test")  # fmt: skip
        if has_pairs:
            ax.plot(steps, [h["order_test_accuracy"] for h in hist], "--", color=f"C{i}",
                    label=f"{name}: order pairs")  # fmt: skip
    ax.axhline(majority, color="k", ls=":", lw=1, label="majority class")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
