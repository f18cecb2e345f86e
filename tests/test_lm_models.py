"""The Transformer LM (key/value cache) and the fixed-window LM against NumPy float64
forwards written here from the documented equations."""

import chex
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
    apply = jax.jit(lm.apply)  # one compilation for every [10, 2] call from a cache
    return lm, params, tokens, apply, np.asarray(apply(params, lm.initial_carry((2,)), tokens)[1])


@pytest.fixture(scope="module")
def rotary_lm():
    return _transformer("rotary")


@pytest.fixture(scope="module")
def learned_lm():
    return _transformer("learned")


@pytest.fixture(params=["rotary", "learned"])
def tlm(request):
    return request.getfixturevalue(f"{request.param}_lm")


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
    # two chunks of 5: the cache carries the context from one to the next
    cache, chunks = lm.initial_carry((2,)), []
    for s in (0, 5):
        cache, logits = apply(params, cache, tokens[s : s + 5])
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks), full, atol=1e-5)
    assert cache.length.tolist() == [10, 10]


def test_transformer_reset_and_lengths(rotary_lm):
    lm, params, tokens, apply, full = rotary_lm
    empty = lm.initial_carry((2,))
    # stream 0 carries a whole chunk and is reset at step 5; stream 1 starts empty, 6 steps long
    after = apply(params, empty, tokens)[0]
    cache = jax.tree_util.tree_map(lambda a, e: a.at[1].set(e[1]), after, empty)
    reset = np.zeros((10, 2), bool)
    reset[5, 0] = True
    padded = tokens.copy()
    padded[6:, 1] = -100  # padding: any id, never looked up
    cache, logits = apply(params, cache, padded, reset=reset, lengths=jnp.array([10, 6]))
    _, fresh = apply(params, empty, np.roll(tokens, -5, axis=0))
    np.testing.assert_allclose(logits[5:, 0], fresh[:5, 0], atol=1e-5)  # nothing before the reset
    np.testing.assert_allclose(logits[:6, 1], full[:6, 1], atol=1e-5)
    assert cache.length.tolist() == [5, 6]
    # padded steps neither read nor wrote the cache: stream 1 goes on as if never padded
    _, nxt = apply(params, cache, np.roll(tokens, -6, axis=0))
    np.testing.assert_allclose(nxt[:4, 1], full[6:, 1], atol=1e-5)


def test_transformer_sampling_equals_greedy_rerun(rotary_lm):
    lm, params, tokens, apply, _ = rotary_lm
    ids = js.decoding.sample(jax.random.key(0), lm, params, tokens[:3], 4, greedy=True)
    seq = np.zeros((10, 2), np.int32)
    seq[:3] = tokens[:3]
    for i in range(3, 7):  # the full forward over the text so far, no cache (causal: the
        _, logits = apply(params, lm.initial_carry((2,)), seq)  # zeros after it change nothing)
        seq[i] = np.argmax(logits[i - 1], axis=-1)
    np.testing.assert_array_equal(ids, seq[3:7])


