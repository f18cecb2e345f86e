"""Smoke tests of the sentiment and forecasting examples on tiny data (no corpora, no
network), checks of their data generators and baselines against references written
here, exact resume of forecasting after a kill, and run_all's table writing on fake
summaries (no training)."""

import json
import re
import sys
from collections import Counter

import numpy as np
import pytest

import jaxseq as js


@pytest.fixture(scope="module")
def sentiment(load_example):
    return load_example("sentiment")


@pytest.fixture(scope="module")
def forecasting(load_example):
    return load_example("forecasting")


@pytest.fixture(scope="module")
def run_all(load_example):
    return load_example("run_all")


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------- sentiment

POS = {"good", "great", "lovely", "excellent", "nice", "superb", "pleasant", "fine", "perfect", "wonderful"}  # fmt: skip
NEG = {"bad", "awful", "terrible", "poor", "horrible", "mediocre", "dreadful", "disappointing", "dull", "sloppy"}  # fmt: skip


def reference_label(text: str) -> int:
    """The label by the corpus's rules, read off the words: a clause is 'the N was
    [not] [very] ADJ [, not ADJ' at all]'; 'not' flips the adjective after it, in
    'ADJ , not ADJ' at all' the first adjective counts; after 'but' the last clause
    decides, with 'and' both clauses agree."""
    sentences = [s.split() for s in text.split(" . ")]
    sentence = " ".join(next(s for s in sentences if set(s) & (POS | NEG)))
    last = sentence.rstrip(" .").split(" but ")[-1].split(" and ")[0]
    toks = last.split()
    i = toks.index("was") + 1
    negated = toks[i] == "not"
    adj = next(t for t in toks[i:] if t in POS or t in NEG)
    return int((adj in POS) != negated)


def test_sentiment_corpus_rules_and_order_pairs(sentiment):
    train, test, pairs = sentiment.generate(3, 300, 100, 60)
    for text, label in train + test + pairs:
        assert reference_label(text) == label, text
    labels = [lab for _, lab in train]
    assert 0.4 < np.mean(labels) < 0.6
    seen = {t for t, _ in train}
    assert not seen & {t for t, _ in test + pairs}
    for (a, la), (b, lb) in zip(pairs[::2], pairs[1::2]):
        assert (la, lb) == (1, 0) and a != b
        assert Counter(a.split()) == Counter(b.split())  # the same bag of words
    kinds = {("," in a) + 2 * (" but " in a) for a, _ in pairs[::2]}
    assert kinds == {0, 1, 2}  # all three kinds of pair occur


def test_bag_of_words_cannot_see_order_and_ignores_padding(sentiment):
    import jax

    params = sentiment.bow_init(jax.random.key(0), 12, 4, 5, 2)
    apply = jax.jit(sentiment.bow_apply)
    a = np.array([3, 5, 7, 9, 2], np.int32)
    tokens = np.stack([a, a[::-1], np.r_[a[:3], 0, 0]], axis=1)  # [T, B]
    padded = tokens.copy()
    padded[3:, 2] = 11  # what sits in the padding changes nothing
    lengths = np.array([5, 5, 3], np.int32)
    out = np.asarray(apply(params, tokens, lengths))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(apply(params, padded, lengths)))
    # reference: the mean of the embeddings of the valid words, then tanh layer and head
    e = np.asarray(params["embedding"])[a[:3]].mean(0)
    h = np.tanh(e @ np.asarray(params["hidden"].w) + np.asarray(params["hidden"].b))
    ref = h @ np.asarray(params["head"].w) + np.asarray(params["head"].b)
    np.testing.assert_allclose(out[2], ref, rtol=1e-5, atol=1e-6)


def test_sentiment_smoke(sentiment, tmp_path):
    out = tmp_path / "s"
    summary = sentiment.main([
        "--out", str(out), "--steps", "4", "--eval-every", "2", "--batch", "16", "--train-size", "96",
        "--test-size", "24", "--pairs", "6", "--hidden", "8", "--embed", "4", "--model", "bow,lstm",
        "--filler", "1", "--quiet",
    ])  # fmt: skip
    for name in ("metrics.jsonl", "eval.jsonl", "summary.json", "results.md", "curves.png",
                 "predictions.txt"):  # fmt: skip
        assert (out / name).exists(), name
    recs = _jsonl(out / "metrics.jsonl")
    assert [(r["run"], r["step"]) for r in recs] == [
        (m, s) for m in ("bow", "lstm") for s in (1, 2, 3, 4)
    ]
    assert all(np.isfinite(r["loss"]) for r in recs)
    saved = json.load(open(out / "summary.json"))
    for key in ("test_accuracy", "bow_test_accuracy", "order_test_accuracy", "cpu", "backend"):
        assert saved[key] is not None, key
    assert saved["models"]["bow"]["order_test_accuracy"] == 0.5  # the pairs look alike to it
    assert (
        saved["test_accuracy"]
        == saved["models"]["lstm"]["test_accuracy"]
        == summary["test_accuracy"]
    )
    assert "| lstm |" in (out / "results.md").read_text()


