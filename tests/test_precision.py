"""Mixed precision in the train step: float32 master weights, bfloat16 forward and
backward, float32 loss, gradient norm and update; a bf16 run trains as the float32 one."""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js


def test_bf16_computes_in_bfloat16_and_keeps_float32_master_state(key):
    seen = {}
    lm = js.models.char_lm(5, num_layers=1, hidden_size=4, embedding_size=3, unroll=1)
    inner = js.training.lm_loss_fn(lm)

    def loss_fn(params, carry, chunk, k):
        seen["params"] = {str(x.dtype) for x in jax.tree_util.tree_leaves(params)}
        seen["carry"] = {str(x.dtype) for x in jax.tree_util.tree_leaves(carry)}
        seen["batch"] = {f: str(getattr(chunk, f).dtype) for f in chunk._fields}
        loss, (carry, aux) = inner(params, carry, chunk, k)
        seen["loss"] = str(loss.dtype)
        return loss.astype(jnp.bfloat16), (carry, aux)  # a low-precision loss comes back float32

    opt = js.make_optimizer("adam", 1e-2)
    state = js.init_state(lm.init(key), opt, key, lm.initial_carry((2,)))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    step = js.make_train_step(loss_fn, opt, precision="bf16", donate=False)
    chunk = js.data.StreamBatcher(np.arange(40) % 5, 2, 4).at_step(0)
    new, m = step(state, chunk)

    assert seen["params"] == {"bfloat16"} and seen["carry"] == {"bfloat16"}
    assert seen["batch"] == {"inputs": "int32", "targets": "int32", "mask": "bool", "reset": "bool"}
    # the state keeps its dtypes: float32 params, optimizer moments and carry
    for tree in (new.params, new.opt_state, new.carry):
        floats = [
            x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        assert floats and {str(x.dtype) for x in floats} == {"float32"}
    assert m["loss"].dtype == jnp.float32 and m["grad_norm"].dtype == jnp.float32
    assert bool(m["finite"]) and float(m["grad_norm"]) > 0
    # and the float32 params moved by a float32 update (finer than bfloat16's spacing)
    moved = [np.asarray(a) - b for a, b in zip(jax.tree_util.tree_leaves(new.params),
                                               jax.tree_util.tree_leaves(before))]  # fmt: skip
    assert all(np.any(d != 0) for d in moved)
    w = np.asarray(new.params.head.w)
    assert np.any(w != w.astype(jnp.bfloat16).astype(np.float32))

    _, m2 = step(new, chunk)  # the same compiled step again: dtypes are stable
    assert step.traces == 1 and m2["loss"].dtype == jnp.float32


def _toy_ids():
    """A periodic token sequence with 10% of the tokens replaced at random."""
    rng = np.random.default_rng(0)
    ids = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 3, 2, 1, 5]), 400)
    noisy = rng.random(ids.shape) < 0.1
    return np.where(noisy, rng.integers(0, 8, ids.shape), ids).astype(np.int32)


def test_bf16_loss_curve_follows_float32_over_300_steps():
    lm = js.models.char_lm(8, num_layers=1, hidden_size=32, embedding_size=8, unroll=1)
    batches = js.data.StreamBatcher(_toy_ids(), 8, 16)
    curves = {}
    for precision in ("fp32", "bf16"):
        opt = js.make_optimizer("adam", 1e-2, max_norm=1.0)
        k = jax.random.key(0)
        state = js.init_state(lm.init(k), opt, k, lm.initial_carry((8,)))
        step = js.make_train_step(
            js.training.lm_loss_fn(lm), opt, chunks_per_call=50, precision=precision
        )
        losses = []
        state, _ = js.fit(
            step, state, batches, num_steps=300, progress=False,
            on_step=lambda s, r, out=losses: out.append(r["loss"]),
        )  # fmt: skip
        curves[precision] = np.array(losses).reshape(6, 50).mean(axis=1)  # 50-step means
        assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)} == {"float32"}
    f32, bf16 = curves["fp32"], curves["bf16"]
    assert f32[-1] < 0.6 * f32[0]  # it learns: ~1.09 -> ~0.47 nats
    assert bf16[-1] < 0.6 * bf16[0]
    np.testing.assert_allclose(bf16, f32, atol=0.02)  # measured: within 0.001 per window