def test_transformer_errors(learned_lm):
    lm, params = learned_lm[:2]
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 11\].*max_len=12"):
        lm.apply(params, None, jnp.zeros((13, 1), jnp.int32))
    with pytest.raises(TypeError, match="carry: expected a KVCache"):
        lm.apply(params, (jnp.zeros((1, 4)),), jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(
        ValueError, match=r"carry.slots: expected shape \[2, 12\], got int32\[3, 12\]"
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
    apply = jax.jit(lm.apply)  # always called with [3, 2] chunks, reset and lengths
    full = np.full((2,), 3)
    tokens = np.random.default_rng(5).integers(0, V, size=(9, 2)).astype(np.int32)
    reset = np.zeros((9, 2), bool)
    reset[4, 1] = True  # stream 1 starts a new document at step 4
    ref = [np_window(params, tokens[:, 0], n, V), np_window(params, tokens[:, 1], n, V, (4,))]
    carry, got = lm.initial_carry((2,)), []
    for s in (0, 3, 6):  # the carry holds the last n - 1 ids across the chunks
        carry, logits = apply(
            params, carry, tokens[s : s + 3], reset=reset[s : s + 3], lengths=full
        )
        got.append(logits)
    got = np.concatenate(got)
    for b in range(2):
        np.testing.assert_allclose(got[:, b], ref[b], rtol=1e-5, atol=1e-5)
    assert carry.tolist() == [tokens[7:9, 0].tolist(), tokens[7:9, 1].tolist()]
    # one token at a time through step (up to the reset)
    step = jax.jit(lm.step)
    carry, steps = lm.initial_carry((2,)), []
    for t in range(4):
        carry, logits = step(params, carry, tokens[t])
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps), got[:4], atol=1e-5)
    # padding: steps past the length (any id) leave the carry as after the last valid step
    padded = tokens[:3].copy()
    padded[1:, 1] = -100
    no_reset = np.zeros((3, 2), bool)
    carry, _ = apply(
        params, lm.initial_carry((2,)), padded, reset=no_reset, lengths=np.array([3, 1])
    )
    assert carry.tolist() == [tokens[1:3, 0].tolist(), [V, tokens[0, 1]]]
    # a reset in the chunk forgets the carried ids before it
    carry = jnp.array([[1, 2], [1, 2]])
    carry, _ = apply(params, carry, tokens[:3], reset=reset[2:5], lengths=full)
    assert carry.tolist() == [tokens[1:3, 0].tolist(), [V, tokens[2, 1]]]
    with pytest.raises(ValueError, match=r"carry: expected shape \[1, 2\]"):
        lm.apply(params, jnp.zeros((1, 3), jnp.int32), jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens: expected values in \[0, 6\]"):
        lm.apply(params, None, jnp.full((2, 1), V, jnp.int32))


def test_window_lm_batch_major_equals_the_transposed_time_major_run():
    lm = models.window_lm(V, context=3, embedding_size=2, hidden_size=5, dropout_rate=0.2)
    params = perturb(lm.init(jax.random.key(3)), seed=6, scale=0.3)
    tokens = np.random.default_rng(7).integers(0, V, size=(6, 2, 3)).astype(np.int32)  # [T, *B]
    reset = np.zeros((6, 2, 3), bool)
    reset[2, 1, 0] = True
    lengths = np.array([[6, 4, 5], [0, 6, 1]])
    carry0 = jnp.full((2, 3, 2), 1, jnp.int32)
    k = jax.random.key(8)
    c_tm, l_tm = jax.jit(lambda p, c, x, r: lm.apply(p, c, x, reset=r, lengths=lengths, key=k))(
        params, carry0, tokens, reset
    )
    c_bm, l_bm = jax.jit(
        lambda p, c, x, r: lm.apply(p, c, x, reset=r, lengths=lengths, key=k, time_major=False)
    )(params, carry0, np.moveaxis(tokens, 0, -1), np.moveaxis(reset, 0, -1))
    assert l_bm.shape == (2, 3, 6, V)
    np.testing.assert_allclose(l_bm, jnp.moveaxis(l_tm, 0, -2), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(c_bm, c_tm)


# -- the language-model protocol ------------------------------------------------------------


def test_every_library_language_model_meets_the_protocol():
    import inspect

    lms = [
        models.char_lm(V, num_layers=1, hidden_size=4, embedding_size=3),
        models.transformer_lm(V, num_layers=1, d_model=8, num_heads=2, max_len=4),
        models.window_lm(V, context=2, embedding_size=2, hidden_size=3),
    ]
    proto = js.protocols.LanguageModel

    def params_of(f, skip_self=True):
        ps = list(inspect.signature(f).parameters.values())[1 if skip_self else 0 :]
        return [(p.name, p.kind, p.default) for p in ps]

    for lm in lms:
        assert isinstance(lm, proto), type(lm).__name__
        hash(lm)  # decoding compiles once per model: a model is hashable
        for member in ("init", "initial_carry", "apply", "check_params"):
            want = params_of(getattr(proto, member))
            got = params_of(getattr(lm, member), skip_self=False)
            # the protocol's members, in its order, kinds and defaults (where it names one);
            # a model may add keyword options after them (time_major=)
            assert [n for n, *_ in got[: len(want)]] == [n for n, *_ in want], (lm, member)
            for (_, kind, default), (_, gkind, gdefault) in zip(want, got):
                assert gkind == kind, (lm, member)
                if default is not inspect.Parameter.empty and default is not Ellipsis:
                    assert gdefault == default, (lm, member)
            assert all(p.kind == p.KEYWORD_ONLY for p in
                       inspect.signature(getattr(lm, member)).parameters.values()
                       if p.name not in {n for n, *_ in want}), (lm, member)  # fmt: skip
        params = jax.jit(lm.init)(jax.random.key(0))  # one compile, not one per operation
        apply = jax.jit(lm.apply)
        carry, logits = apply(params, lm.initial_carry((2,)), jnp.zeros((3, 2), jnp.int32))
        assert logits.shape == (3, 2, V) and logits.dtype == jnp.float32
        _, again = apply(params, None, jnp.zeros((3, 2), jnp.int32))
        np.testing.assert_allclose(again, logits, rtol=1e-6, atol=1e-6)
    assert not isinstance(js.LSTM(4), proto)
    assert not isinstance(models.tagger(3, input_size=2), proto)


def test_transformer_chunk_that_reads_no_slot_skips_the_cache_alike(learned_lm):
    """A chunk whose every stream resets at step 0 takes the attention that skips the
    cache; with one stream reading its cache the whole batch takes the full one. The
    resetting stream's logits and the gradients agree between the two."""
    lm, params, tokens, apply, _ = learned_lm
    empty = lm.initial_carry((2,))
    stale = apply(params, empty, tokens)[0]  # a full cache in both streams
    reset_all = np.zeros((10, 2), bool)
    reset_all[0] = True
    reset_one = reset_all.copy()
    reset_one[0, 1] = False  # stream 1 reads its cache: the full attention runs
    _, skip = apply(params, stale, tokens, reset=reset_all)
    _, full = apply(params, stale, tokens, reset=reset_one)
    _, fresh = apply(params, empty, tokens)
    np.testing.assert_allclose(skip, fresh, atol=1e-5)
    np.testing.assert_allclose(full[:, 0], fresh[:, 0], atol=1e-5)

    def loss(p, carry, reset):
        return jnp.sum(lm.apply(p, carry, tokens, reset=reset)[1][:, 0] ** 2)

    g_skip = jax.jit(jax.grad(loss))(params, stale, reset_all)
    g_full = jax.jit(jax.grad(loss))(params, stale, reset_one)
    chex.assert_trees_all_close(g_skip, g_full, atol=1e-4, rtol=1e-4)


def test_transformer_attention_core_backward_equals_autodiff_of_its_formula():
    """The LM's attention core (hand-written backward, weights rebuilt from the
    log-sum-exp) against autodiff of masked softmax attention, float64, with a query
    that sees no key; check_grads in both modes."""
    from jax.test_util import check_grads

    from jaxseq.models.transformer import _attention

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        q = jnp.asarray(rng.standard_normal((3, 2, 5, 4)))
        k, v = (jnp.asarray(rng.standard_normal((3, 2, 6, 4))) for _ in range(2))
        mask = rng.random((3, 5, 6)) < 0.6
        mask[0, 1] = False
        mask = jnp.asarray(mask)

        def formula(q, k, v):
            s = jnp.einsum("nktd,nksd->nkts", q, k) / 2.0
            w = jnp.where(mask[:, None], jax.nn.softmax(jnp.where(mask[:, None], s, -1e300)), 0)
            return jnp.einsum("nkts,nksd->nktd", w, v)

        def loss(f):
            return lambda *a: jnp.sum(jnp.sin(f(*a)))

        core = lambda q, k, v: _attention(q, k, v, mask)  # noqa: E731
        np.testing.assert_allclose(core(q, k, v), formula(q, k, v), atol=1e-12)
        assert np.all(np.asarray(core(q, k, v))[0, :, 1] == 0)
        got = jax.grad(loss(core), (0, 1, 2))(q, k, v)
        want = jax.grad(loss(formula), (0, 1, 2))(q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-12)
        check_grads(core, (q, k, v), order=2, modes=["rev"])
        check_grads(core, (q, k, v), order=1, modes=["fwd"])
