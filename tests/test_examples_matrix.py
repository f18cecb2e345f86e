"""Smoke tests of the examples' matrix-state and exponential-gated models (tiny sizes,
a few steps, generated data): long_memory.py --task mqar and char_lm.py's mlstm,
slstm, rglru and xlstm."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def long_memory(load_example):
    return load_example("long_memory")


@pytest.fixture(scope="module")
def char_lm(load_example):
    return load_example("char_lm")


def test_mqar_batches_pair_each_query_with_its_value(long_memory):
    tokens, targets, mask = long_memory.mqar_batch(np.random.default_rng(0), 5, 4, 6, 3)
    assert tokens.shape == targets.shape == mask.shape == (12, 5)
    keys, values = tokens[0:8:2], tokens[1:8:2]
    assert np.all((keys >= 1) & (keys <= 6)) and np.all((values >= 7) & (values <= 9))
    assert not mask[:8].any() and mask[8:].all()
    for b in range(5):
        pairs = dict(zip(keys[:, b], values[:, b]))
        assert len(pairs) == 4  # distinct keys
        assert sorted(tokens[8:, b]) == sorted(pairs)  # every key queried once
        assert [pairs[k] for k in tokens[8:, b]] == list(targets[8:, b])


def test_long_memory_mqar_smoke(long_memory, tmp_path):
    """Every model at the same state size trains through js.fit; recall lands in the summary."""
    out = tmp_path / "mqar"
    s = long_memory.main(
        ["--task", "mqar", "--cells", "lstm,mlstm,linattn", "--pairs", "3", "--keys", "5",
         "--values", "4", "--heads", "2", "--head-dim", "2", "--embed", "4", "--steps", "2",
         "--batch", "4", "--test-size", "8", "--eval-every", "1", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert s["state_size"] == {"lstm": 8, "mlstm": 8 + 4 + 2, "linattn": 8}
    assert s["hidden_size"] == {"lstm": 4, "mlstm": 4, "linattn": 4}
    assert set(s["recall"]) == {"lstm", "mlstm", "linattn"}
    assert all(0.0 <= r <= 1.0 for r in s["recall"].values())
    runs = {json.loads(line)["run"] for line in open(out / "eval.jsonl")}
    assert runs == {"lstm", "mlstm", "linattn"} and (out / "curves.png").exists()
    with pytest.raises(SystemExit):
        long_memory.main(["--task", "mqar", "--cells", "gru", "--out", str(out)])


def test_char_lm_compare_the_new_models(char_lm, tmp_path):
    """The RG-LRU and the xLSTM stack (an mLSTM layer, then an sLSTM one) train, evaluate
    and sample in one --compare."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(rng.choice(["to", "be", "or", "not", "ROMEO:", "\n"], size=300)))
    s = char_lm.main(
        ["--data", str(path), "--compare", "rglru,xlstm", "--steps", "2",
         "--batch", "2", "--seq", "8", "--layers", "2", "--hidden", "4", "--embed", "4",
         "--heads", "2", "--eval-every", "2", "--sample-len", "5", "--eval-streams", "2",
         "--out", str(tmp_path / "cmp"), "--quiet"]
    )  # fmt: skip
    assert set(s["val_loss_by_model"]) == {"rglru", "xlstm"}
    assert all(np.isfinite(v) for v in s["val_loss_by_model"].values())
    layers = json.load(open(tmp_path / "cmp" / "xlstm" / "summary.json"))["model_config"]["layers"]
    assert [layer["type"] for layer in layers] == ["MLSTM", "SLSTM"]
