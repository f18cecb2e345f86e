"""Sequence parallelism: ``linear_recurrence`` and ``linear_attention`` with ``mesh`` and
``sequence_axis`` split ``T`` over a mesh axis and give what one device gives.

The multi-device cases run in one subprocess with 8 simulated CPU devices
(``chex.set_n_cpu_devices`` before JAX starts; this process already runs JAX
on one device): split over 2, 4 and 8 devices against the plain call (no
mesh), in values and gradients, forward and reverse, with a scalar and a
per-key decay, with resets and lengths on and across the devices' boundaries.
The same subprocess lowers the sharded step for two ``T`` and reports the
shapes its collectives move: they must not grow with ``T``; and runs
``js.rollout`` of MinGRU, MinLSTM, RG-LRU and a ``js.Stack`` of two with
``mesh``/``sequence_axis`` over 2 and 8 devices against the plain rollout, and
``js.fit`` of a MinGRU char LM with batches split along T (``split="time"``)
against the run without a mesh.
Two real processes (JAX's distributed runtime, gloo over localhost), one slice
of ``linear_recurrence`` each, give what one process gives.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)

_SCRIPT = textwrap.dedent(
    """
    import json, re
    import chex

    chex.set_n_cpu_devices(8)  # before JAX starts its CPU backend
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    import jaxseq as js

    assert jax.device_count() == 8, jax.devices()
    T, B, H, K, DK, DV = 32, 5, 3, 2, 3, 2
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    reset = np.zeros((T, B), bool)
    # slices of 16, 8, 4 steps: resets on boundaries (4: of 8 devices, 8: of 4 and 8,
    # 16: of all) and inside slices (6, 17)
    reset[4] = True
    reset[6, 1] = reset[8, 2] = reset[16, 0] = reset[17, 4] = True
    reset = jnp.asarray(reset)
    lengths = jnp.array([32, 4, 13, 0, 1])  # ends on a boundary, inside a slice, none, 1 step
    lr_args = (jnp.asarray(rng.uniform(0.3, 1.0, (T, B, H)), jnp.float32),
               normal(T, B, H), normal(B, H))
    w_lr, wl_lr = normal(T, B, H), normal(B, H)
    qkv = (normal(T, B, K, DK), normal(T, B, K, DK), normal(T, B, K, DV))
    decays = {"scalar": -jax.nn.softplus(normal(T, B, K)),
              "key": -jax.nn.softplus(normal(T, B, K, DK)), "none": None}
    s0 = normal(B, K, DK, DV)
    w_la, ws_la = normal(T, B, K, DV), normal(B, K, DK, DV)

    def lr_loss(a, b, h0, **kw):
        h_last, hs = js.linear_recurrence(a, b, h0, reset=reset, lengths=lengths, **kw)
        return jnp.sum(hs * w_lr) + jnp.sum(h_last * wl_lr), (h_last, hs)

    def la_loss(q, k, v, g, s, **kw):
        state, ys = js.recurrent.linear_attention(
            q, k, v, g, initial_state=s, reset=reset, lengths=lengths, **kw)
        return jnp.sum(ys * w_la) + jnp.sum(state * ws_la), (state, ys)

    def run(loss, args, **kw):
        argnums = tuple(i for i, x in enumerate(args) if x is not None)
        f = jax.jit(jax.value_and_grad(lambda *a: loss(*a, **kw), argnums, has_aux=True))
        (_, outs), grads = f(*args)
        return [np.asarray(x) for x in (*outs, *grads)]

    def compare(sharded, plain):
        return {"max_abs_err": max(float(np.max(np.abs(s - p))) for s, p in zip(sharded, plain)),
                "scale": max(float(np.max(np.abs(p))) for p in plain)}

    meshes = {
        2: jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2]),  # Explicit axes
        4: Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq")),  # Auto, 2-D
        8: jax.make_mesh((8,), ("seq",), (AxisType.Auto,)),
    }
    # The sharded path calls the solver in any mode alike: a few modes, the cheapest to
    # compile most often; the references are the plain scans.
    lr_modes = {2: "chunked", 4: "associative", 8: "auto"}
    la_cases = {2: [("scalar", False, "chunked"), ("key", True, "recurrent")],
                4: [("key", False, "recurrent"), ("scalar", True, "recurrent")],
                8: [("scalar", True, "auto"), ("key", False, "chunked"),
                    ("none", False, "recurrent")]}
    out = {"cases": {}}
    plain = {}
    for n, mesh in meshes.items():
        par = dict(mesh=mesh, sequence_axis="seq")
        for reverse in (False, True):
            kw = dict(reverse=reverse, mode=lr_modes[n])
            key = ("lr", reverse)
            ref = dict(reverse=reverse, mode="sequential")
            plain[key] = plain.get(key) or run(lr_loss, lr_args, **ref)
            name = f"linear_recurrence n={n} reverse={reverse} mode={kw['mode']}"
            out["cases"][name] = compare(run(lr_loss, lr_args, **kw, **par), plain[key])
        for decay, reverse, mode in la_cases[n]:
            args = (*qkv, decays[decay], s0)
            key = ("la", decay, reverse)
            ref = dict(reverse=reverse, mode="recurrent")
            plain[key] = plain.get(key) or run(la_loss, args, **ref)
            kw = dict(reverse=reverse, mode=mode, chunk=3)
            name = f"linear_attention n={n} decay={decay} reverse={reverse} mode={mode}"
            out["cases"][name] = compare(run(la_loss, args, **kw, **par), plain[key])

    with jax.set_mesh(meshes[2]):  # inside the mesh context, inputs resharded explicitly
        name = "linear_recurrence n=2 under jax.set_mesh"
        got = run(lr_loss, lr_args, mesh=meshes[2], sequence_axis="seq")
        out["cases"][name] = compare(got, plain[("lr", False)])

    try:
        js.linear_recurrence(lr_args[0][:30], lr_args[1][:30], mesh=meshes[8], sequence_axis="seq")
        out["indivisible"] = None
    except ValueError as e:
        out["indivisible"] = str(e)

    def collectives(t, fn):
        text = jax.jit(fn).lower(*fn.inputs(t)).compile().as_text()
        shapes = dict(re.findall(r"(%[\\w.-]+) = (\\w+\\[[\\d,]*\\])", text))
        found = []
        pat = r"= (\\w+\\[[\\d,]*\\])\\S* (all-gather|all-reduce|collective-permute|all-to-all|"
        pat += r"reduce-scatter)(?:-start)?\\(([^)]*)\\)"
        for result, op, operands in re.findall(pat, text):
            ins = [shapes.get(o.strip().split(" ")[-1], "?") for o in operands.split(",")]
            found.append([op, result, ins])
        return sorted(found)

    sh = NamedSharding(meshes[8], P("seq"))
    rep = NamedSharding(meshes[8], P())
    spec = lambda s, t: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh if t else rep)

    def la_step(q, k, v, g, s, lens):
        return jax.grad(lambda *a: jnp.sum(js.recurrent.linear_attention(
            *a, initial_state=s, lengths=lens, mesh=meshes[8], sequence_axis="seq")[1]),
            argnums=(0, 1, 2, 3))(q, k, v, g)
    la_step.inputs = lambda t: (spec((t, B, K, DK), 1), spec((t, B, K, DK), 1),
                                spec((t, B, K, DV), 1), spec((t, B, K, DK), 1),
                                spec((B, K, DK, DV), 0),
                                jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rep))

    def lr_step(a, b, h0, lens):
        return jax.grad(lambda *x: jnp.sum(js.linear_recurrence(
            *x, lengths=lens, reverse=True, mesh=meshes[8], sequence_axis="seq")[1] ** 2),
            argnums=(0, 1, 2))(a, b, h0)
    lr_step.inputs = lambda t: (spec((t, B, H), 1), spec((t, B, H), 1), spec((B, H), 0),
                                jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rep))

    out["hlo"] = {name: {t: collectives(t, fn) for t in (64, 256)}
                  for name, fn in (("linear_attention", la_step), ("linear_recurrence", lr_step))}
    # js.rollout of whole-sequence layers split over 2 and 8 devices (slices of 8 and 2
    # steps): resets on a boundary of both (8) and inside a slice (5), lengths ending
    # inside a slice; values and gradients w.r.t. params and inputs
    TR, BR, DR = 16, 3, 3
    xs_r, w_r = normal(TR, BR, DR), normal(TR, BR, 4)
    kw_r = dict(reset=jnp.zeros((TR, BR), bool).at[8, 0].set(True).at[5, 2].set(True),
                lengths=jnp.array([16, 11, 3]))
    layers = {
        "MinGRU": (js.MinGRU(4), False),
        "MinLSTM": (js.MinLSTM(4, candidate="tanh"), True),
        "RGLRU": (js.recurrent.RGLRU(4), False),
        "Stack": (js.Stack([js.MinGRU(4), js.recurrent.RGLRU(4)], residual=True), True),
        # the mLSTM's stabiliser combines exactly across slices (a running max)
        "MLSTM": (js.recurrent.MLSTM(4, num_heads=2, chunk=4, forget_gate="exp"), True),
    }

    def rollout_loss(params, xs, layer, reverse, **kw):
        carry, ys = js.rollout(layer, params, xs, reverse=reverse, **kw_r, **kw)
        leaves = jax.tree_util.tree_leaves(carry)
        return jnp.sum(ys * w_r) + sum(jnp.sum(c * c) for c in leaves), (carry, ys)

    def rollout_cases(params, xs, layer, reverse, ns):  # n=None: the plain rollout
        results = []
        for n in ns:
            kw = {} if n is None else dict(mesh=meshes[n], sequence_axis="seq")
            loss = lambda p, x: rollout_loss(p, x, layer, reverse, **kw)
            (_, outs), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, xs)
            results.append(jax.tree_util.tree_leaves((outs, grads)))
        return results

    out["rollout"] = {}
    f = jax.jit(rollout_cases, static_argnums=(2, 3, 4))
    for name, (layer, reverse) in layers.items():  # two programs per layer (one mesh each)
        params = layer.init(jax.random.key(0), DR)
        ref, got2 = f(params, xs_r, layer, reverse, (None, 2))
        (got8,) = f(params, xs_r, layer, reverse, (8,))
        for n, got in ((2, got2), (8, got8)):
            case = compare([np.asarray(x) for x in got], [np.asarray(x) for x in ref])
            out["rollout"][f"{name} n={n} reverse={reverse}"] = case

    # js.fit of a MinGRU char LM with batches split along T (split="time") over 2 and 8
    # devices against the run without a mesh: 4 steps over chunks of K=8 steps (slices of
    # 4 and 1), the carry crossing chunks; one chunk per call and two stacked [2, K, B]
    def fit_lm(mesh, chunks_per_call):
        sp = None if mesh is None else (mesh, "seq")
        model = js.models.char_lm(11, cell="mingru", num_layers=2, hidden_size=8,
                                  embedding_size=4, sequence_parallel=sp)
        ids = np.random.default_rng(5).integers(0, 11, 2 * 40 + 1)
        data = js.data.StreamBatcher(ids, num_streams=2, chunk_len=8, vocab_size=11)
        opt = js.make_optimizer("adam", 1e-2)
        key = jax.random.key(0)
        state = js.init_state(model.init(key), opt, key, model.initial_carry((2,)))
        step = js.make_train_step(js.lm_loss_fn(model), opt, chunks_per_call=chunks_per_call)
        losses = []
        kw = {} if mesh is None else dict(mesh=mesh, split="time")
        state, _ = js.fit(step, state, data, num_steps=4, progress=False,
                          on_step=lambda s, r: losses.append(r["loss"]), **kw)
        carry = jax.tree_util.tree_leaves(state.carry)
        return {"losses": losses, "params": [np.asarray(x).tolist() for x in
                                             jax.tree_util.tree_leaves(state.params)],
                "carry": [np.asarray(x).tolist() for x in carry],
                "carry_whole": [[x.sharding.is_fully_replicated, len(x.sharding.device_set)]
                                for x in carry]}

    out["fit"] = {}
    for per_call in (1, 2):
        out["fit"][f"plain per_call={per_call}"] = fit_lm(None, per_call)
        for n in (2, 8):
            out["fit"][f"n={n} per_call={per_call}"] = fit_lm(meshes[n], per_call)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """The subprocess's report, run once for the tests below."""
    script = tmp_path_factory.mktemp("seqpar") / "sequence_parallel.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def test_split_over_2_4_8_devices_equals_one_device_in_values_and_gradients(eight_devices):
    cases = eight_devices["cases"]
    assert len(cases) == 3 * 2 + 2 + 2 + 3 + 1  # every case ran
    for n in (2, 4, 8):
        for fn in ("linear_recurrence", "linear_attention"):
            for reverse in (False, True):
                assert any(f"{fn} n={n} " in c and f"reverse={reverse}" in c for c in cases)
    bad = {
        name: c for name, c in cases.items() if not c["max_abs_err"] <= 2e-5 * max(c["scale"], 1)
    }
    assert not bad, bad


