"""Smoke tests of the music, seq2seq, long-memory and tagging examples on tiny
generated data (no corpora), plus checks of their data generators."""

import json

import numpy as np
import pytest

import jaxseq as js


@pytest.fixture(scope="module")
def music(load_example):
    return load_example("music_gen")


@pytest.fixture(scope="module")
def seq2seq(load_example):
    return load_example("seq2seq_attention")


@pytest.fixture(scope="module")
def long_memory(load_example):
    return load_example("long_memory")


@pytest.fixture(scope="module")
def tagging(load_example):
    return load_example("tagging")


TUNE = """X:{i}
T:Tune number {i}
M:6/8
L:1/8
K:D Major
dAF {n}FA|dfe dcB|AFA dfa|gec d2:|!
fga {n}ag|fed cBA|"Em"B2c d3|]"""


def _outputs(out, names):
    for name in names:
        assert (out / name).exists(), name


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def fit_calls(monkeypatch):
    """Records every call of ``js.fit`` (the examples train through it, not a loop of their own)."""
    calls = []
    fit = js.fit

    def recording_fit(step, state, batches, **kw):
        calls.append(kw)
        return fit(step, state, batches, **kw)

    monkeypatch.setattr(js, "fit", recording_fit)
    return calls


def test_check_abc(music):
    good = TUNE.format(i=1, n="A")
    assert music.check_abc(good) == []
    assert "no K: key line" in music.check_abc("X:1\nT:a\nabc|def|")
    assert "no X: number line first" in music.check_abc(good.replace("X:1", "X:one"))
    assert "no T: title in the header" in music.check_abc(good.replace("T:Tune number 1", "T:"))
    assert "no body" in music.check_abc("X:1\nT:a\nK:G")
    assert "characters that are not ABC music" in music.check_abc(good + "\nhello, world?")
    assert music.split_tunes("junk\n" + good + "\n\n\n" + TUNE.format(i=2, n="B")) == [
        good,
        TUNE.format(i=2, n="B"),
    ]


