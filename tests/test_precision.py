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
        ops = re.findall(r"dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
        return [(a.rsplit("x", 1)[-1][:-1], b.rsplit("x", 1)[-1][:-1]) for a, b in ops]

    bf16, fp32 = dot_operands("bf16"), dot_operands("fp32")
    assert len(bf16) >= 9, bf16  # 2 layers x (projection, recurrence, 3 in the backward) + head
    assert all(a == b == "bf16" for a, b in bf16), bf16
    assert all(a == b == "f32" for a, b in fp32), fp32