def test_rollouts_of_linear_layers_split_over_2_and_8_devices_equal_one_device(eight_devices):
    cases = eight_devices["rollout"]
    assert len(cases) == 5 * 2, sorted(cases)
    bad = {
        name: c for name, c in cases.items() if not c["max_abs_err"] <= 2e-5 * max(c["scale"], 1)
    }
    assert not bad, bad


def test_fit_with_batches_split_along_t_equals_the_run_without_a_mesh(eight_devices):
    runs = eight_devices["fit"]
    assert len(runs) == 2 * 3, sorted(runs)
    for per_call in (1, 2):
        want = runs[f"plain per_call={per_call}"]
        assert len(want["losses"]) == 4
        for n in (2, 8):
            got = runs[f"n={n} per_call={per_call}"]
            np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
            for g, w in zip(got["params"] + got["carry"], want["params"] + want["carry"]):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            assert all(whole == [True, n] for whole in got["carry_whole"]), got["carry_whole"]


def _elements(shape: str) -> int:
    return int(np.prod([int(d) for d in shape.split("[")[1].rstrip("]").split(",") if d]))


def test_collectives_do_not_grow_with_t(eight_devices):
    # B=5 sequences; linear_recurrence: H=3; linear_attention: K=2 heads, Dk=3, Dv=2
    state = {"linear_recurrence": 5 * 3, "linear_attention": 5 * 2 * 3 * 2}
    for name, by_t in eight_devices["hlo"].items():
        short, long = by_t["64"], by_t["256"]
        assert short, f"{name}: no collective found in the sharded step"
        assert short == long, f"{name}: the collectives change with T:\n{short}\n{long}"
        ops = {op for op, _, _ in short}
        assert ops <= {"all-gather", "all-reduce", "reduce-scatter"}, ops
        for op, result, operands in short:  # a summary of each of the 8 devices at most
            assert "?" not in operands, (name, op, operands)
            assert all(_elements(s) <= 8 * state[name] for s in (result, *operands)), (name, op)


