"""The Transformer LM (key/value cache) and the fixed-window LM against NumPy float64
forwards written here from the documented equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _np_models import dense, f64, gelu_tanh, layer_norm, masked_softmax, perturb

import jaxseq as js
from jaxseq import models

# -- NumPy references ---------------------------------------------------------------------


def np_rotary(x, pos):
    """RoPE, rotate-half layout: pair (x[i], x[i + D/2]) turned by pos * 10000^(-2i/D)."""
    d = x.shape[-1]
    ang = np.asarray(pos, np.float64)[:, None] * 10000.0 ** (-2.0 * np.arange(d // 2) / d)
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_transformer(p, tokens, window, rotary):
    """Logits ``[T, V]`` of one stream: position i attends to positions i-window+1 .. i."""
    tokens = np.asarray(tokens)
    t = len(tokens)
    x = f64(p.embedding)[tokens]
    if not rotary:
        x = x + f64(p.positions)[:t]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (j <= i) & (i - j < window)
    for bp in p.blocks:
        h = layer_norm(bp.ln1, x)
        att = f64(bp.attn.b_o)
        for k in range(bp.attn.w_q.shape[1]):
            q = h @ f64(bp.attn.w_q)[:, k] + f64(bp.attn.b_q)[k]
            kk = h @ f64(bp.attn.w_k)[:, k] + f64(bp.attn.b_k)[k]
            v = h @ f64(bp.attn.w_v)[:, k] + f64(bp.attn.b_v)[k]
            if rotary:
                q, kk = np_rotary(q, np.arange(t)), np_rotary(kk, np.arange(t))
            w = masked_softmax(q @ kk.T / np.sqrt(q.shape[-1]), mask)
            att = att + (w @ v) @ f64(bp.attn.w_o)[k]
        x = x + att
        x = x + dense(bp.mlp_out, gelu_tanh(dense(bp.mlp_in, layer_norm(bp.ln2, x))))
    return dense(p.head, layer_norm(p.ln_f, x))


def np_window(p, tokens, n, vocab_size, reset_at=()):
    """Logits ``[T, V]`` of one stream; ids before the start or before a reset are ``V``."""
    out, start = [], 0
    for t in range(len(tokens)):
        if t in reset_at:
            start = t
        ids = [tokens[s] if s >= start else vocab_size for s in range(t - n + 1, t + 1)]
        x = np.concatenate([f64(p.embedding)[i] for i in ids])
        out.append(dense(p.head, np.tanh(dense(p.hidden, x))))
    return np.stack(out)


# -- Transformer --------------------------------------------------------------------------

V = 7


def _transformer(positions):
    rotary = positions == "rotary"
    # rotary: a window of 4 < T (the sliding window is exercised); learned: 12 >= T
    lm = models.transformer_lm(
        V, num_layers=2, d_model=8, num_heads=2, max_len=4 if rotary else 12,
        positions=positions, mlp_size=12,
    )  # fmt: skip
    params = perturb(lm.init(jax.random.key(0)), seed=1, scale=0.3)
    tokens = np.random.default_rng(2).integers(0, V, size=(10, 2)).astype(np.int32)  # [T, B]
    apply = jax.jit(lm.apply)
    return lm, params, tokens, apply, np.asarray(apply(params, None, tokens)[1])


@pytest.fixture(scope="module")
def rotary_lm():
    return _transformer("rotary")


@pytest.fixture(scope="module", params=["rotary", "learned"])
def tlm(request, rotary_lm):
    return rotary_lm if request.param == "rotary" else _transformer("learned")


def test_transformer_full_forward_matches_numpy(tlm):
    lm, params, tokens, _, full = tlm
    for b in range(tokens.shape[1]):
        ref = np_transformer(params, tokens[:, b], lm.max_len, lm.positions == "rotary")
        np.testing.assert_allclose(full[:, b], ref, rtol=1e-4, atol=2e-5)


def test_transformer_cached_steps_equal_full_forward(tlm):
    lm, params, tokens, apply, full = tlm
    step = jax.jit(lm.step)  # one position at a time: the cache is the only context
    cache, steps = lm.initial_carry((2,)), []
    for t in range(tokens.shape[0]):
        cache, logits = step(params, cache, tokens[t])
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps), full, atol=1e-5)
    # chunks of 3 (and the last one, 1): the cache carries the context across them
    cache, chunks = lm.initial_carry((2,)), []
    for s in range(0, tokens.shape[0], 3):
        cache, logits = apply(params, cache, tokens[s : s + 3])
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks), full, atol=1e-5)
    assert cache.length.tolist() == [10, 10]


def test_transformer_reset_and_lengths(rotary_lm):
    lm, params, tokens, apply, full = rotary_lm
    empty = lm.initial_carry((2,))
    # a reset at step 5 of a chunk after a carried prefix: steps 5.. see nothing before it
    reset = np.zeros((10, 2), bool)
    reset[5] = True
    cache, logits = apply(params, apply(params, empty, tokens)[0], tokens, reset=reset)
    _, fresh = apply(params, empty, np.roll(tokens, -5, axis=0))
    np.testing.assert_allclose(logits[5:], fresh[:5], atol=1e-5)
    assert cache.length.tolist() == [5, 5]
    # lengths: padded steps (any id) neither read nor write the cache
    padded = tokens.copy()
    padded[6:, 1] = -100
    cache, logits = apply(params, empty, padded, lengths=jnp.array([10, 6]))
    np.testing.assert_allclose(logits[:6, 1], full[:6, 1], atol=1e-5)
    assert cache.length.tolist() == [10, 6]
    # ... so going on from that cache continues stream 1 as if it had never been padded
    _, nxt = apply(params, cache, np.roll(tokens, -6, axis=0))
    np.testing.assert_allclose(nxt[:4, 1], full[6:, 1], atol=1e-5)


def test_transformer_sampling_equals_greedy_rerun(rotary_lm):
    lm, params, tokens, apply, _ = rotary_lm
    prime = tokens[:3, :1]
    ids = js.decoding.sample(jax.random.key(0), lm, params, prime, 4, greedy=True)[:, 0]
    seq = np.zeros((7, 1), np.int32)
    seq[:3] = prime
    for i in range(3, 7):  # the full forward over the text so far (causal: zeros after it)
        _, logits = apply(params, lm.initial_carry((1,)), seq)
        seq[i] = np.argmax(logits[i - 1, 0])
    assert ids.tolist() == seq[3:, 0].tolist()


def test_transformer_errors():
    lm = models.transformer_lm(
        V, num_layers=1, d_model=8, num_heads=2, max_len=4, positions="learned"
    )
    params = lm.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 3\].*max_len=4"):
        lm.apply(params, None, jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(TypeError, match="carry: expected a KVCache"):
        lm.apply(params, (jnp.zeros((1, 4)),), jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(
        ValueError, match=r"carry.slots: expected shape \[2, 4\], got int32\[3, 4\]"
    ):
        lm.apply(params, lm.initial_carry((3,)), jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="num_heads: expected a divisor of d_model=8, got 3"):
        models.transformer_lm(V, d_model=8, num_heads=3)
    with pytest.raises(ValueError, match="rotary positions need an even head size"):
        models.transformer_lm(V, d_model=6, num_heads=2)
    with pytest.raises(ValueError, match="positions: expected one of"):
        models.transformer_lm(V, positions="sinusoid")
    with pytest.raises(TypeError, match="params: expected TransformerLMParams"):
        lm.apply({"w": jnp.zeros(2)}, None, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens: expected values in \[0, 6\]"):
        lm.apply(params, None, jnp.full((2, 1), 7, jnp.int32))


# -- fixed-window LM ----------------------------------------------------------------------


def test_window_lm_matches_numpy_across_chunks_resets_and_padding():
    n = 3
    lm = models.window_lm(V, context=n, embedding_size=2, hidden_size=5)
    params = perturb(lm.init(jax.random.key(3)), seed=4, scale=0.3)
    tokens = np.random.default_rng(5).integers(0, V, size=(9, 2)).astype(np.int32)
    reset = np.zeros((9, 2), bool)
    reset[5, 1] = True  # stream 1 starts a new document at step 5
    ref = [np_window(params, tokens[:, 0], n, V), np_window(params, tokens[:, 1], n, V, (5,))]
    carry, got = None, []
    for s in range(0, 9, 4):  # chunks 4, 4, 1: the carry holds the ids across them
        carry, logits = lm.apply(params, carry, tokens[s : s + 4], reset=reset[s : s + 4])
        got.append(logits)
    got = np.concatenate(got)
    for b in range(2):
        np.testing.assert_allclose(got[:, b], ref[b], rtol=1e-5, atol=1e-5)
    assert carry.tolist() == [tokens[7:9, 0].tolist(), tokens[7:9, 1].tolist()]
    # one token at a time through step
    step = jax.jit(lm.step)
    carry, steps = lm.initial_carry((2,)), []
    for t in range(5):
        carry, logits = step(params, carry, tokens[t])
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps), got[:5], atol=1e-5)
    # padding: steps past the length leave the carry as after the last valid step
    padded = tokens[:4].copy()
    padded[1:, 1] = -100
    carry, _ = lm.apply(params, None, padded, lengths=jnp.array([4, 1]))
    assert carry.tolist() == [tokens[2:4, 0].tolist(), [V, tokens[0, 1]]]
    # a reset in the chunk forgets the carried ids
    reset = np.zeros((2, 1), bool)
    reset[1] = True
    carry, _ = lm.apply(params, jnp.array([[1, 2]]), jnp.array([[3], [4]]), reset=reset)
    assert carry.tolist() == [[V, 4]]
    with pytest.raises(ValueError, match=r"carry: expected shape \[1, 2\]"):
        lm.apply(params, jnp.zeros((1, 3), jnp.int32), jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens: expected values in \[0, 6\]"):
        lm.apply(params, None, jnp.full((2, 1), V, jnp.int32))


def test_both_train_and_sample_through_the_library():
    text = np.tile(np.arange(5), 40).astype(np.int32)  # a cycle: learnable from 1 token back
    batcher = js.data.StreamBatcher(text, 4, 8, vocab_size=5)
    for lm in (
        models.transformer_lm(5, num_layers=1, d_model=8, num_heads=2, max_len=8, dropout_rate=0.1),
        models.window_lm(5, context=2, embedding_size=3, hidden_size=8, dropout_rate=0.1),
    ):
        opt = js.make_optimizer("adam", 3e-2)
        state = js.init_state(
            lm.init(jax.random.key(0)), opt, jax.random.key(1), lm.initial_carry((4,))
        )
        step = js.make_train_step(js.lm_loss_fn(lm), opt)
        state, info = js.fit(step, state, batcher, num_steps=40, progress=False)
        assert js.evaluate_lm(lm, state.params, batcher) < 0.3, type(lm).__name__
        ids = js.decoding.sample(jax.random.key(2), lm, state.params, np.array([[0]]), 6, top_k=2)
        assert ids[:, 0].tolist() == [1, 2, 3, 4, 0, 1]
