import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import decoding as sampling
from jaxseq import models


@pytest.fixture
def setup(key):
    lm = models.char_lm(9, layers=1, hidden=8, embed_dim=4)
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
    got = sampling.sample(lm, params, key, prime[:, None], 6, greedy=True)
    assert got.shape == (6, 1) and got.dtype == jnp.int32
    assert got[:, 0].tolist() == _greedy_reference(lm, params, prime, 6)
    top1 = sampling.sample(lm, params, jax.random.key(5), prime[:, None], 6, top_k=1)
    assert top1[:, 0].tolist() == got[:, 0].tolist()


def test_top_k_and_temperature(setup, key):
    lm, params = setup
    prime = jnp.array([[3, 3, 3, 3]], jnp.int32).T.repeat(64, axis=1)  # [P=4, B=64]
    toks = sampling.sample(lm, params, key, prime, 1, top_k=2)
    _, logits = lm.apply(params, None, prime[:, :1])
    allowed = set(np.argsort(np.asarray(logits[-1, 0]))[-2:].tolist())
    assert set(np.asarray(toks).ravel().tolist()) <= allowed
    hot = sampling.sample(lm, params, key, prime, 1, temperature=100.0)
    assert len(set(np.asarray(hot).ravel().tolist())) > 3  # near-uniform at high temperature
    cold = sampling.sample(lm, params, key, prime, 1, temperature=1e-3)
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
        sampling.sample(lm, params, key, prime, 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k: expected at most vocab_size=9"):
        sampling.sample(lm, params, key, prime, 3, top_k=10)
    with pytest.raises(ValueError, match="prime: expected at least one"):
        sampling.sample(lm, params, key, jnp.zeros((0,), jnp.int32), 3)
    with pytest.raises(ValueError, match="length: expected a positive int"):
        sampling.sample(lm, params, key, prime, 0)