def test_precision_is_validated_and_has_a_flag():
    opt = js.make_optimizer("sgd", 0.1)
    loss_fn = lambda p, c, b, k: (jnp.sum(p["w"]), (c, {}))  # noqa: E731
    with pytest.raises(
        ValueError, match=r"precision: expected one of \['fp32', 'bf16'\], got 'fp16'"
    ):
        js.make_train_step(loss_fn, opt, precision="fp16")
    with pytest.raises(TypeError, match="precision: expected one of"):
        js.make_train_step(loss_fn, opt, precision=16)
    p = js.training.add_precision_arg(argparse.ArgumentParser())
    assert p.parse_args([]).precision == "fp32"
    assert p.parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp16"])


def test_bf16_step_multiplies_bfloat16_operands_forward_and_backward(key):
    """Every matmul of a bf16 train step of a 2-layer LSTM LM (the fused kernels'
    forward and backward, the embedding, the head and their gradients) takes bfloat16
    operands; a float32 step has none (the check can fail)."""
    lm = js.models.char_lm(7, num_layers=2, hidden_size=8, embedding_size=4)
    opt = js.make_optimizer("adam", 1e-2)
    state = js.init_state(lm.init(key), opt, key, lm.initial_carry((2,)))
    chunk = js.data.StreamBatcher(np.arange(60) % 7, 2, 5).at_step(0)

    def dot_operands(precision):
        step = js.make_train_step(js.training.lm_loss_fn(lm), opt, precision=precision)
        text = step.lower(state, chunk).as_text() if hasattr(step, "lower") else None
        if text is None:
            text = jax.jit(lambda s, b: step(s, b)).lower(state, chunk).as_text()
        ops = re.findall(
            r"dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", text
        )
        return [tuple(x.rsplit("x", 1)[-1][:-1] for x in op) for op in ops]

    bf16, fp32 = dot_operands("bf16"), dot_operands("fp32")
    assert len(bf16) >= 9, bf16  # 2 layers x (projection, recurrence, 3 in the backward) + head
    # bf16 operands, float32 results (a bf16 result runs as a float32 product on CPU)
    assert all(k == ("bf16", "bf16", "f32") for k in bf16), bf16
    assert all(k == ("f32", "f32", "f32") for k in fp32), fp32


def _bf16(rng, shape):
    """Positive bfloat16 values in [0.5, 1.5): long sums of them drift when accumulated in bf16."""
    return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.bfloat16)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _round_bf16(a):
    return _f64(jnp.asarray(np.asarray(a, np.float32), jnp.bfloat16))


def test_a_bf16_accumulated_sum_would_fail_these_tolerances():
    """The premise of the accumulation tests below: 4096 terms near 1 summed in bfloat16
    stall far from the float64 sum (bf16 keeps 8 significant bits)."""
    terms = np.asarray(_bf16(np.random.default_rng(0), (4096,)), np.float32)
    acc = jnp.bfloat16(0)
    for v in terms:
        acc = jnp.bfloat16(float(acc) + float(v))
    assert abs(float(acc) / terms.astype(np.float64).sum() - 1) > 0.5


