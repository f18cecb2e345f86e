"""Beam search against an exhaustive search written here in NumPy float64, and against
greedy decoding (beam_size=1)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import decoding, models

V, N, H, END = 4, 4, 5, 0


@pytest.fixture(scope="module")
def toy():
    """A tiny recurrent scorer whose next-token logits depend on the whole prefix."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(H, H)) * 0.9
    e = rng.normal(size=(V, H)) * 1.2
    u = rng.normal(size=(H, V)) * 1.5
    h0 = rng.normal(size=(2, H))  # B=2
    return w, e, u, h0


def _jax_step(w, e, u):
    w, e, u = (jnp.asarray(a, jnp.float32) for a in (w, e, u))

    def step(h, tok):
        h = jnp.tanh(h @ w + e[tok])
        return h, h @ u

    return step


def _log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _exhaustive(w, e, u, h0, alpha):
    """Every hypothesis (ended by END at any position, or N tokens long), best first,
    as (score, tokens, log_prob): float64, no pruning."""
    out = []

    def walk(h, prefix, logp):
        lp = _log_softmax(h @ u)
        for tok in range(V):
            seq, total = prefix + [tok], logp + lp[tok]
            if tok == END or len(seq) == N:
                out.append((total / ((5 + len(seq)) / 6) ** alpha, seq, total))
            else:
                walk(np.tanh(h @ w + e[tok]), seq, total)

    walk(h0, [], 0.0)
    return sorted(out, key=lambda r: -r[0])


def test_unpruned_beam_equals_the_exhaustive_ranking(toy):
    """With K = V**(N-1) nothing is pruned: the K returned hypotheses are the exhaustive
    top K, in order, with their scores, log-probabilities and lengths; alpha is traced
    (one compilation); a narrow beam returns consistent scores no better than the best."""
    w, e, u, h0 = toy
    step = _jax_step(w, e, u)
    h = jnp.asarray(h0, jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)  # alpha is traced: one compilation for both values
    def run(alpha):
        res_all = decoding.beam_search(
            step, h, h @ jnp.asarray(u, jnp.float32), N, beam_size=V ** (N - 1), end_id=END,
            alpha=alpha,
        )  # fmt: skip
        res_3 = decoding.beam_search(
            step, h, h @ jnp.asarray(u, jnp.float32), N, beam_size=3, end_id=END, alpha=alpha
        )
        return res_all, res_3

    winners = set()
    for alpha in (0.0, 1.5):
        res, narrow = run(jnp.float32(alpha))
        for b in range(2):
            ref = _exhaustive(w, e, u, h0[b], alpha)[: V ** (N - 1)]
            toks = np.asarray(res.tokens[:, b]).T  # [K, N]
            lens = np.asarray(res.lengths[b])
            got = [toks[j, : lens[j]].tolist() for j in range(len(ref))]
            assert got == [r[1] for r in ref], (alpha, b)
            np.testing.assert_allclose(res.scores[b], [r[0] for r in ref], rtol=1e-5)
            np.testing.assert_allclose(res.log_probs[b], [r[2] for r in ref], rtol=1e-5)
            assert np.all(toks[np.arange(N)[None, :] >= lens[:, None]] == END)  # end-filled
            winners.add((b, tuple(got[0])))
            # narrow beam: its scores are those of its sequences, sorted, below the best
            table = {tuple(r[1]): r[0] for r in _exhaustive(w, e, u, h0[b], alpha)}
            ntoks, nlens = np.asarray(narrow.tokens[:, b]).T, np.asarray(narrow.lengths[b])
            want = [table[tuple(ntoks[j, : nlens[j]].tolist())] for j in range(3)]
            np.testing.assert_allclose(narrow.scores[b], want, rtol=1e-5)
            assert np.all(np.diff(np.asarray(narrow.scores[b])) <= 0)
            assert narrow.scores[b, 0] <= ref[0][0] + 1e-5
    assert len(winners) == 3  # alpha changes a winner: normalisation is really applied


def test_beam_size_one_is_greedy(toy):
    """K=1: generate(greedy) cut after its first end token (whatever alpha); without an end
    token, the full greedy sequence."""
    w, e, u, h0 = toy
    step = _jax_step(w, e, u)
    h = jnp.asarray(h0, jnp.float32)
    first = h @ jnp.asarray(u, jnp.float32)
    n = 8

    @jax.jit
    def run(h, first):
        greedy = decoding.generate(None, step, h, first, n, greedy=True)  # [N, B]
        res = decoding.beam_search(step, h, first, n, beam_size=1, end_id=END, alpha=0.7)
        return greedy, res, decoding.beam_search(step, h, first, n, beam_size=1)

    greedy, res, plain = run(h, first)
    greedy = np.asarray(greedy)
    for b in range(2):
        g = greedy[:, b].tolist()
        cut = g[: g.index(END) + 1] if END in g else g
        assert int(res.lengths[b, 0]) == len(cut)
        assert np.asarray(res.tokens[: len(cut), b, 0]).tolist() == cut
        assert np.asarray(plain.tokens[:, b, 0]).tolist() == g
    assert any(END in greedy[:, b].tolist()[:-1] for b in range(2))  # an end really cut