def test_music_gen_smoke(music, tmp_path, fit_calls):
    data = tmp_path / "tunes.abc"
    data.write_text("\n\n".join(TUNE.format(i=i, n="ABcd"[i % 4]) for i in range(1, 13)))
    out = tmp_path / "music"
    s = music.main(
        ["--data", str(data), "--out", str(out), "--steps", "4", "--batch", "2", "--seq", "16",
         "--hidden", "8", "--embed", "4", "--eval-every", "2", "--samples", "3",
         "--sample-len", "40", "--quiet"]
    )  # fmt: skip
    _outputs(out, ["metrics.jsonl", "eval.jsonl", "curves.png", "samples.abc", "summary.json"])
    assert s["steps"] == 4 and np.isfinite(s["val_loss"]) and s["samples"] == 3
    assert [c["num_steps"] for c in fit_calls] == [4]
    assert [r["step"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    evals = _jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [2, 4] and evals[-1]["val_loss"] == s["val_loss"]
    assert 0 <= s["plausible"] <= 3 and s["train_tunes_plausible"] == 1.0
    assert (out / "samples.abc").read_text().count("% sample") == 3
    assert json.load(open(out / "summary.json"))["plausible"] == s["plausible"]
    with pytest.raises(SystemExit, match="--data"):
        music.main(["--out", str(out)])


def test_dates_are_consistent(seq2seq):
    rng = np.random.default_rng(0)
    src_vocab, tgt_vocab = seq2seq.vocabularies("dates")
    months = seq2seq.MONTHS
    for _ in range(300):
        src, tgt = seq2seq.date_example(rng)
        iso = "".join(tgt)
        y, m, d = int(iso[:4]), int(iso[5:7]), int(iso[8:])
        assert 1950 <= y < 2030 and months[m - 1] in src
        assert 1 <= d <= seq2seq.DAYS_IN_MONTH[m - 1]
        words = " ".join(src)
        assert " ".join(seq2seq.ordinal_words(d)) in words
        assert len(src) <= 14 and src_vocab.encode(src) and tgt_vocab.encode(tgt)
    assert seq2seq.ordinal_words(22) == ["twenty", "second"]
    assert seq2seq.ordinal_words(30) == ["thirtieth"]
    assert seq2seq.number_words(47) == ["forty", "seven"]


def test_seq2seq_smoke(seq2seq, tmp_path, fit_calls):
    out = tmp_path / "s2s"
    s = seq2seq.main(
        ["--task", "reverse", "--max-len", "4", "--steps", "3", "--batch", "4", "--hidden", "8",
         "--embed", "4", "--attention", "4", "--test-size", "6", "--eval-every", "2",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    _outputs(
        out,
        [
            "metrics.jsonl",
            "eval.jsonl",
            "summary.json",
            "curves.png",
            "attention.png",
            "samples.txt",
        ],
    )
    assert 0.0 <= s["test_seq_acc"] <= 1.0 and np.isfinite(s["test_loss"])
    assert [c["num_steps"] for c in fit_calls] == [3]
    recs = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["lr"] == pytest.approx(0.005) for r in recs)
    assert all(0.0 <= r["token_acc"] <= 1.0 for r in recs)
    evals = _jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [2, 3]
    assert evals[-1]["test_seq_acc"] == pytest.approx(s["test_seq_acc"])


def test_long_memory_generators(long_memory):
    rng = np.random.default_rng(0)
    xs, y = long_memory.adding_batch(rng, 5, 10)
    assert xs.shape == (10, 5, 2) and y.shape == (5, 1)
    np.testing.assert_array_equal(xs[..., 1].sum(0), 2.0)
    assert np.all(xs[:5, :, 1].sum(0) == 1.0)
    np.testing.assert_allclose((xs[..., 0] * xs[..., 1]).sum(0), y[:, 0], rtol=1e-6)
    inp, tgt = long_memory.copy_batch(rng, 3, 7)
    assert inp.shape == tgt.shape == (27, 3)
    np.testing.assert_array_equal(tgt[-10:], inp[:10])
    assert np.all(inp[16] == long_memory.DELIM) and np.all(tgt[:17] == long_memory.BLANK)
    assert long_memory.baseline("copy", 7) == pytest.approx(10 * np.log(8) / 27)


@pytest.mark.parametrize("task,cells", [("adding", "irnn"), ("copy", "gru")])
def test_long_memory_smoke(long_memory, tmp_path, task, cells, fit_calls):
    out = tmp_path / task
    s = long_memory.main(
        ["--task", task, "--T", "6", "--cells", cells, "--steps", "2", "--batch", "4",
         "--hidden", "4", "--test-size", "8", "--eval-every", "1", "--out", str(out), "--quiet"]
    )  # fmt: skip
    _outputs(out, ["metrics.jsonl", "eval.jsonl", "summary.json", "curves.png", "grad_norms.png"])
    assert list(s["cells"]) == cells.split(",") and len(fit_calls) == 1
    for r in s["cells"].values():
        assert np.isfinite(r["test_loss"]) and r["grad_ratio_first_last_at_init"] > 0
    recs = _jsonl(out / "metrics.jsonl")
    assert [(r["run"], r["step"]) for r in recs] == [(cells, 1), (cells, 2)]
    evals = _jsonl(out / "eval.jsonl")
    assert [(e["run"], e["step"]) for e in evals] == [(cells, 1), (cells, 2)]
    assert evals[-1]["test_loss"] == pytest.approx(s["cells"][cells]["test_loss"])
    if task == "copy":
        assert 0.0 <= evals[-1]["test_recall_acc"] <= 1.0
    with pytest.raises(SystemExit):
        long_memory.main(["--cells", "transformer", "--out", str(out)])


def test_tag_sequence(tagging):
    assert "".join(tagging.TAGS[k] for k in tagging.tag_sequence([3, 1, 3, 2, 1, 3])) == "FFRURR"
    rng = np.random.default_rng(0)
    tokens, tags, lengths = tagging.make_batch(rng, 6, 5, 2, 7)
    assert tokens.shape == tags.shape == (7, 6)
    for b, n in enumerate(lengths):
        assert np.all(tokens[n:, b] == tagging.PAD) and np.all(tokens[:n, b] > 0)
        np.testing.assert_array_equal(tags[:n, b], tagging.tag_sequence(tokens[:n, b]))


def test_tagging_smoke(tagging, tmp_path, fit_calls):
    """Both taggers train through js.fit into one log, and their loss falls."""
    out = tmp_path / "tag"
    steps = 24
    s = tagging.main(
        ["--steps", str(steps), "--batch", "16", "--hidden", "8", "--embed", "8",
         "--max-len", "6", "--lr", "0.03", "--test-size", "64", "--eval-every", "12",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    _outputs(out, ["metrics.jsonl", "eval.jsonl", "summary.json", "curves.png", "predictions.txt"])
    runs = ["bilstm", "lstm_forward"]
    assert list(s["models"]) == runs and [c["num_steps"] for c in fit_calls] == [steps, steps]
    recs = _jsonl(out / "metrics.jsonl")
    assert [(r["run"], r["step"]) for r in recs] == [
        (run, i) for run in runs for i in range(1, steps + 1)
    ]
    evals = _jsonl(out / "eval.jsonl")
    assert [(e["run"], e["step"]) for e in evals] == [(run, i) for run in runs for i in (12, 24)]
    for run in runs:
        loss = [r["loss"] for r in recs if r["run"] == run]
        assert np.mean(loss[-4:]) < 0.9 * np.mean(loss[:4]), (run, loss)
        r = s["models"][run]
        assert 0.0 <= r["test_token_acc"] <= 1.0 and np.isfinite(r["test_loss"])
        assert r["test_token_acc"] == pytest.approx(
            evals[runs.index(run) * 2 + 1]["test_token_acc"]
        )
    assert "gold" in (out / "predictions.txt").read_text()
    assert s["accuracy_bidirectional"] == s["models"]["bilstm"]["test_token_acc"]
    assert s["accuracy_unidirectional"] == s["models"]["lstm_forward"]["test_token_acc"]
    saved = json.load(open(out / "summary.json"))
    assert saved["accuracy_bidirectional"] == s["accuracy_bidirectional"]
    assert {"backend", "device_count", "process_count", "jax", "cpu"} <= set(saved)


def test_vanishing_gradients_shows_both_regimes(load_example, tmp_path):
    vg = load_example("vanishing_gradients")
    s = vg.main(["--T", "60", "--hidden", "64", "--batch", "8", "--trials", "3",
                 "--out", str(tmp_path), "--quiet"])  # fmt: skip
    ratio = {k: m["grad_norm_first_over_last"] for k, m in s["models"].items()}
    assert ratio["relu_3"] > 1e3  # exploding: the gradient at t=0 dwarfs the last step's
    assert ratio["relu_1.5"] < 1e-2  # vanishing
    assert 0.1 < ratio["irnn"] < 10  # the identity passes it back level
    assert ratio["lstm"] < 0.1
    assert s["models"]["relu_3"]["hidden_norm_last_over_first"] > 1e3
    for m in s["models"].values():
        assert len(m["grad_norm"]) == len(m["hidden_norm"]) == 60
        assert np.all(np.isfinite(m["grad_norm"]))
    for name in ("summary.json", "hidden_norms.png", "grad_norms.png"):
        assert (tmp_path / name).stat().st_size > 0