def test_t_not_a_multiple_of_the_axis_size_is_named(eight_devices):
    msg = eight_devices["indivisible"]
    assert msg is not None and "sequence_axis" in msg and "T=30" in msg and "8 devices" in msg


# ---- one device, in this process -------------------------------------------------------


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))


def test_one_device_mesh_equals_the_plain_call():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.uniform(0.5, 1.0, (6, 2, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6, 2, 3)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(6, 2, 1, 3)), jnp.bfloat16)
    g = -jnp.ones((6, 2, 1), jnp.bfloat16)
    kw = dict(reset=jnp.zeros((6, 2), bool).at[2, 1].set(True), lengths=jnp.array([6, 4]))

    @jax.jit
    def both(a, b, q, g):
        par = dict(mesh=_mesh(), sequence_axis="seq")
        lr = [js.linear_recurrence(a, b, **kw, **p) for p in (par, {})]
        la = [js.recurrent.linear_attention(q, q, q, g, **kw, **p) for p in (par, {})]
        return lr, la

    lr, la = both(a, b, q, g)
    for got, want in zip(*lr):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(*la):  # bfloat16 in, bfloat16 out
        assert got.dtype == want.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fn", ["linear_recurrence", "linear_attention"])
def test_mesh_errors_name_the_argument(fn):
    x = jnp.ones((4, 2, 3))
    call = {
        "linear_recurrence": lambda **kw: js.linear_recurrence(x, x, **kw),
        "linear_attention": lambda **kw: js.recurrent.linear_attention(x, x, x, **kw),
    }[fn]
    with pytest.raises(ValueError, match="mesh, sequence_axis: expected both"):
        call(mesh=_mesh())
    with pytest.raises(ValueError, match="mesh, sequence_axis: expected both"):
        call(sequence_axis="seq")
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh, got str"):
        call(mesh="seq", sequence_axis="seq")
    with pytest.raises(ValueError, match=r"sequence_axis: expected one of .*\['seq'\], got 'time'"):
        call(mesh=_mesh(), sequence_axis="time")