def test_models_beam_size_one_equals_their_greedy_decoding(key):
    """beam_decode (encoder-decoder, under jit) and lm_beam_search (language model) with
    K=1 equal greedy_decode and sample(greedy=True)."""
    s2s = models.Seq2SeqAttention(
        6, 5, embedding_size=3, hidden_size=4, attention_size=3, bidirectional=False
    )
    params = s2s.init(key)
    src = jnp.array([[1, 2, 3], [4, 5, 1], [2, 0, 0], [3, 0, 0]])  # [S=4, B=3]
    src_len = jnp.array([4, 2, 3])

    @jax.jit
    def s2s_both(p):
        kw = dict(bos_id=1, src_lengths=src_len)
        toks, _ = decoding.greedy_decode(s2s, p, src, 6, **kw)
        return toks, decoding.beam_decode(s2s, p, src, 6, end_id=None, beam_size=1, **kw)

    toks, one = s2s_both(params)
    np.testing.assert_array_equal(one.tokens[:, :, 0], toks)

    lm = models.char_lm(7, num_layers=1, hidden_size=6, embedding_size=3)
    prime = jnp.array([[1, 4], [2, 6]])

    @jax.jit
    def lm_both(p):
        want = decoding.sample(key, lm, p, prime, 5, greedy=True)
        return want, decoding.lm_beam_search(lm, p, prime, 5, beam_size=1)

    want, got = lm_both(lm.init(key))
    np.testing.assert_array_equal(got.tokens[:, :, 0], want)


def test_bad_arguments(toy):
    w, e, u, h0 = toy
    step = _jax_step(w, e, u)
    h = jnp.asarray(h0, jnp.float32)
    first = h @ jnp.asarray(u, jnp.float32)
    with pytest.raises(ValueError, match="^beam_size: expected a positive int, got 0"):
        decoding.beam_search(step, h, first, 3, beam_size=0)
    with pytest.raises(ValueError, match=r"^end_id: expected None or a token id in \[0, 4\)"):
        decoding.beam_search(step, h, first, 3, beam_size=2, end_id=4)
    with pytest.raises(ValueError, match="^alpha: expected a number >= 0, got -1"):
        decoding.beam_search(step, h, first, 3, beam_size=2, alpha=-1)
    with pytest.raises(ValueError, match=r"^logits: expected rank 2 \[B, V\]"):
        decoding.beam_search(step, h, first[0], 3, beam_size=2)
    with pytest.raises(ValueError, match=r"^carry: expected the batch B=2 of logits"):
        decoding.beam_search(step, h[:1], first, 3, beam_size=2)
    with pytest.raises(ValueError, match=r"^step: expected logits of shape \[B\*K=4, V=4\]"):
        jax.jit(
            lambda h, f: decoding.beam_search(
                lambda c, t: (c, jnp.zeros((1, 4))), h, f, 3, beam_size=2
            )
        )(h, first)
    with pytest.raises(TypeError, match="^step: expected a function"):
        decoding.beam_search(None, h, first, 3, beam_size=2)


def test_greedy_decode_end_id_pads_as_beam_decode(key):
    """greedy_decode(end_id=e): the greedy tokens up to the first e, then e (what
    beam_decode(beam_size=1, end_id=e) returns), attention weights zero after the end;
    under jit too."""
    s2s = models.Seq2SeqAttention(
        6, 5, embedding_size=3, hidden_size=4, attention_size=3, bidirectional=False
    )
    params = s2s.init(jax.random.key(3))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)  # varied greedy outputs
    src = jnp.array([[1, 2, 3], [4, 5, 1], [2, 0, 0], [3, 0, 0]])  # [S=4, B=3]
    kw = dict(bos_id=1, src_lengths=jnp.array([4, 2, 3]))
    n = 7
    plain, w_plain = decoding.greedy_decode(s2s, params, src, n, **kw)
    plain = np.asarray(plain)
    # an end token that some row emits early and is followed by something else
    end = next(
        int(plain[t, b])
        for t in range(n - 1)
        for b in range(3)
        if np.any(plain[t + 1 :, b] != plain[t, b])
    )
    toks, w = jax.jit(lambda p: decoding.greedy_decode(s2s, p, src, n, end_id=end, **kw))(params)
    beam = decoding.beam_decode(s2s, params, src, n, end_id=end, beam_size=1, **kw)
    np.testing.assert_array_equal(toks, beam.tokens[:, :, 0])
    cut = False
    for b in range(3):
        g = plain[:, b].tolist()
        stop = g.index(end) + 1 if end in g else n
        cut |= stop < n and g[stop:] != [end] * (n - stop)
        assert toks[:, b].tolist() == g[:stop] + [end] * (n - stop)
        np.testing.assert_allclose(w[:stop, b], w_plain[:stop, b], rtol=1e-5, atol=1e-7)
        assert not np.any(np.asarray(w[stop:, b]))
    assert cut  # the end token really changed something
    with pytest.raises(ValueError, match=r"^end_id: expected None or a token id in \[0, 5\)"):
        decoding.greedy_decode(s2s, params, src, n, end_id=5, **kw)
