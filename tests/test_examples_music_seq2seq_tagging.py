"""Smoke tests of the music, seq2seq, long-memory and tagging examples on tiny
generated data (no corpora), plus checks of their data generators."""

import json
import shutil

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


def test_check_abc_and_midi(music, tmp_path):
    good = TUNE.format(i=1, n="A")
    assert music.check_abc(good) == []
    assert "no K: key line" in music.check_abc("X:1\nT:a\nabc|def|")
    assert "no X: number line first" in music.check_abc(good.replace("X:1", "X:one"))
    assert "no T: title in the header" in music.check_abc(good.replace("T:Tune number 1", "T:"))
    assert "no body" in music.check_abc("X:1\nT:a\nK:G")
    assert "characters that are not ABC music" in music.check_abc(good + "\nhello, world?")
    midi = music.write_midi([good, "X:1\nT:x\nK:G\n(((]]zz|||"], str(tmp_path))
    if "skipped" in midi:  # music21 is optional
        assert "music21" in midi["skipped"]
    else:
        assert midi["written"] == ["sample_01.mid"] and list(midi["failed"]) == [2]
        assert (tmp_path / "sample_01.mid").read_bytes()[:4] == b"MThd"
    assert music.split_tunes("junk\n" + good + "\n\n\n" + TUNE.format(i=2, n="B")) == [
        good,
        TUNE.format(i=2, n="B"),
    ]