def test_numpy_inputs_and_forward_mode_on_a_one_device_mesh():
    a, b = np.full((4, 2, 1), 0.5, np.float32), np.ones((4, 2, 1), np.float32)  # [T, B, H]
    sp = dict(mesh=jax.make_mesh((1,), ("seq",)), sequence_axis="seq")  # Explicit axes
    h_last, hs = js.linear_recurrence(a, b, lengths=np.array([4, 2]), **sp)  # not jitted
    np.testing.assert_allclose(hs[:, 0, 0], [1.0, 1.5, 1.75, 1.875])
    np.testing.assert_allclose(hs[:, 1, 0], [1.0, 1.5, 0.0, 0.0])
    np.testing.assert_allclose(h_last[:, 0], [1.875, 1.5])

    @jax.jit
    def tangents(a, t):
        got = jax.jvp(lambda a: js.linear_recurrence(a, b, **sp)[1], (a,), (t,))[1]
        return got, jax.jvp(lambda a: js.linear_recurrence(a, b)[1], (a,), (t,))[1]

    got, want = tangents(a, np.ones_like(a))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_benchmark_measures_memory_and_time(tmp_path):
    from benchmarks import sequence_parallel as bench

    cfg = bench.argparse.Namespace(
        batch=1, heads=2, dk=4, dv=4, hidden=8, time_max_t=32, repeats=2, warmup=1
    )
    records = [bench.measure(f, t, 1, cfg) for f in bench.FUNCTIONS for t in (32, 64)]
    assert all(r["total_mb"] > 0 for r in records)
    assert [r.get("timed") for r in records] == [True, False, True, False]
    bench._ratios(records)
    assert all(r["mem_vs_1"] == 1 for r in records)
    bench.plot(records, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_rollout_refuses_layers_that_cannot_split_t_naming_sequence_axis():
    sp = dict(mesh=jax.make_mesh((1,), ("seq",)), sequence_axis="seq")
    xs = jnp.ones((4, 2, 3))
    for layer, why in [
        (js.LSTM(4), "not a linear recurrence"),
        (js.Stack([js.MinGRU(4), js.GRU(4)]), "GRU cannot split T"),
        (js.recurrent.SLSTM(4, num_heads=2), "SLSTM cannot split T"),
    ]:
        params = layer.init(jax.random.key(0), 3)
        with pytest.raises(ValueError, match=f"sequence_axis: .*{why}"):
            js.rollout(layer, params, xs, **sp)
    gru = js.MinGRU(4)
    params = gru.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match="sequence_axis: MinGRU .* kernel='scan'"):
        js.rollout(gru, params, xs, kernel="scan", **sp)
    mlstm = js.recurrent.MLSTM(4, num_heads=2)
    with pytest.raises(ValueError, match="sequence_axis: MLSTM .* kernel='scan'"):
        js.rollout(mlstm, mlstm.init(jax.random.key(0), 3), xs, kernel="scan", **sp)
    with pytest.raises(ValueError, match="mesh, sequence_axis: expected both"):
        js.rollout(gru, params, xs, sequence_axis="seq")
    with pytest.raises(ValueError, match=r"sequence_axis: expected one of .*\['seq'\], got 't'"):
        js.recurrent.RolloutOptions(mesh=sp["mesh"], sequence_axis="t")