def test_sentiment_tsv(sentiment, tmp_path, capsys):
    data = tmp_path / "reviews.tsv"
    rows = [f"a fine {'good' if i % 2 else 'bad'} place number {i}\t{'yes' if i % 2 else 'no'}" for i in range(40)]  # fmt: skip
    data.write_text("\n".join(rows) + "\n")
    train, test, names = sentiment.read_tsv(str(data), 0.25, 0)
    assert names == ["no", "yes"] and len(train) == 30 and len(test) == 10
    assert sorted(t for t, _ in train + test) == sorted(r.split("\t")[0] for r in rows)
    bad = tmp_path / "bad.tsv"
    bad.write_text("no label here\n")
    with pytest.raises(SystemExit, match="line 1.*text<TAB>label"):
        sentiment.read_tsv(str(bad), 0.25, 0)
    with pytest.raises(SystemExit):
        sentiment.parse_args(["--model", "bow,cnn"])
    assert "--model: expected distinct names" in capsys.readouterr().err


# ----------------------------------------------------------------------------- forecasting


def test_forecasting_baselines_and_windows(forecasting):
    y = np.arange(100.0) ** 1.5
    origins = np.array([40, 57, 80])
    pers, seas = forecasting.baselines(y, origins, 7, 3)
    for i, o in enumerate(origins):
        for h in range(1, 8):
            assert pers[i, h - 1] == y[o]
            k = h
            while k > 0:  # back one season at a time until at or before the origin
                k -= 3
            assert seas[i, h - 1] == y[o + k]
    w = forecasting.lag_windows(np.arange(1.0, 6.0), 3)
    np.testing.assert_array_equal(w, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]])
    t = np.arange(400.0)
    assert forecasting.estimate_season(np.sin(2 * np.pi * t / 12), 100) == 12