@pytest.mark.parametrize(
    "spec, ref, a_shape, b_shape",
    [
        ("...i,io->...o", "ni,io->no", (8, 4096), (4096, 8)),  # forward: over 4096
        ("...i,io->...o", "ni,io->no", (8, 8), (8, 4096)),  # dx = g w^T: over 4096
        ("...i,io->...o", "ni,io->no", (4096, 8), (8, 8)),  # dw = x^T g: over 4096 rows
        ("...td,dke->...kte", "ntd,dke->nkte", (2, 3, 4096), (4096, 2, 4)),  # heads' projection
        ("...td,dke->...kte", "ntd,dke->nkte", (64, 64, 8), (8, 2, 4)),  # its weight gradient
        ("...ktd,kde->...te", "nktd,kde->nte", (2, 2, 3, 4096), (2, 4096, 8)),  # output proj.
    ],
)
def test_bf16_products_accumulate_in_float32_forward_and_backward(spec, ref, a_shape, b_shape):
    """Every 16-bit product of the package (matmul_f32, einsum_acc) multiplies bfloat16
    operands and accumulates in float32, forward and backward (the cotangent rounded to
    bfloat16 first, by design): within 1% of float64 sums of the same rounded operands,
    where bfloat16 accumulation misses by more than 50% (the test above)."""
    from jaxseq._numerics import einsum_acc, matmul_f32

    rng = np.random.default_rng(1)
    a, b = _bf16(rng, a_shape), _bf16(rng, b_shape)
    if spec == "...i,io->...o":
        f = matmul_f32
    else:
        f = lambda a, b: einsum_acc(spec, a, b)  # noqa: E731
    out, vjp = jax.vjp(f, a, b)
    assert out.dtype == jnp.float32
    want = np.einsum(ref, _f64(a), _f64(b))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4)
    g = jnp.asarray(rng.uniform(0.5, 1.5, out.shape), jnp.float32)
    da, db = vjp(g)
    assert da.dtype == db.dtype == jnp.bfloat16
    sa, sb = ref.split("->")[0].split(",")
    so = ref.split("->")[1]
    gr = _round_bf16(g)
    want_a = np.einsum(f"{so},{sb}->{sa}", gr, _f64(b))
    want_b = np.einsum(f"{sa},{so}->{sb}", _f64(a), gr)
    np.testing.assert_allclose(_f64(da), want_a, rtol=1e-2)  # the result rounded to bf16
    np.testing.assert_allclose(_f64(db), want_b, rtol=1e-2)


def test_bf16_attention_scores_and_outputs_accumulate_in_float32():
    """The Transformer LM's attention core with bfloat16 inputs: weighted values over
    S=2048 keys and the values' gradient over T=2048 queries accumulate in float32
    (within 1% of float64 of the same rounded operands; bf16 accumulation of 2048 terms
    near 1 stalls at a few hundred)."""
    from jaxseq.models.transformer import _softmax_attention

    rng = np.random.default_rng(2)
    t = 2048
    q = jnp.asarray(rng.normal(0, 0.02, (1, 1, t, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(0, 0.02, (1, 1, t, 64)), jnp.bfloat16)
    v = _bf16(rng, (1, 1, t, 64))
    mask = jnp.ones((1, t, t), bool)
    out, vjp = jax.vjp(lambda q, k, v: _softmax_attention(q, k, v, mask, 0.125), q, k, v)
    s = np.einsum("td,sd->ts", _f64(q[0, 0]), _f64(k[0, 0])) * 0.125
    w = np.exp(s - s.max(-1, keepdims=True))
    w = _round_bf16(w / w.sum(-1, keepdims=True))  # rounded to v's dtype before the product
    np.testing.assert_allclose(_f64(out[0, 0]), w @ _f64(v[0, 0]), rtol=1e-2)
    g = jnp.asarray(rng.uniform(0.5, 1.5, out.shape), jnp.bfloat16)
    dv = vjp(g)[2]
    np.testing.assert_allclose(_f64(dv[0, 0]), w.T @ _f64(g[0, 0]), rtol=1e-2)


def test_bf16_transformer_step_multiplies_bfloat16_into_float32():
    """Every product of a bf16 train step of the Transformer LM, forward and backward,
    takes bfloat16 operands and returns float32: a 16-bit result would run as a float32
    product on CPU (its operands converted), twice the time."""
    lm = js.models.transformer_lm(7, num_layers=1, d_model=8, num_heads=2, max_len=4,
                                  positions="learned")  # fmt: skip
    opt = js.make_optimizer("adam", 1e-2)
    state = js.init_state(
        lm.init(jax.random.key(0)), opt, jax.random.key(1), lm.initial_carry((2,))
    )
    chunk = js.data.StreamBatcher(np.arange(60) % 7, 2, 4, reset_every_chunk=True).at_step(0)
    step = js.make_train_step(js.training.lm_loss_fn(lm), opt, precision="bf16", donate=False)
    text = jax.jit(lambda s, b: step(s, b)).lower(state, chunk).as_text()
    ops = re.findall(
        r"dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", text
    )
    kinds = [tuple(x.rsplit("x", 1)[-1][:-1] for x in op) for op in ops]
    assert len(kinds) >= 20, kinds  # projections, attention, MLP, head, and their backward
    assert all(k == ("bf16", "bf16", "f32") for k in kinds), kinds