def test_language_models_refuse_layers_that_cannot_split_t_naming_sequence_axis():
    sp = (jax.make_mesh((1,), ("seq",)), "seq")
    with pytest.raises(ValueError, match="sequence_axis: LSTM cannot split T"):
        js.models.char_lm(11, cell="lstm", num_layers=2, hidden_size=8, sequence_parallel=sp)
    stack = js.Stack([js.MinGRU(8), js.Bidirectional(js.GRU(4))])
    with pytest.raises(ValueError, match="sequence_axis: GRU cannot split T"):
        js.models.RecurrentLM(11, 4, stack, mesh=sp[0], sequence_axis="seq")
    with pytest.raises(ValueError, match="mesh, sequence_axis: expected both"):
        js.models.RecurrentLM(11, 4, js.Stack([js.MinGRU(8)]), sequence_axis="seq")
    with pytest.raises(TypeError, match=r"sequence_parallel: expected \(mesh, sequence_axis\)"):
        js.models.char_lm(11, cell="mingru", sequence_parallel="seq")


def test_fit_split_time_on_a_one_device_mesh_and_its_errors():
    mesh = jax.make_mesh((1,), ("seq",))
    model = js.models.char_lm(
        11, cell="minlstm", num_layers=1, hidden_size=4, embedding_size=3,
        sequence_parallel=(mesh, "seq"),
    )  # fmt: skip
    data = js.data.StreamBatcher(np.arange(41) % 11, num_streams=2, chunk_len=4)
    opt = js.make_optimizer("sgd", 0.1)
    key = jax.random.key(0)
    state = js.init_state(model.init(key), opt, key, model.initial_carry((2,)))
    step = js.make_train_step(js.lm_loss_fn(model), opt, donate=False)
    run = dict(num_steps=2, progress=False)
    state2, info = js.fit(step, state, data, mesh=mesh, split="time", **run)
    assert info["steps"] == 2 and int(state2.bad_steps) == 0
    with pytest.raises(ValueError, match=r"split: expected one of \['batch', 'time'\], got 'T'"):
        js.fit(step, state, data, mesh=mesh, split="T", **run)
    with pytest.raises(ValueError, match="split: 'time' splits batches over a mesh"):
        js.fit(step, state, data, split="time", **run)

    class PerExample:  # a field with no time axis before its batch axis
        batch_axes = {"inputs": 1, "label": 0}

        def at_step(self, step):
            return {"inputs": np.zeros((4, 2), np.int32), "label": np.zeros(2, np.int32)}

    with pytest.raises(ValueError, match="split: 'time' splits the time axis"):
        js.fit(step, state, PerExample(), mesh=mesh, split="time", **run)


