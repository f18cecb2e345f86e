"""The benchmark harness and scripts on tiny configurations (T=3, H=4); nothing here is timed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import frameworks, scan_vs_unrolled
from benchmarks._environment import environment
from benchmarks._flops import gflops, rnn_flops
from benchmarks._output import write_results
from benchmarks._processes import CompileBudgetRunner, peak_memory_subprocess
from benchmarks._timing import skipped, time_callable, time_interleaved, time_jitted

TIMING_KEYS = {"status", "compile_s", "first_call_s", "median_s", "min_s", "p10_s", "p90_s"}
TINY = dict(B=2, D=3, H=4, T=3, repeats=2, warmup=1)


def _check_timing(rec, jitted=True):
    assert TIMING_KEYS | {"repeats"} <= set(rec)
    assert rec["status"] == "ok"
    assert rec["min_s"] <= rec["p10_s"] <= rec["median_s"] <= rec["p90_s"]
    assert rec["first_call_s"] > 0
    if jitted:
        assert rec["compile_s"] > 0
    else:
        assert rec["compile_s"] is None


# ----------------------------------------------------------------------------- harness


def test_time_jitted_and_callable(key):
    x = jax.random.normal(key, (4, 4))
    rec = time_jitted(lambda a: a @ a, x, repeats=3, warmup=1)
    _check_timing(rec)
    assert rec["repeats"] == 3
    calls = []
    rec = time_callable(lambda: calls.append(1) or len(calls), repeats=4, warmup=2)
    _check_timing(rec, jitted=False)
    assert len(calls) == 1 + 2 + 4  # first call, warm-up, timed
    order = []
    recs = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        repeats=3, warmup=1, info={"a": {"compile_s": 1.5, "first_call_s": 0.1}},
    )  # fmt: skip
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert recs["a"]["compile_s"] == 1.5 and recs["b"]["compile_s"] is None
    assert recs["a"]["repeats"] == recs["b"]["repeats"] == 3
    # bursts: per turn one untimed call, then `burst` timed ones back to back
    order.clear()
    recs = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        repeats=2, warmup=0, burst=2,
    )  # fmt: skip
    assert order == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert recs["a"]["repeats"] == recs["b"]["repeats"] == 4
    with pytest.raises(ValueError, match="burst: expected a non-negative int, got -1"):
        time_interleaved({"a": lambda: None}, burst=-1)


def test_time_jitted_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats"):
        time_jitted(lambda a: a, jnp.ones(2), repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_callable(lambda: 1, warmup=-1)


def test_flop_formulas():
    # Counted by hand for B=2, D=3, H=4, T=5: per step x @ W_ih is 2*B*D*(G*H) and
    # h @ W_hh is 2*B*H*(G*H) multiply-adds counted as 2 FLOPs each.
    #   LSTM (G=4): 2*2*3*16 = 192 + 2*2*4*16 = 256 -> 448 per step, 2240 for 5 steps
    #   GRU  (G=3): 144 + 192 = 336 per step, 1680 for 5 steps
    #   RNN  (G=1): 48 + 64 = 112 per step, 560 for 5 steps; training 3x = 1680
    assert rnn_flops("lstm", 2, 3, 4, 5, training=False) == 2240
    assert rnn_flops("lstm", 2, 3, 4, 5, training=True) == 6720
    assert rnn_flops("gru", 2, 3, 4, 5, training=False) == 1680
    assert rnn_flops("rnn", 2, 3, 4, 5, training=False) == 560
    assert rnn_flops("rnn", 2, 3, 4, 5, training=True) == 1680
    assert rnn_flops("gru", 1, 1, 1, 1, training=False) == 12  # 2*1*1*3 twice
    assert gflops(2e9, 0.5) == pytest.approx(4.0)
    assert gflops(None, 1.0) is None


def _dot_flops(fn, *args):
    """2 * (output size) * (contracted size) summed over every dot_general ``fn`` traces."""
    import math

    def walk(jaxpr, times):
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out = eqn.outvars[0].aval.shape
                total += times * 2 * math.prod(out) * math.prod(lhs[a] for a in lhs_contract)
            n = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            for v in eqn.params.values():
                for sub in v if isinstance(v, tuple | list) else (v,):
                    sub = getattr(sub, "jaxpr", sub)  # a closed jaxpr holds a jaxpr
                    if hasattr(sub, "eqns"):
                        total += walk(sub, times * n)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)


@pytest.mark.parametrize("cell, flops", [("lstm", 2240), ("gru", 1680), ("rnn", 560)])
def test_flop_formula_counts_the_matmuls_a_rollout_runs(cell, flops, key):
    import jaxseq as js

    c = {"lstm": js.LSTM, "gru": js.GRU, "rnn": js.RNN}[cell](4)
    params = c.init(key, 3)
    xs = jnp.ones((5, 2, 3))
    assert _dot_flops(lambda p, x: js.rollout_unrolled(c, p, x)[1], params, xs) == flops
    assert _dot_flops(lambda p, x: js.rollout(c, p, x)[1], params, xs) == flops  # in a scan
    assert rnn_flops(cell, 2, 3, 4, 5, training=False) == flops


def test_environment_and_write_results(tmp_path):
    env = environment()
    for k in ("jax", "jaxlib", "backend", "device_kind", "cpu_model", "cpu_count", "XLA_FLAGS"):
        assert k in env
    for peer in ("flax", "haiku", "torch"):
        assert isinstance(env[peer], str) and env[peer]  # a version or "not installed"
    records = [
        {"name": "a", "median_s": 0.5, "nested": {"x": 1}},
        {"name": "b|c", **skipped("why not")},
    ]
    paths = write_results(tmp_path / "out", "demo", records, env, extra_md="## More")
    data = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert set(data) == {"environment", "records"}
    assert data["records"][1] == {"name": "b|c", "status": "skipped", "reason": "why not"}
    assert data["environment"]["jax"] == jax.__version__
    md = (tmp_path / "out" / "demo.md").read_text()
    assert paths["md"].endswith("demo.md")
    assert "| name | median_s | status | reason |" in md  # scalar keys only, in order seen
    assert "b\\|c" in md and "## More" in md and "## Environment" in md


def test_peak_memory_subprocess():
    rec = peak_memory_subprocess("import sys; print(sys.argv[1])", ["hello"])
    assert rec["status"] == "ok" and rec["returncode"] == 0
    assert rec["stdout"].strip() == "hello"
    assert rec["peak_rss_mb"] > 1
    bad = peak_memory_subprocess("raise SystemExit(3)")
    assert bad["status"] == "error" and bad["returncode"] == 3


# ----------------------------------------------------------------------------- scan vs unrolled


def test_variants_agree_with_scan(key):
    cell = scan_vs_unrolled.make_cell("gru", 4)
    params = cell.init(key, 3)
    xs = jax.random.normal(jax.random.fold_in(key, 1), (3, 2, 3))
    ref = jax.jit(scan_vs_unrolled.make_program(cell, "scan_u1", "train"))(params, xs)
    for variant in ("scan_u2", "scan_auto", "fori", "unrolled"):
        got = jax.jit(scan_vs_unrolled.make_program(cell, variant, "train"))(params, xs)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5), variant


def test_predicted_compile_time():
    hist = {"k": [(10, 2.0)]}
    assert scan_vs_unrolled.predicted_compile_s(hist, "k", 10) is None
    one_point = 2.0 * 4.0**scan_vs_unrolled.SINGLE_POINT_EXPONENT
    assert scan_vs_unrolled.predicted_compile_s(hist, "k", 40) == pytest.approx(one_point)
    hist = {"k": [(10, 1.0), (30, 9.0)]}  # quadratic growth is followed
    assert scan_vs_unrolled.predicted_compile_s(hist, "k", 100) == pytest.approx(100.0)
    hist = {"k": [(10, 1.0), (30, 1.0)]}  # never predicts faster than linear
    assert scan_vs_unrolled.predicted_compile_s(hist, "k", 60) == pytest.approx(2.0)


def test_compile_budget_stops_a_slow_configuration():
    records = scan_vs_unrolled.run_sweep(
        ["lstm"], ["train"], [3, 5], [1], 2, 3, 4, repeats=1, warmup=0,
        compile_budget_s=0.001, quiet=True, log=lambda *a: None, variants=["unrolled"],
    )  # fmt: skip
    by_t = {r["T"]: r for r in records}
    assert by_t[3]["status"] == "skipped"
    assert "compile exceeded the 0.001 s budget" in by_t[3]["reason"]
    assert by_t[5]["status"] == "skipped" and "at T=3" in by_t[5]["reason"]  # not tried again


def test_budget_runner_restarts_after_stopping():
    kwargs = dict(cell="rnn", variant="unrolled", mode="forward", **TINY)
    with CompileBudgetRunner(budget_s=0.001) as runner:
        first = runner.run("benchmarks.scan_vs_unrolled:measure", kwargs)
        assert first["status"] == "skipped" and "compile exceeded" in first["reason"]
        runner.budget_s = 300.0
        second = runner.run("benchmarks.scan_vs_unrolled:measure", kwargs)
        _check_timing(second)
        third = runner.run("benchmarks.scan_vs_unrolled:nonexistent", {})
        assert third["status"] == "error" and "nonexistent" in third["reason"]


def test_scan_vs_unrolled_main_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["--out", str(out), "--cells", "rnn", "--T", "3", "--unrolls", "1"]
    argv += ["--batch", "2", "--hidden", "4", "--repeats", "2", "--warmup", "1", "--quiet"]
    assert scan_vs_unrolled.main(argv) == 0
    for name in ("results.json", "results.md", "compile_time_vs_T.png", "step_time_vs_T.png"):
        assert (out / name).stat().st_size > 0
    for png in ("compile_time_vs_T.png", "step_time_vs_T.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["backend"] == jax.default_backend()
    recs = data["records"]
    variants = ["scan_u1", "scan_auto", "fori", "unrolled"]
    assert [(r["mode"], r["variant"]) for r in recs] == [
        (m, v) for m in ("forward", "train") for v in variants
    ]
    for r in recs:
        assert {"cell", "mode", "variant", "T", "B", "D", "H", "flops", "status"} <= set(r)
        assert r["status"] == "ok", r
        _check_timing(r)
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
    printed = capsys.readouterr().out
    assert "| cell | mode | T | scan_u1 | scan_auto | fori | unrolled | best |" in printed
    assert "results.json" in printed


# ----------------------------------------------------------------------------- frameworks


def test_frameworks_reports_missing_peers_as_skipped(tmp_path, monkeypatch):
    # Simulate peers that are not installed (and keep torch out of the test suite).
    monkeypatch.setitem(frameworks.PEER_MODULES, "torch", "no_such_module_torch")
    monkeypatch.setitem(frameworks.PEER_MODULES, "haiku", "no_such_module_haiku")
    has_flax = frameworks.available("flax")
    out = tmp_path / "fw"
    argv = ["--out", str(out), "--cells", "rnn", "--configs", "2x4x3", "--repeats", "2"]
    argv += ["--warmup", "0", "--quiet"]  # every impl: jaxseq, flax, haiku, torch, gemm
    assert frameworks.main(argv) == 0
    data = json.loads((out / "frameworks.json").read_text())
    assert data["environment"]["flax"] != "not installed" or not has_flax
    records = data["records"]
    assert [r["mode"] for r in records] == ["forward", "train"]
    for r in records:
        assert (r["cell"], r["B"], r["D"], r["H"], r["T"]) == ("rnn", 2, 4, 4, 3)
        assert r["flops"] == rnn_flops("rnn", 2, 4, 4, 3, r["mode"] == "train")
        _check_timing(r["jaxseq"])
        _check_timing(r["gemm"])
        assert r["jaxseq/gemm"] == pytest.approx(r["jaxseq_ms"] / r["gemm_ms"])
        for peer in ("haiku", "torch"):
            assert r[peer]["status"] == "skipped"
            assert "not installed" in r[peer]["reason"]
            assert r[f"{peer}_ms"] == "skipped" and r[f"jaxseq/{peer}"] is None
        if has_flax:
            _check_timing(r["flax"])
            assert r["jaxseq/flax"] == pytest.approx(r["jaxseq_ms"] / r["flax_ms"])
    md = (out / "frameworks.md").read_text()
    assert "| jaxseq/flax | jaxseq/haiku | jaxseq/torch | jaxseq/gemm |" in md
    assert "## Skipped" in md and "no_such_module_torch not installed" in md


def test_gemm_bound_matches_formula_shapes(key):
    (fwd, train), args = frameworks.build_gemm("lstm", 2, 3, 4, 5, key)
    outs = jax.eval_shape(train, *args)
    n, d, h = 2 * 5, 3, 4
    assert [o.shape for o in outs] == [(n, 4 * h), (n, 4 * h), (n, d), (n, h), (d, 4 * h),
                                       (h, 4 * h)]  # fmt: skip
    # FLOPs of these GEMMs, counted from their traced matmuls: [10, 3] @ [3, 16] is
    # 2*10*3*16 = 960 and [10, 4] @ [4, 16] is 1280, so 2240 forward and 6720 training.
    assert _dot_flops(fwd, *args) == 2240 == rnn_flops("lstm", 2, d, h, 5, training=False)
    assert _dot_flops(train, *args) == 6720 == rnn_flops("lstm", 2, d, h, 5, training=True)
    assert len(jax.eval_shape(fwd, *args)) == 2


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gate_forms_agree(cell, key):
    from benchmarks import kernels as bk

    h = 4
    zs = tuple(
        3.0 * jax.random.normal(k, (2, 3, (4 if cell == "lstm" else 3) * h))
        for k in jax.random.split(key, 1 if cell == "lstm" else 2)
    )
    slices, whole = bk._gate_forms(cell, h)
    a = bk._gates_in_scan(slices, h, zs)
    b = bk._gates_in_scan(whole, h, zs)
    assert a.shape == (2, 3, h)
    assert jnp.allclose(a, b, atol=1e-6)
    assert jnp.allclose(
        bk._gates_no_loop(slices, h, zs), bk._gates_no_loop(whole, h, zs), atol=1e-6
    )


def test_char_lm_e2e_quick_runs_both_sides(tmp_path):
    pytest.importorskip("torch")
    import math

    from benchmarks import char_lm_e2e

    char_lm_e2e.main(["--quick", "--steps", "3", "--out", str(tmp_path), "--quiet"])
    data = json.loads((tmp_path / "char_lm_e2e.json").read_text())
    recs = {r["impl"]: r for r in data["records"]}
    for impl in ("jaxseq", "torch"):
        r = recs[impl]
        assert r["status"] == "ok" and r["timed_steps"] == 3
        assert len(r["losses"]) == 4  # 1 warm-up + 3 timed steps
        assert all(math.isfinite(v) for v in r["losses"])
        assert r["tokens_per_s"] > 0
    # Same weights: the loss of chunk 0 without dropout agrees between the two sides.
    a, b = recs["jaxseq"]["loss_step0_no_dropout"], recs["torch"]["loss_step0_no_dropout"]
    assert abs(a - b) < 1e-4
    ratio = recs["jaxseq/torch"]["ratio_time_per_1000_steps"]
    assert ratio == pytest.approx(recs["jaxseq"]["median_ms"] / recs["torch"]["median_ms"])
    assert (tmp_path / "char_lm_e2e_loss.png").stat().st_size > 0
    assert "| step | jaxseq loss | torch loss |" in (tmp_path / "char_lm_e2e.md").read_text()


# ----------------------------------------------------------------------------- matrix_recurrences


def test_matrix_recurrences_main_writes_results_and_records_missing_peers(tmp_path, monkeypatch):
    import importlib.util

    from benchmarks import matrix_recurrences as mr

    find_spec = importlib.util.find_spec
    hidden = {"mlstm_kernels", "recurrentgemma"}  # absent, whether installed or not
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in hidden else find_spec(name, *a),
    )
    out = tmp_path / "mr"
    argv = ["--out", str(out), "--T", "20", "-B", "1", "-K", "2", "--dk", "4", "--dv", "3"]
    argv += ["--rglru-shape", "2,6,4", "--repeats", "2", "--warmup", "0", "--quiet"]
    assert mr.main(argv) == 0
    for name in ("matrix_recurrences.json", "matrix_recurrences.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "linear_attention_vs_T.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "matrix_recurrences.json").read_text())
    assert data["environment"]["backend"] == jax.default_backend()
    recs = data["records"]
    la = [r for r in recs if r["section"] == "linear_attention"]
    expected = [("scalar", p, m) for p in ("fwd", "fwd+bwd") for m in (*mr.MODES, mr.MLSTM)]
    expected += [("per_key", p, m) for p in ("fwd", "fwd+bwd") for m in mr.MODES]
    assert [(r["decay"], r["pass"], r["mode"]) for r in la] == expected
    for r in la:
        assert (r["T"], r["B"], r["K"], r["Dk"], r["Dv"]) == (20, 1, 2, 4, 3)
        if r["mode"] == mr.MLSTM:
            assert r["status"] == "skipped" and "mlstm_kernels not installed" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["compile_s"] > 0
        if "total_mb" in r:  # XLA's buffer sizes, where the backend reports them
            assert r["total_mb"] == pytest.approx(r["temp_mb"] + r["args_mb"] + r["out_mb"])
    chunked = {(r["decay"], r["pass"]): r["median_ms"] for r in la if r["mode"] == "chunked"}
    for r in la:
        if r["status"] == "ok":
            assert r["vs_chunked"] == pytest.approx(r["median_ms"] / chunked[r["decay"], r["pass"]])
    rg = [r for r in recs if r["section"] == "rglru"]
    assert [r["mode"] for r in rg] == [
        "jaxseq_rollout", "jaxseq_stepped", "lax_scan", "recurrentgemma"
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rg[:3])
    assert rg[3]["status"] == "skipped" and "recurrentgemma not installed" in rg[3]["reason"]
    md = (out / "matrix_recurrences.md").read_text()
    assert "recurrent / chunked, fwd+bwd at T=20" in md and "## Environment" in md


def test_matrix_recurrences_skips_over_the_limits_with_the_reason():
    import types

    from benchmarks import matrix_recurrences as mr

    args = mr.la_inputs(8, 1, 1, 2, 2, per_key=False)
    fns = {m: mr.la_fn(m, train=False) for m in mr.MODES}
    cfg = types.SimpleNamespace(repeats=1, warmup=0, max_config_s=10.0, max_mem_gb=0.0)
    est = {"recurrent": 11.0}  # seconds extrapolated from a smaller T
    recs = mr._measure({"T": 8}, fns, {m: args for m in mr.MODES}, cfg, est)
    assert [r["status"] for r in recs] == ["skipped"] * 3
    assert "--max-config-s" in recs[0]["reason"]
    assert all("> --max-mem-gb" in r["reason"] for r in recs[1:])
    assert mr._parallel_fits(16384, 4, 4, 8.0).startswith("one [B K, T, T] float32 product is 16.0")
    assert mr._parallel_fits(1024, 4, 4, 8.0) is None
    assert mr._estimates({"parallel": (1024, 100.0), "chunked": (1024, 10.0)}, 4096, 2) == {
        "parallel": pytest.approx(3.2), "chunked": pytest.approx(0.08)
    }  # fmt: skip


# ----------------------------------------------------------------------------- transformer_e2e


def test_transformer_e2e_quick_runs_both_sides_on_the_same_model(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import transformer_e2e

    out = transformer_e2e.main(["--quick", "--lengths", "16", "--out", str(tmp_path), "--quiet"])
    assert out["finite"]
    data = json.loads((tmp_path / "transformer_e2e.json").read_text())
    recs = data["records"]
    lm = {(r["impl"], r["precision"]): r for r in recs if r["part"] == "lm"}
    assert set(lm) == {(i, p) for i in ("jaxseq", "torch") for p in ("fp32", "bf16")}
    for r in lm.values():
        assert r["status"] == "ok" and len(r["losses"]) == 4 and r["median_ms"] > 0
    # the same weights: the loss of chunk 0 agrees, and so do the first training losses
    a, b = lm[("jaxseq", "fp32")], lm[("torch", "fp32")]
    assert abs(a["loss_step0_fp32"] - b["loss_step0_fp32"]) < 1e-4
    np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-3)
    assert a["ratio_vs_torch"] == pytest.approx(a["median_ms"] / b["median_ms"])
    att = [r for r in recs if r["part"] in ("core", "mha")]
    assert {r["T"] for r in att} == {16} and {r["mode"] for r in att} == {"fwd", "fwd+bwd"}
    for r in att:
        assert r["status"] == "ok", r
        if r["impl"] != "torch":
            assert r["ratio_vs_torch"] > 0
        if r["mode"] == "fwd" and r["impl"] != "torch":
            assert r["max_abs_diff_vs_torch"] < 1e-4  # the same attention on both sides
    assert (tmp_path / "transformer_e2e.png").stat().st_size > 0


def test_transformer_e2e_without_torch_skips_its_rows(tmp_path, monkeypatch):
    from benchmarks import transformer_e2e

    monkeypatch.setattr(transformer_e2e, "TORCH_MODULE", "torch_missing_for_this_test")
    transformer_e2e.main(
        ["--quick", "--out", str(tmp_path), "--quiet", "--precisions", "fp32", "--lengths", "16"]
    )
    recs = json.loads((tmp_path / "transformer_e2e.json").read_text())["records"]
    torch_rows = [r for r in recs if r["impl"] == "torch"]
    assert [r["status"] for r in torch_rows] == ["skipped"]
    assert all(r["status"] == "ok" for r in recs if r["impl"] != "torch")


# ----------------------------------------------------------------------------- attention_products


def test_attention_products_measures_every_core_and_one_core(tmp_path):
    import os

    from benchmarks import attention_products as ap

    out = ap.main(["--quick", "--out", str(tmp_path)])
    recs = out["records"]
    cores = len(os.sched_getaffinity(0))
    has_torch = ap.module_available("torch")
    for product, (eq, shapes) in ap.PRODUCTS.items():
        # the FLOPs every record is divided by are those of this product's einsum:
        # one multiply-add for each combination of its indices
        sizes = {}
        for letters, shape in zip(eq.split("->")[0].split(","), shapes(8, 16, 4), strict=True):
            sizes.update(zip(letters, shape, strict=True))
        assert ap._flops(8, 16, 4) == 2 * int(np.prod(list(sizes.values())))
        for want_cores in {cores, 1}:
            got = {
                r["impl"]: r for r in recs if r["product"] == product and r["cores"] == want_cores
            }
            assert got["xla"]["gflops"] > 0 and got["xla"]["median_ms"] > 0
            if has_torch:
                assert got["torch"]["gflops"] > 0
            else:
                assert got["torch"]["status"] == "skipped"
    if cores > 1:  # one row per product and contender, GFLOP/s on all cores over one core
        assert {(r["product"], r["impl"]) for r in out["speedups"]} >= {
            (p, "xla") for p in ap.PRODUCTS
        }
        for r in out["speedups"]:
            assert r["all_cores_over_one"] == pytest.approx(
                r[f"gflops_{cores}_cores"] / r["gflops_1_core"]
            )
    for name in ("attention_products.json", "attention_products.md", "attention_products.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_attention_products_without_torch_skips_its_rows(tmp_path, monkeypatch):
    from benchmarks import attention_products as ap

    monkeypatch.setattr(ap, "module_available", lambda name: False)
    out = ap.main(["--quick", "--no-one-core", "--out", str(tmp_path)])
    torch_rows = [r for r in out["records"] if r["impl"] == "torch"]
    assert len(torch_rows) == len(ap.PRODUCTS)
    assert all(r["status"] == "skipped" and "torch" in r["reason"] for r in torch_rows)
    assert out["speedups"] == []


def test_eager_calls_times_each_function_eagerly_and_jitted_in_fresh_processes(tmp_path):
    from benchmarks import eager_calls as ec

    out = ec.main(["--quick", "--out", str(tmp_path)])
    recs = {r["function"]: r for r in out["records"]}
    assert set(recs) == {"dot_product_attention"}
    for r in recs.values():
        assert r["eager_first_s"] > 0 and r["jit_first_s"] > 0 and r["jit_again_ms"] > 0
        assert r["first_eager_over_jit"] == pytest.approx(r["eager_first_s"] / r["jit_first_s"])
        # a fresh process compiles at least the call's program; eagerly, one program and
        # not the op-by-op tens (20 for dot_product_attention before)
        assert 1 <= r["jit_programs"] and 1 <= r["eager_programs"] <= 4
    for name in ("eager_calls.json", "eager_calls.md"):
        assert (tmp_path / name).stat().st_size > 0
    # every function of the full run builds its call
    import jax

    for name, build in ec._calls().items():
        fn, args = build()
        assert jax.eval_shape(fn, *args) is not None, name


def test_host_memory_times_each_policy_in_its_own_process(tmp_path):
    from benchmarks import host_memory as hm

    out = hm.main(["--quick", "--quiet", "--out", str(tmp_path)])
    (rec,) = out["records"]
    assert rec["status"] == "ok", rec
    for p in hm.POLICIES:
        assert rec[f"{p}_ms"] > 0 and rec[f"{p}_faults"] >= 0 and rec[f"{p}_sys_ms"] >= 0
    assert rec["keep_over_system"] == pytest.approx(rec["keep_ms"] / rec["system_ms"])
    for name in ("host_memory.json", "host_memory.md", "host_memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    # a child that did not get the policy it was asked for is an error, not a figure
    runs = {p: [{"step_ms": 1.0, "faults": 0, "sys_ms": 0.0, "temp_mb": 1.0,
                 "state": {"policy": "system", "reason": "JAXSEQ_HOST_MEMORY=system"}}]
            for p in hm.POLICIES}  # fmt: skip
    assert hm._record("w", runs)["status"] == "error"
    # every workload of the full run is listed (built only in its child)
    assert len(hm._workloads(quick=False)) == 6
