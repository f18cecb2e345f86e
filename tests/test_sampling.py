import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import decoding as sampling
from jaxseq import models


@pytest.fixture
def setup(key):
    lm = models.char_lm(9, num_layers=1, hidden_size=8, embedding_size=4)
    params = lm.init(key)
    params = params._replace(head=params.head._replace(w=params.head.w * 4))  # peaky
    return lm, params


def _greedy_reference(lm, params, prime, n):
    toks = list(prime)
    out = []
    for _ in range(n):
        _, logits = lm.apply(params, None, jnp.array(toks)[:, None])
        nxt = int(jnp.argmax(logits[-1, 0]))
        toks.append(nxt)
        out.append(nxt)
    return out


def test_greedy_matches_a_step_by_step_reference_and_top1(setup, key):
    lm, params = setup
    prime = np.array([1, 4, 2], np.int32)
    got = sampling.sample(key, lm, params, prime[:, None], 6, greedy=True)
    assert got.shape == (6, 1) and got.dtype == jnp.int32
    assert got[:, 0].tolist() == _greedy_reference(lm, params, prime, 6)
    top1 = sampling.sample(jax.random.key(5), lm, params, prime[:, None], 6, top_k=1)
    assert top1[:, 0].tolist() == got[:, 0].tolist()


def test_sample_draws_each_token_with_the_documented_key(setup):
    """Temperature/top-k sampling equals a Python loop that reruns the model on the whole
    prefix and draws token 0 with k0 and token i with split(rest, N)[i - 1]."""
    lm, params = setup
    prime = np.array([[1, 4], [2, 0], [7, 7]], np.int32)  # [P=3, B=2]
    key = jax.random.key(3)
    got = sampling.sample(key, lm, params, prime, 6, temperature=1.7, top_k=5)
    k0, rest = jax.random.split(key)
    keys = [k0] + list(jax.random.split(rest, 6)[:-1])
    toks = prime
    for i in range(6):
        _, logits = lm.apply(params, None, jnp.asarray(toks))
        nxt = sampling.sample_logits(keys[i], logits[-1], temperature=1.7, top_k=5)
        toks = np.concatenate([toks, np.asarray(nxt)[None]])
    np.testing.assert_array_equal(got, toks[3:])
    assert len(set(np.asarray(got).ravel().tolist())) > 2  # really sampled


def test_generate_is_the_one_loop():
    """generate over a known step function: greedy feeds back its argmax, aux is stacked in
    the order of the tokens it chose, and a key is required unless greedy."""
    nxt = jnp.array([2, 0, 3, 1])  # token t -> the favoured next token
    table = jax.nn.one_hot(nxt, 4) * 5.0

    def step(count, t):
        return count + 1, (table[t], t * 10)

    first = (table[jnp.array([0, 3])], jnp.array([-1, -1]))
    toks, aux = sampling.generate(None, step, 0, first, 4, greedy=True, has_aux=True)
    want = [[2, 1], [3, 0], [1, 2], [0, 3]]
    assert toks.tolist() == want
    assert aux.tolist() == [[-1, -1], [20, 10], [30, 0], [10, 20]]
    toks_only = sampling.generate(None, lambda c, t: (c, table[t]), (), first[0], 4, greedy=True)
    assert toks_only.tolist() == want
    with pytest.raises(TypeError, match="^key: expected a jax.random key"):
        sampling.generate(None, lambda c, t: (c, table[t]), (), first[0], 4)
    with pytest.raises(ValueError, match="^length: expected a positive int"):
        sampling.generate(None, lambda c, t: (c, table[t]), (), first[0], 0, greedy=True)
    with pytest.raises(TypeError, match="^logits: expected a floating dtype"):
        sampling.generate(None, lambda c, t: (c, table[t]), (), jnp.array([1]), 2, greedy=True)


def test_top_k_and_temperature(setup, key):
    lm, params = setup
    prime = jnp.array([[3, 3, 3, 3]], jnp.int32).T.repeat(64, axis=1)  # [P=4, B=64]
    toks = sampling.sample(key, lm, params, prime, 1, top_k=2)
    _, logits = lm.apply(params, None, prime[:, :1])
    allowed = set(np.argsort(np.asarray(logits[-1, 0]))[-2:].tolist())
    assert set(np.asarray(toks).ravel().tolist()) <= allowed
    hot = sampling.sample(key, lm, params, prime, 1, temperature=100.0)
    assert len(set(np.asarray(hot).ravel().tolist())) > 3  # near-uniform at high temperature
    cold = sampling.sample(key, lm, params, prime, 1, temperature=1e-3)
    assert set(np.asarray(cold).ravel().tolist()) == {int(jnp.argmax(logits[-1, 0]))}


def test_sample_logits_masks_outside_top_k(key):
    logits = jnp.array([[0.0, 5.0, 4.9, -1.0]])
    draws = jax.vmap(lambda k: sampling.sample_logits(k, logits, top_k=2))(
        jax.random.split(key, 200)
    )
    assert set(np.asarray(draws).ravel().tolist()) == {1, 2}


def test_bad_arguments(setup, key):
    lm, params = setup
    prime = jnp.array([1, 2], jnp.int32)
    with pytest.raises(ValueError, match="temperature: expected a positive number"):
        sampling.sample(key, lm, params, prime, 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k: expected at most vocab_size=9"):
        sampling.sample(key, lm, params, prime, 3, top_k=10)
    with pytest.raises(ValueError, match="prime: expected at least one"):
        sampling.sample(key, lm, params, jnp.zeros((0,), jnp.int32), 3)
    with pytest.raises(ValueError, match="length: expected a positive int"):
        sampling.sample(key, lm, params, prime, 0)
    with pytest.raises(TypeError, match="^key: expected a jax.random key"):
        sampling.sample(lm, params, key, prime, 3)  # the key goes first