def test_rollout_on_a_one_device_mesh_eager_and_batch_major():
    layer = js.Bidirectional(js.recurrent.RGLRU(3))
    params = layer.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 2))  # [B, T, D]
    sp = dict(mesh=jax.make_mesh((1,), ("seq",)), sequence_axis="seq")
    kw = dict(lengths=jnp.array([5, 3]), reset=jnp.zeros((2, 5), bool).at[0, 2].set(True))
    carry, ys = js.rollout(layer, params, xs, time_major=False, **kw, **sp)  # compiled once
    want_carry, want = js.rollout(layer, params, xs, time_major=False, **kw)
    assert ys.shape == (2, 5, 6)
    np.testing.assert_allclose(ys, want, rtol=1e-6, atol=1e-6)
    for got, ref in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(want_carry)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ---- two real processes, one slice each ------------------------------------------------

_TWO_PROCESS_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax, numpy as np
    import jaxseq as js
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    me = int(os.environ["SEQPAR_PROCESS_ID"])
    js.training.init_distributed(os.environ["SEQPAR_COORDINATOR"], 2, me,
                                 initialization_timeout=60)
    a, b, h0, reset, lengths, w = np.load(sys.argv[1]).values()
    mesh = Mesh(np.array(jax.devices()), ("seq",))  # one device in each process
    t = a.shape[0] // 2
    mine = slice(me * t, (me + 1) * t)
    put = lambda x, split: jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("seq") if split else P()), x[mine] if split else x)

    def loss(a, b, h0, reset, lengths, w):
        h_last, hs = js.linear_recurrence(a, b, h0, reset=reset, lengths=lengths,
                                          reverse=True, mesh=mesh, sequence_axis="seq")
        return (hs * w).sum() + (h_last * h_last).sum(), (h_last, hs)

    args = (put(a, True), put(b, True), put(h0, False), put(reset, True), put(lengths, False),
            put(w, True))
    (_, (h_last, hs)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(*args)
    local = lambda x: np.asarray(x.addressable_shards[0].data).tolist()
    rec = {"devices": jax.device_count(), "h_last": local(h_last), "hs": local(hs),
           "grads": [local(g) for g in grads]}
    with open(os.path.join(os.path.dirname(sys.argv[1]), f"proc{me}.json"), "w") as f:
        json.dump(rec, f)
    jax.distributed.shutdown()
    """
)


def test_two_processes_one_slice_each_equal_one_process(tmp_path):
    rng = np.random.default_rng(3)
    t, b_, h = 8, 3, 2
    data = {
        "a": rng.uniform(0.3, 1.0, (t, b_, h)).astype(np.float32),
        "b": rng.normal(size=(t, b_, h)).astype(np.float32),
        "h0": rng.normal(size=(b_, h)).astype(np.float32),
        "reset": np.zeros((t, b_), bool),
        "lengths": np.array([8, 6, 3], np.int32),  # ends in the second slice, in the first
        "w": rng.normal(size=(t, b_, h)).astype(np.float32),
    }
    data["reset"][4, 0] = data["reset"][2, 1] = True  # on the boundary, inside a slice
    np.savez(tmp_path / "data.npz", **data)
    (tmp_path / "worker.py").write_text(_TWO_PROCESS_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", SEQPAR_COORDINATOR=f"127.0.0.1:{port}")
    cmd = [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "data.npz")]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "SEQPAR_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:

        def loss(a, b, h0):
            kw = dict(reset=data["reset"], lengths=data["lengths"], reverse=True)
            h_last, hs = js.linear_recurrence(a, b, h0, **kw)
            return jnp.sum(hs * data["w"]) + jnp.sum(h_last * h_last), (h_last, hs)

        grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
        (_, (h_last, hs)), grads = grad(data["a"], data["b"], data["h0"])  # meanwhile
    finally:
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=120)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    for i in range(2):
        rec = json.loads((tmp_path / f"proc{i}.json").read_text())
        mine = slice(i * t // 2, (i + 1) * t // 2)
        assert rec["devices"] == 2
        np.testing.assert_allclose(rec["h_last"], h_last, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["hs"], hs[mine], rtol=1e-5, atol=1e-6)
        for got, want, split in zip(rec["grads"], grads, (True, True, False)):
            np.testing.assert_allclose(got, want[mine] if split else want, rtol=1e-5, atol=1e-6)