def test_forecasting_csv_and_missing_series(forecasting, tmp_path, monkeypatch):
    path = tmp_path / "s.csv"
    path.write_text("year,value,note\n2000,1.5,a\n2001,2.5,b\n2002,4.0,c\n")
    with pytest.raises(SystemExit, match="--column"):
        forecasting.read_csv_series(str(path))  # two numeric columns
    _, v, name = forecasting.read_csv_series(str(path), "value")
    assert name == "value" and v.tolist() == [1.5, 2.5, 4.0]
    assert forecasting.read_csv_series(str(path), "1")[1].tolist() == [1.5, 2.5, 4.0]
    path.write_text("3\n4\nx\n")
    with pytest.raises(SystemExit, match="--data: line 3"):
        forecasting.read_csv_series(str(path))
    monkeypatch.setitem(sys.modules, "statsmodels.datasets", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        forecasting.main(["--out", str(tmp_path / "x"), "--quiet"])
    assert "statsmodels" in str(e.value) and "--data CSV" in str(e.value)


def _series_csv(tmp_path):
    t = np.arange(160)
    y = 50 + 40 * np.sin(2 * np.pi * t / 11) + np.random.default_rng(0).normal(0, 3, t.size)
    path = tmp_path / "series.csv"
    path.write_text("value\n" + "\n".join(f"{v:.3f}" for v in y) + "\n")
    return str(path)


def test_forecasting_smoke_and_exact_resume_after_a_kill(forecasting, tmp_path, monkeypatch):
    data = _series_csv(tmp_path)

    def args(out):
        return [
            "--data", data, "--out", str(out), "--steps", "6", "--eval-every", "3", "--batch", "2",
            "--seq", "8", "--hidden", "4", "--horizon", "4", "--season", "11", "--model", "gru",
            "--checkpoint-every", "2", "--lr", "0.01", "--quiet",
        ]  # fmt: skip

    full = forecasting.main(args(tmp_path / "full"))
    for name in ("metrics.jsonl", "eval.jsonl", "summary.json", "forecasts.png", "forecasts.txt"):
        assert (tmp_path / "full" / name).exists(), name
    for key in ("mae", "mae_naive", "mae_persistence", "cpu", "backend"):
        assert np.isfinite(full[key]) if key.startswith("mae") else full[key], key
    ref = _jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]

    # a kill after step 5: no checkpoint at exit (the last one is step 4), a log line too many
    fit = js.fit

    def killed_fit(step, state, batches, **kw):
        def on_step(s, rec, inner=kw["on_step"]):
            inner(s, rec)
            if s == 5:
                raise RuntimeError("killed")

        return fit(step, state, batches, **{**kw, "on_step": on_step})

    out = tmp_path / "killed"
    monkeypatch.setattr(js, "fit", killed_fit)
    with pytest.raises(RuntimeError, match="killed"):
        forecasting.main(args(out))
    monkeypatch.setattr(js, "fit", fit)
    assert [r["step"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    resumed = forecasting.main(args(out) + ["--resume"])
    recs = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref]  # exactly
    assert resumed["mae"] == full["mae"]
    assert [e["step"] for e in _jsonl(out / "eval.jsonl")] == [3, 6]


def test_trim_run_logs_keeps_other_runs(load_example, tmp_path):
    common = load_example("_common")
    lines = [{"run": "a", "step": 1}, {"run": "b", "step": 1}, {"run": "a", "step": 2},
             {"run": "b", "step": 2}, {"run": "b", "step": 3}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"run": "b", "st'
    )
    common.trim_run_logs(str(tmp_path), "b", 1)
    assert _jsonl(tmp_path / "metrics.jsonl") == [lines[0], lines[1], lines[2]]


# ----------------------------------------------------------------------------- run_all


def test_run_all_table_from_summaries(run_all, tmp_path):
    out = tmp_path / "out"
    fake = {
        "sentiment": {"test_accuracy": 0.99, "bow_test_accuracy": 0.5, "train_s": 12.4, "cpu": "CPU X"},
        "long_memory": {"mse": {"gru": {"100": 0.0023}, "rnn": {"100": 0.15}},
                        "cells": {"gru": {"train_s": 10.0}, "rnn": {"train_s": 5.0}}},
        "vanishing_gradients": {"models": {"relu": {"hidden_norm_last_over_first": 2.4e10,
                                                    "grad_norm_first_over_last": 4.8e9}}},
    }  # fmt: skip
    for name, s in fake.items():
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps(s))
    (out / "tagging").mkdir()
    (out / "tagging" / "summary.json").write_text("{not json")
    readme = tmp_path / "README.md"
    old = "| forecasting | `old command` | mae 20.1 | 5 | 9 | CPU Y |"
    readme.write_text(f"# intro\n\n{run_all.BEGIN}\nold table\n{old}\n{run_all.END}\n\nafter\n")
    results = {"seq2seq_attention": {"status": "failed (exit 1; see log)", "wall_s": 3.0}}
    table = run_all.build_table(str(out), results=results, old_rows=run_all.old_rows(str(readme)))
    run_all.rewrite_readme(str(readme), table, "note")
    text = readme.read_text()
    assert text.startswith("# intro\n\n" + run_all.BEGIN + "\nnote\n\n| run |") and text.endswith(
        run_all.END + "\n\nafter\n"
    )
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) == {"run", *run_all.RUN_IDS}
    s = rows["sentiment"]
    assert "test_accuracy 0.99; bow_test_accuracy 0.5; order_test_accuracy missing" in s
    assert "| 12 |" in s and s.endswith("| CPU X |")
    assert "`python examples/sentiment.py --out out/sentiment`" in s
    assert "mse {gru: {100: 0.0023}, rnn: {100: 0.15}}" in rows["long_memory"]
    assert "| 15 |" in rows["long_memory"] and "| missing |" in rows["long_memory"]  # no cpu
    assert "models.relu.hidden_norm_last_over_first 2.4e+10" in rows["vanishing_gradients"]
    assert rows["forecasting"] == old  # neither run nor found: kept
    assert "failed (exit 1" in rows["seq2seq_attention"] and "| 3 |" in rows["seq2seq_attention"]
    assert "not run" in rows["tagging"]  # unreadable summary
    assert "--data PATH/irish.abc" in rows["music_gen"]
    assert not re.search(r"/tmp|/work", text)
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="marker"):
        run_all.rewrite_readme(str(readme), table)


def test_run_all_commands_parse_in_their_scripts(run_all, load_example, tmp_path):
    """Every command of the table (and its --quick form) is accepted by its script."""
    for run_id, script, args, _corpus, _, quick in run_all.RUNS:
        mod = load_example(script[:-3])
        argv = [a.replace("{data}", str(tmp_path)) for a in args]
        for extra in ([], quick):
            mod.parse_args([*argv, *extra, "--out", str(tmp_path / run_id), "--quiet"])