def test_music_gen_smoke_and_exact_resume(music, tmp_path, fit_calls):
    data = tmp_path / "tunes.abc"
    data.write_text("\n\n".join(TUNE.format(i=i, n="ABcd"[i % 4]) for i in range(1, 13)))
    out = tmp_path / "music"
    args = ["--data", str(data), "--steps", "4", "--batch", "2", "--seq", "16", "--hidden", "8",
            "--embed", "4", "--eval-every", "2", "--checkpoint-every", "2", "--samples", "3",
            "--sample-len", "40", "--top-p", "0.95", "--quiet"]  # fmt: skip
    s = music.main(args + ["--out", str(out)])
    _outputs(out, ["metrics.jsonl", "eval.jsonl", "curves.png", "samples.abc", "summary.json"])
    assert s["steps"] == 4 and np.isfinite(s["val_loss"]) and s["samples"] == 3
    assert [c["num_steps"] for c in fit_calls] == [4]
    assert [r["step"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    evals = _jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [2, 4] and evals[-1]["val_loss"] == s["val_loss"]
    assert 0 <= s["plausible"] <= 3 and s["train_tunes_plausible"] == 1.0
    assert s["well_formed_fraction"] == s["plausible"] / 3
    assert (out / "samples.abc").read_text().count("% sample") == 3
    saved = json.load(open(out / "summary.json"))
    assert saved["well_formed_fraction"] == s["well_formed_fraction"]
    assert {"backend", "device_count", "process_count", "jax", "cpu"} <= set(saved)
    assert set(saved["midi"]) in ({"skipped"}, {"written", "failed"})
    # killed after step 4 but before its checkpoint: resuming from step 2 gives the same losses
    shutil.copytree(out, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "ckpt" / "4")
    log = tmp_path / "resumed" / "metrics.jsonl"
    recs = _jsonl(log)
    recs[1]["before_the_kill"] = True  # step 2's line must survive: the run restarts after it
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    music.main(args + ["--out", str(tmp_path / "resumed"), "--resume", "--no-midi"])
    resumed = _jsonl(log)
    assert [r.get("before_the_kill", False) for r in resumed] == [False, True, False, False]
    losses = [[r["loss"] for r in _jsonl(out / "metrics.jsonl")], [r["loss"] for r in resumed]]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    assert [c["num_steps"] for c in fit_calls] == [4, 4]
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
    """Both models (with and without attention) train through js.fit into one log; greedy
    and beam exact match land under the fixed summary keys."""
    out = tmp_path / "s2s"
    s = seq2seq.main(
        ["--task", "reverse", "--max-len", "4", "--steps", "3", "--batch", "4", "--hidden", "8",
         "--embed", "4", "--attention", "4", "--test-size", "6", "--eval-every", "2",
         "--beam-size", "2", "--out", str(out), "--quiet"]
    )  # fmt: skip
    names = ["metrics.jsonl", "eval.jsonl", "summary.json", "curves.png", "attention.png"]
    _outputs(out, names + ["samples.txt"])
    for key in ("exact_match", "exact_match_beam", "exact_match_no_attention"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["exact_match"] == s["models"]["attention"]["test_seq_acc"]
    assert np.isfinite(s["models"]["no_attention"]["test_loss"])
    assert [c["num_steps"] for c in fit_calls] == [3, 3]
    recs = _jsonl(out / "metrics.jsonl")
    runs = ["attention", "no_attention"]
    assert [(r["run"], r["step"]) for r in recs] == [(m, i) for m in runs for i in (1, 2, 3)]
    assert all(np.isfinite(r["loss"]) for r in recs)
    lrs = [r["lr"] for r in recs[:3]]  # cosine decay over --steps, from --lr
    assert lrs[0] == pytest.approx(0.005) and lrs[0] > lrs[1] > lrs[2] > 0.0
    assert [r["lr"] for r in recs[3:]] == pytest.approx(lrs)  # the same schedule for both
    assert all(0.0 <= r["token_acc"] <= 1.0 for r in recs)
    evals = _jsonl(out / "eval.jsonl")
    assert [(e["run"], e["step"]) for e in evals] == [(m, i) for m in runs for i in (2, 3)]
    assert evals[1]["test_seq_acc"] == pytest.approx(s["exact_match"])
    saved = json.load(open(out / "summary.json"))
    assert saved["exact_match_no_attention"] == s["exact_match_no_attention"]
    assert {"backend", "device_count", "process_count", "jax", "cpu"} <= set(saved)
    assert "beam" in (out / "samples.txt").read_text()


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


@pytest.mark.parametrize("task,cells,ts", [("adding", "mingru", "6,9"), ("copy", "gru", "6")])
def test_long_memory_smoke(long_memory, tmp_path, task, cells, ts, fit_calls):
    """Every cell at every T trains through js.fit into one log (run = CELL_T<T>); the adding
    task's test MSE lands under summary["mse"][cell][T]; the minimal cells join by default."""
    out = tmp_path / task
    s = long_memory.main(
        ["--task", task, "--T", ts, "--cells", cells, "--steps", "2", "--batch", "4",
         "--hidden", "4", "--test-size", "8", "--eval-every", "1", "--out", str(out), "--quiet"]
    )  # fmt: skip
    _outputs(out, ["metrics.jsonl", "eval.jsonl", "summary.json", "curves.png", "grad_norms.png"])
    cells, ts = cells.split(","), ts.split(",")
    runs = [f"{c}_T{t}" for t in ts for c in cells]
    assert s["cells"] == cells and s["T"] == [int(t) for t in ts] and len(fit_calls) == len(runs)
    for c in cells:
        assert list(s["results"][c]) == ts
        for r in s["results"][c].values():
            assert np.isfinite(r["test_loss"]) and r["grad_ratio_first_last_at_init"] > 0
    recs = _jsonl(out / "metrics.jsonl")
    assert [(r["run"], r["step"]) for r in recs] == [(run, i) for run in runs for i in (1, 2)]
    evals = _jsonl(out / "eval.jsonl")
    assert [(e["run"], e["step"]) for e in evals] == [(run, i) for run in runs for i in (1, 2)]
    c, t = cells[-1], ts[-1]
    assert evals[-1]["test_loss"] == pytest.approx(s["results"][c][t]["test_loss"])
    saved = json.load(open(out / "summary.json"))
    assert saved["train_s"] == pytest.approx(
        sum(r["train_s"] for c in cells for r in s["results"][c].values()), abs=0.01
    )
    if task == "copy":
        assert 0.0 <= evals[-1]["test_recall_acc"] <= 1.0 and "mse" not in saved
    else:
        assert saved["mse"][c][t] == pytest.approx(evals[-1]["test_loss"])
        assert saved["solved"][c][t] == (saved["mse"][c][t] < 0.01)
        assert {"mingru", "minlstm"} <= set(long_memory.CELLS)
    with pytest.raises(SystemExit):
        long_memory.main(["--cells", "transformer", "--out", str(out)])
    with pytest.raises(SystemExit):
        long_memory.main(["--T", "100,x", "--out", str(out)])


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
