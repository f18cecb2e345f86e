"""Smoke tests of the examples on tiny generated data (no network, no corpora)."""

import json
import shutil

import numpy as np
import pytest

from jaxseq.training.checkpoint import IncompatibleCheckpointError


@pytest.fixture(scope="module")
def char_lm(load_example):
    return load_example("char_lm")


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "ROMEO:", "\n"]
    text = " ".join(rng.choice(words, size=700))
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    return str(path)


def _args(corpus, out, steps):
    return [
        "--data", corpus, "--out", str(out), "--steps", str(steps), "--batch", "4", "--seq", "8",
        "--layers", "1", "--hidden", "8", "--embed", "4", "--eval-every", "3", "--checkpoint-every", "3",
        "--sample-len", "20", "--eval-streams", "4", "--dropout", "0.1", "--lr", "0.05", "--quiet",
    ]  # fmt: skip


def test_char_lm_smoke_resume_and_refusals(char_lm, corpus, tmp_path):
    out = tmp_path / "run"
    summary = char_lm.main(_args(corpus, out, 6))
    assert np.isfinite(summary["val_loss"]) and summary["step"] == 6
    assert "cooldown" not in summary["hparams"]  # recorded with --schedule wsd only
    for name in ("metrics.jsonl", "eval.jsonl", "summary.json", "samples.txt", "curves.png"):
        assert (out / name).exists(), name
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 7)) and all("loss" in r for r in recs)
    assert json.load(open(out / "summary.json"))["val_loss"] == summary["val_loss"]
    evals = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [3, 6] and evals[-1]["val_loss"] == summary["val_loss"]
    # learning: validation loss falls, below that of a uniform guess over the characters
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < np.log(len(summary["hparams"]["vocab"]))
    samples = (out / "samples.txt").read_text()
    assert "top-k" in samples and "greedy" in samples and "ROMEO:" in samples

    with pytest.raises(IncompatibleCheckpointError, match="steps: checkpoint has 6"):
        char_lm.main(_args(corpus, out, 9) + ["--resume"])
    summary = char_lm.main(_args(corpus, out, 9) + ["--resume", "--override"])
    assert summary["step"] == 9
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 10))


def test_char_lm_wsd_schedule_holds_the_peak_then_decays(char_lm, corpus, tmp_path, capsys):
    args = _args(corpus, tmp_path / "wsd", 8) + ["--optimizer", "adamw", "--weight-decay", "0.1"]
    summary = char_lm.main(args + ["--schedule", "wsd", "--cooldown", "0.5", "--final-lr", "0.1"])
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "wsd" / "metrics.jsonl")]
    np.testing.assert_allclose(lrs[:5], 0.05, rtol=1e-6)  # counts 0-4 at the peak, then 1 - sqrt
    np.testing.assert_allclose(lrs[5:], [0.005 + 0.045 * (1 - (p / 4) ** 0.5) for p in (1, 2, 3)])
    assert summary["hparams"]["cooldown"] == 0.5 and summary["hparams"]["schedule"] == "wsd"
    with pytest.raises(SystemExit):
        char_lm.main(args + ["--schedule", "wsd", "--cooldown", "0"])
    assert (
        "--cooldown: expected a fraction of the steps in (0, 1], got 0.0" in capsys.readouterr().err
    )


def test_char_lm_bad_input_fails_before_training(char_lm, corpus, tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        char_lm.main(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="shorter than one chunk"):
        char_lm.main(_args(corpus, tmp_path / "x", 2) + ["--seq", "2000"])
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_char_lm_compare_transformer_and_window_and_exact_resume(char_lm, corpus, tmp_path):
    out = tmp_path / "cmp"
    sizes = [
        "--layers", "1", "--d-model", "8", "--heads", "2", "--max-len", "12", "--context", "3",
        "--embed", "4", "--hidden", "8", "--data", corpus, "--steps", "4", "--batch", "4",
        "--seq", "8", "--eval-every", "2", "--checkpoint-every", "2", "--sample-len", "12",
        "--eval-streams", "4", "--dropout", "0.1", "--lr", "0.02", "--quiet",
    ]  # fmt: skip
    summary = char_lm.main(sizes + ["--compare", "transformer,window", "--out", str(out)])
    by_model = summary["val_loss_by_model"]
    assert set(by_model) == {"transformer", "window"} and all(np.isfinite(list(by_model.values())))
    assert summary["val_loss"] == min(by_model.values()) and summary["backend"] == "cpu"
    assert set(summary["tokens_per_s_by_model"]) == set(by_model)
    assert (out / "compare.png").stat().st_size > 0
    runs = [json.loads(line)["run"] for line in open(out / "metrics.jsonl")]
    assert runs == ["transformer"] * 4 + ["window"] * 4
    for name in by_model:
        s = json.load(open(out / name / "summary.json"))
        assert s["val_loss"] == by_model[name] and s["tokens_per_s"] > 0
        assert s["evals"][1]["val_loss"] < s["evals"][0]["val_loss"], name  # it learns
        samples = (out / name / "samples.txt").read_text()
        assert "top-k" in samples and "top-p" in samples and "ROMEO:" in samples
    # killed after step 4 but before its checkpoint: resuming from step 2 gives the same losses
    shutil.copytree(out / "transformer", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "ckpt" / "4")
    char_lm.main(sizes + ["--model", "transformer", "--out", str(tmp_path / "resumed"), "--resume"])
    losses = [
        [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]
        for d in (out / "transformer", tmp_path / "resumed")
    ]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
