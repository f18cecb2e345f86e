"""Folk-tune generation in ABC notation with a character LSTM (as in the MIT
6.S191 music lab), trained with jaxseq's truncated-BPTT loop and sampled with
its scan-based sampler.

    python examples/music_gen.py --data PATH/irish.abc --out out/music
    python examples/music_gen.py --data PATH/irish.abc --steps 3000 --layers 2 --out out/music_big
    python examples/music_gen.py --data PATH/irish.abc --steps 3000 --layers 2 --out out/music_big --resume

The file is split into tunes (each starts at an ``X:`` line); 90% of them train
and 10% validate. The tunes are laid end to end in B parallel streams and the
LSTM's state is reset at the start of every tune. After training, ``--samples``
tunes are generated from the priming string ``X:`` (temperature, top-k, top-p)
and each is checked for being well-formed ABC: an ``X:`` number line first, a
``T:`` title and a ``K:`` key in the header, and a body of music lines (bar lines
and notes, only characters that ABC music lines use) that ends before the length
limit.

Checkpoints are saved under ``--out``/``ckpt`` every ``--checkpoint-every`` steps
and at exit; ``--resume`` continues the run from the latest one with exactly the
losses of an uninterrupted run (``--steps`` may be raised to train longer).

Writes into ``--out``: ``metrics.jsonl`` and ``eval.jsonl`` (training and
validation loss, nats/char), ``curves.png``, ``samples.abc`` (the generated
tunes, each preceded by a ``%`` comment with its check result), ``midi/`` (a
MIDI file per generated tune that music21 can read, when the optional music21
package is installed; skipped with a message otherwise) and ``summary.json``
(``val_loss``, ``well_formed_fraction`` of the samples, and why the others failed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, js, parser, prepare_out, read_data, start, write_json  # noqa: E402

HEADER = re.compile(r"^[A-Za-z]:")
# characters of ABC music lines: notes, rests, accidentals, octaves, lengths, bars,
# repeats, tuplets, ties, slurs, chords, decorations and quoted chord symbols
MUSIC_CHARS = set("ABCDEFGabcdefgzxZ^_=,'0123456789/|:[]()-<>.~ !\"+{}#mMajdinorsuglpbtRV")
NOTE = re.compile(r"[A-Ga-g]")
# settings that define a run: a resumed run must agree on them (or pass --override)
HPARAMS = ("model", "layers", "hidden", "embed", "seq", "batch", "lr", "clip", "seed")


def split_tunes(text: str) -> list[str]:
    """Tunes of an ABC file: each from an ``X:`` line to the next, blank lines removed."""
    parts = re.split(r"(?m)^(?=X:)", text)
    tunes = []
    for p in parts:
        lines = [ln.rstrip() for ln in p.strip().splitlines() if ln.strip()]
        if lines and lines[0].startswith("X:"):
            tunes.append("\n".join(lines))
    return tunes


def check_abc(tune: str) -> list[str]:
    """Reasons why ``tune`` is not plausible ABC (an empty list: plausible)."""
    lines = [ln for ln in tune.strip().split("\n") if ln.strip()]
    problems = []
    if not lines or not re.fullmatch(r"X:\s*\d+", lines[0].strip()):
        problems.append("no X: number line first")
    k = next((i for i, ln in enumerate(lines) if ln.startswith("K:")), None)
    if k is None:
        problems.append("no K: key line")
        return problems
    header, body = lines[: k + 1], lines[k + 1 :]
    if not any(ln.startswith("T:") and ln[2:].strip() for ln in header):
        problems.append("no T: title in the header")
    if not re.match(r"K:\s*(none|[A-G][#b]?)", lines[k]):
        problems.append("K: line names no key")
    if any(not HEADER.match(ln) for ln in header[1:]):
        problems.append("music before the K: line")
    music = [ln for ln in body if not HEADER.match(ln)]
    if not music:
        problems.append("no body")
    elif any(set(ln) - MUSIC_CHARS for ln in music):
        problems.append("characters that are not ABC music")
    elif not any("|" in ln and len(NOTE.findall(ln)) >= 4 for ln in music):
        problems.append("no bar of notes")
    return problems


def parse_args(argv=None):
    p = parser(
        __doc__, steps=300, out="out/music", lr=3e-3, batch=32, eval_every=100,
        batch_help="B, parallel streams",
    )  # fmt: skip
    p.add_argument("--data", help="path of an ABC file (e.g. irish.abc)")
    p.add_argument("--model", choices=("lstm", "gru", "rnn"), default="lstm")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--seq", type=int, default=64, help="K, truncation length")
    p.add_argument("--samples", type=int, default=20, help="tunes to generate")
    p.add_argument("--sample-len", type=int, default=500, help="characters per generated tune")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="0: only at exit")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.add_argument("--override", action="store_true", help="resume even if hyperparameters differ")
    p.add_argument(
        "--strict-resume",
        action="store_true",
        help="with --resume: stop at a damaged newest checkpoint (default: warn and resume "
        "from the newest intact one)",
    )
    p.add_argument("--no-midi", action="store_true", help="do not write MIDI files")
    args = p.parse_args(argv)
    if not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    return args


def write_midi(tunes: list[str], directory: str) -> dict:
    """One MIDI file per tune that music21 (optional) can read; a message when it is missing."""
    if importlib.util.find_spec("music21") is None:
        return {"skipped": "music21 is not installed (pip install music21 to get MIDI files)"}
    from music21 import converter

    os.makedirs(directory, exist_ok=True)
    written, failed = [], {}
    for i, tune in enumerate(tunes):
        path = os.path.join(directory, f"sample_{i + 1:02d}.mid")
        try:
            converter.parse(tune, format="abc").write("midi", fp=path)
            written.append(os.path.basename(path))
        except Exception as e:  # noqa: BLE001 - a generated tune may be unreadable
            failed[i + 1] = f"{type(e).__name__}: {str(e)[:120]}"
    return {"written": written, "failed": failed}


def main(argv=None) -> dict:
    args = start(parse_args(argv))
    tunes = split_tunes(read_data(args.data, "an ABC file of tunes (e.g. irish.abc)"))
    if len(tunes) < 2:
        raise SystemExit(f"--data: expected at least 2 tunes (X: lines), found {len(tunes)}")
    n_val = max(1, len(tunes) // 10)
    train_tunes, val_tunes = tunes[:-n_val], tunes[-n_val:]
    vocab = js.data.CharVocab.from_text("\n\n".join(tunes))

    def encode(ts):
        text = "".join(t + "\n\n" for t in ts)
        starts = np.zeros(len(text), bool)
        pos = 0
        for t in ts:
            starts[pos] = True
            pos += len(t) + 2
        return vocab.encode(text), starts

    train_ids, train_starts = encode(train_tunes)
    val_ids, val_starts = encode(val_tunes)
    model = js.models.char_lm(
        vocab.size, cell=args.model, num_layers=args.layers, hidden_size=args.hidden,
        embedding_size=args.embed,
    )  # fmt: skip
    batcher = js.data.StreamBatcher(
        train_ids, args.batch, args.seq, boundaries=train_starts, vocab_size=vocab.size
    )
    val_streams = max(1, min(args.batch, (len(val_ids) - 1) // (args.seq + 1)))
    val_batcher = js.data.StreamBatcher(
        val_ids, val_streams, args.seq, boundaries=val_starts, vocab_size=vocab.size
    )
    opt = js.make_optimizer("adam", args.lr, max_norm=args.clip)
    k_init, k_train, k_sample = jax.random.split(jax.random.key(args.seed), 3)
    state = js.init_state(model.init(k_init), opt, k_train, model.initial_carry((args.batch,)))
    hparams = {h: getattr(args, h) for h in HPARAMS}
    hparams["vocab"] = vocab.chars
    os.makedirs(args.out, exist_ok=True)
    ckpt = js.Checkpointer(
        os.path.join(args.out, "ckpt"), keep=args.keep, model_config=model.config(), hparams=hparams
    )
    elapsed = 0.0
    if args.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state, override=args.override, strict=args.strict_resume)
        elapsed = float(meta.get("train_s", 0.0))
        if not args.quiet:
            print(f"resumed from step {int(state.step)}", file=sys.stderr)
    elif not args.resume:
        prepare_out(args.out)  # a fresh run: no logs of an earlier one
    step_fn = js.make_train_step(js.training.lm_loss_fn(model), opt, precision=args.precision)
    eval_step = js.training.make_eval_step(model)

    def eval_fn(st):
        return {
            "val_loss": js.training.evaluate_lm(model, st.params, val_batcher, eval_step=eval_step)
        }

    state, info = js.fit(
        step_fn, state, batcher, num_steps=args.steps, out_dir=args.out, eval_fn=eval_fn,
        eval_every=args.eval_every, elapsed_s=elapsed, checkpointer=ckpt,
        checkpoint_every=args.checkpoint_every, progress=not args.quiet,
    )  # fmt: skip
    ckpt.close()
    params = jax.device_get(state.params)

    t0 = time.perf_counter()
    prime = np.tile(vocab.encode("X:")[:, None], (1, args.samples))  # [P, samples]
    ids = js.decoding.sample(
        k_sample, model, params, prime, args.sample_len,
        temperature=args.temperature, top_k=min(args.top_k, vocab.size), top_p=args.top_p,
    )  # fmt: skip
    ids = np.asarray(ids)
    sample_s = time.perf_counter() - t0
    results, blocks, generated = [], [], []
    for i in range(args.samples):
        text = "X:" + vocab.decode(ids[:, i])
        end = text.find("\n\n")
        complete = end >= 0
        tune = text[:end] if complete else text
        problems = check_abc(tune) + ([] if complete else ["did not end within --sample-len"])
        results.append(problems)
        generated.append(tune.strip())
        verdict = "plausible ABC" if not problems else "not plausible: " + "; ".join(problems)
        blocks.append(f"% sample {i + 1}: {verdict}\n{tune.strip()}\n")
    with open(os.path.join(args.out, "samples.abc"), "w") as f:
        f.write("\n".join(blocks))

    reasons: dict[str, int] = {}
    for problems in results:
        for r in problems:
            reasons[r] = reasons.get(r, 0) + 1
    plausible = sum(1 for p in results if not p)
    midi = (
        {"skipped": "--no-midi"}
        if args.no_midi
        else write_midi(generated, os.path.join(args.out, "midi"))
    )
    if "skipped" in midi and not args.quiet:
        print(f"MIDI files skipped: {midi['skipped']}", file=sys.stderr)
    val_loss = info["evals"][-1]["val_loss"] if info["evals"] else None
    summary = {
        "val_loss": val_loss,
        "val_bits_per_char": None
        if val_loss is None
        else float(js.training.nats_to_bits(val_loss)),
        "samples": args.samples,
        "well_formed_fraction": plausible / args.samples,
        "plausible": plausible,
        "failure_reasons": reasons,
        "train_tunes_plausible": sum(1 for t in train_tunes if not check_abc(t)) / len(train_tunes),
        "tunes": {"train": len(train_tunes), "val": len(val_tunes)},
        "vocab_size": vocab.size,
        "steps": info["steps"],
        "train_s": round(info["train_s"], 2),
        "tokens_per_s": round(info["tokens_per_s"], 1),
        "sample_s": round(sample_s, 2),
        "midi": midi,
        **environment(),
        "hparams": {k: v for k, v in vars(args).items() if k not in ("data", "out", "quiet")},
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    if not args.quiet:
        print(blocks[0])
        print(
            f"val loss {val_loss:.4f} nats/char; {plausible}/{args.samples} samples plausible ABC; "
            f"{summary['train_s']:.0f} s training at {summary['tokens_per_s']:.0f} tokens/s"
        )
    return summary


if __name__ == "__main__":
    main()
