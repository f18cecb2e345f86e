"""Calls outside ``jit``: the matrix-state solvers, attention (batched, blockwise, per
example) and the Transformer LM run as one compiled program after their checks (not op
by op, which compiled tens of small programs per new shape), give what ``jax.jit`` of
the same call gives, and keep their checks on concrete values.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js

_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _count_compiles():
    seen = []

    def listen(name, duration, **kwargs):
        if name == _COMPILE:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_the_counter_sees_each_new_program():
    x = jnp.ones(3)
    with _count_compiles() as seen:
        jax.jit(lambda x: x * 3 + 1)(x)  # a new function: a program of its own
    assert len(seen) == 1


def _inputs(t, lengths=None):
    """Arguments of each call in CALLS at ``T = t`` (lengths ``[t, t - 2]`` unless given)."""
    rng = np.random.default_rng(t)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, k, v = normal(t, 2, 3, 5), normal(t, 2, 3, 5), normal(t, 2, 3, 5)
    return {
        "q": q, "k": k, "v": v, "log_decay": -jax.nn.softplus(normal(t, 2, 3)),
        "a": jnp.asarray(rng.uniform(0.2, 1.0, (t, 2, 5)), jnp.float32), "b": normal(t, 2, 5),
        "lengths": jnp.array([t, t - 2] if lengths is None else lengths),
        "q_bt": normal(2, 3, t, 5),  # [*B, T, D] for blockwise attention
        "q_btk": normal(2, t, 3, 5),  # [*B, T, K, D] for batched attention
    }  # fmt: skip


CALLS = {  # name: a call on _inputs' arguments
    "linear_attention": lambda x: js.recurrent.linear_attention(
        x["q"], x["k"], x["v"], x["log_decay"], lengths=x["lengths"]
    ),
    "mlstm_recurrence": lambda x: js.recurrent.mlstm_recurrence(
        x["q"], x["k"], x["v"], x["log_decay"], x["log_decay"], lengths=x["lengths"]
    ),
    "linear_recurrence": lambda x: js.linear_recurrence(
        x["a"], x["b"], lengths=x["lengths"], reverse=True
    ),
    "blockwise_attention": lambda x: js.blockwise_attention(
        x["q_bt"], x["q_bt"], x["q_bt"], causal=True, block_q=4, k_lengths=x["lengths"]
    ),
    "batched_dot_product_attention": lambda x: js.batched_dot_product_attention(
        x["q_btk"], x["q_btk"], x["q_btk"], causal=True, k_lengths=x["lengths"]
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_an_eager_call_compiles_one_program_and_equals_jit(name):
    fn = CALLS[name]
    args = _inputs(11)  # T=11: shapes no other test uses
    with _count_compiles() as first:
        got = fn(args)
    with _count_compiles() as again:
        fn(args)
    # the solver's program, and at most the checks' own few small ones (lengths' range)
    assert len(first) <= 4, len(first)
    assert again == []
    want = jax.jit(fn)(args)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_checks_of_concrete_values_still_raise_outside_jit(name):
    with pytest.raises(ValueError, match="lengths"):
        CALLS[name](_inputs(6, lengths=[7, 2]))  # 7 > T=6


def test_under_a_transformation_the_solver_is_traced_into_the_callers_program():
    x = _inputs(5)

    def loss(q):
        return jnp.sum(CALLS["linear_attention"](dict(x, q=q))[1] ** 2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x["q"]))
    assert "name=_solve_checked" not in jaxpr  # no program of its own inside the caller's

    def _solve_checked(x):  # how a jitted solver would show in a jaxpr
        return x * 2

    assert "name=_solve_checked" in str(jax.make_jaxpr(jax.jit(_solve_checked))(x["q"]))
    np.testing.assert_allclose(
        jax.grad(loss)(x["q"]), jax.jit(jax.grad(loss))(x["q"]), rtol=1e-5, atol=1e-6
    )


def test_a_transformer_lm_called_eagerly_compiles_once_and_still_checks_positions():
    lm = js.models.transformer_lm(11, num_layers=1, d_model=8, num_heads=2, max_len=5,
                                  positions="learned")  # fmt: skip
    params = lm.init(jax.random.key(0))
    tokens = jnp.ones((3, 2), jnp.int32)
    with _count_compiles() as first:
        cache, logits = lm.apply(params, None, tokens)
    with _count_compiles() as again:
        lm.apply(params, None, tokens)  # (op by op, its attention `cond` compiled each time)
    assert len(first) <= 10 and again == []  # its program and its checks' (121 before)
    want = jax.jit(lm.apply)(params, None, tokens)[1]
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
    cache, _ = lm.apply(params, cache, tokens[:2])  # 5 positions: the table's last is 4
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 4\]"):
        lm.apply(params, cache, tokens[:1])  # one step at position 5
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 4\]"):
        lm.apply(params, cache, tokens[:2])  # a chunk from position 5


@pytest.mark.parametrize("fn", ["multi_head_attention", "transformer_block"])
def test_per_example_attention_called_eagerly_compiles_once_and_still_checks(fn):
    key = jax.random.key(1)
    x = jax.random.normal(key, (7, 12))  # one example [T, D]
    if fn == "multi_head_attention":
        params = js.attention.MultiHeadAttention(num_heads=3, key_size=4).init(key, 12)
        call = lambda x, n: js.attention.multi_head_attention(
            params, x, causal=True, q_lengths=n, k_lengths=n, return_weights=True
        )
    else:
        params = js.attention.TransformerBlock(num_heads=3).init(key, 12)
        call = lambda x, n: js.attention.transformer_block(
            params, x, lengths=n, dropout_rate=0.5, key=key
        )
    with _count_compiles() as first:
        got = call(x, 5)
    with _count_compiles() as again:
        call(x, 5)
    assert len(first) <= 4 and again == []
    want = jax.jit(call, static_argnums=1)(x, 5)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 7\]"):
        call(x, 8)


@pytest.mark.parametrize("fn", ["dot_product_attention", "attention_weights"])
def test_one_example_dot_product_attention_called_eagerly_compiles_once(fn):
    t = 9 if fn == "dot_product_attention" else 10  # shapes of their own: nothing cached
    q = jax.random.normal(jax.random.key(2), (t, 6))
    mask = jnp.tril(jnp.ones((t, t), bool))
    if fn == "dot_product_attention":
        call = lambda q: js.dot_product_attention(q, q, q, mask, causal=True, scale=0.3)
    else:
        call = lambda q: js.attention.attention_weights(q, q, mask, causal=True, scale=0.3)
    with _count_compiles() as first:
        got = call(q)
    with _count_compiles() as again:
        call(q)
    assert len(first) <= 2 and again == []  # (attention_weights slices k for its check)
    np.testing.assert_allclose(got, jax.jit(call)(q), rtol=1e-6, atol=1e-6)
