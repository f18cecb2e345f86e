import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
    with pytest.raises(ValueError, match=r"^temperature: expected a number >= 0"):
        sampling.sample(key, lm, params, prime, 3, temperature=-0.1)
    with pytest.raises(ValueError, match=r"^top_k: expected an int in \[1, 9\]"):
        sampling.sample(key, lm, params, prime, 3, top_k=10)
    with pytest.raises(ValueError, match="prime: expected at least one"):
        sampling.sample(key, lm, params, jnp.zeros((0,), jnp.int32), 3)
    with pytest.raises(ValueError, match="length: expected a positive int"):
        sampling.sample(key, lm, params, prime, 0)
    with pytest.raises(TypeError, match="^key: expected a jax.random key"):
        sampling.sample(lm, params, key, prime, 3)  # the key goes first


def _nucleus_reference(logits, temperature, top_k, top_p):
    """The kept set, in NumPy float64: temperature, then the top_k largest logits (ties
    with the k-th kept), then the most likely tokens, in decreasing order, until their
    renormalised probability first reaches top_p (ties with the last one kept)."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if top_p >= 1.0:
        return set(np.flatnonzero(keep).tolist()), p
    total, cutoff = 0.0, None
    for i in np.argsort(-p, kind="stable"):
        if total >= top_p:
            break
        total += p[i]
        cutoff = z[i]
    kept = keep & (z >= cutoff)
    return set(np.flatnonzero(kept).tolist()), np.where(kept, p, 0.0) / p[kept].sum()


def test_top_p_keeps_the_nucleus_of_a_numpy_reference(key):
    """Every (temperature, top_k, top_p) setting, traced through one jitted function, draws
    only within the reference nucleus and, over 400 draws, reaches every token of it that
    has a probability of at least 2% there (missed with chance < 3e-4 each)."""
    rng = np.random.default_rng(0)
    rows = [
        rng.normal(size=8) * 2.0,
        np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.0078125])),
        np.array([1.0, 3.0, 3.0, 0.0, -2.0, 3.0, 1.0, 0.5]),  # ties at the boundary
    ]
    logits = jnp.asarray(np.stack(rows), jnp.float32)  # [3, V=8]

    @jax.jit
    @chex.assert_max_traces(n=1)  # one compilation for every setting
    def draws(k, temperature, top_k, top_p):
        keys = jax.random.split(k, 400)
        return jax.vmap(
            lambda kk: sampling.sample_logits(
                kk, logits, temperature=temperature, top_k=top_k, top_p=top_p
            )
        )(keys)  # [400, 3]

    settings = [(1.0, 8, 0.5), (1.0, 8, 0.9), (0.5, 8, 0.8), (2.0, 3, 0.7), (1.0, 8, 1.0),
                (1.0, 8, 0.05), (1.0, 8, 0.74)]  # fmt: skip
    for temperature, top_k, top_p in settings:
        got = np.asarray(draws(key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))
        for r, row in enumerate(rows):
            want, probs = _nucleus_reference(row.astype(np.float32), temperature, top_k, top_p)
            seen = set(got[:, r].tolist())
            assert seen <= want, (temperature, top_k, top_p, r)
            assert set(np.flatnonzero(probs >= 0.02).tolist()) <= seen, (temperature, top_k, r)
    # the dyadic row: p=0.74 needs 0.5+0.25 (0.75); p=0.75 reaches it exactly with the same two
    assert _nucleus_reference(rows[1], 1.0, None, 0.75)[0] == {0, 1}


def test_top_p_through_sample_and_generate(setup, key):
    """sample(top_p) draws its first token as sample_logits(top_p) with the documented key; a
    tiny top_p is greedy; generate takes top_p; values outside (0, 1] are refused by name."""
    lm, params = setup
    prime = np.array([[1, 4], [2, 0]], np.int32)
    got = sampling.sample(key, lm, params, prime, 5, temperature=1.3, top_p=0.8)
    _, logits = lm.apply(params, None, jnp.asarray(prime))
    first = sampling.sample_logits(jax.random.split(key)[0], logits[-1], temperature=1.3, top_p=0.8)
    np.testing.assert_array_equal(got[0], first)
    tiny = sampling.sample(key, lm, params, prime, 5, top_p=1e-6)
    greedy = sampling.sample(key, lm, params, prime, 5, greedy=True)
    np.testing.assert_array_equal(tiny, greedy)
    assert not np.array_equal(got, greedy)  # really sampled
    table = jax.nn.one_hot(jnp.array([2, 0, 3, 1]), 4) * 5.0
    gen = sampling.generate(key, lambda c, t: (c, table[t]), (), table[jnp.array([0])], 4,
                            top_p=0.5)  # fmt: skip
    assert gen[:, 0].tolist() == [2, 3, 1, 0]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="^top_p: expected a number in \\(0, 1\\]"):
            sampling.sample(key, lm, params, prime, 3, top_p=bad)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="^top_p: expected a real number"):
            sampling.sample(key, lm, params, prime, 3, top_p=bad)
    with pytest.raises(ValueError, match="^top_p: expected a number in \\(0, 1\\], got 2"):
        sampling.sample_logits(key, jnp.zeros(4), top_p=2)


# -- settings: any scalar, traced or not; checked where concrete -------------------------


def test_temperature_of_every_scalar_type_gives_the_same_draws(setup, key):
    """Python, NumPy (float32 and float64) and JAX scalars are the same temperature for
    sample, sample_logits and generate."""
    lm, params = setup
    prime = np.array([[1, 4], [2, 0]], np.int32)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9)), jnp.float32)
    table = jax.nn.one_hot(jnp.array([2, 0, 3, 1]), 4) * 0.5

    def step(c, t):
        return c, table[t]

    def run(t, k, p):
        return (
            sampling.sample(key, lm, params, prime, 6, temperature=t, top_k=k, top_p=p),
            sampling.sample_logits(key, logits, temperature=t, top_k=k, top_p=p),
            sampling.generate(key, step, (), table[jnp.array([0, 1])], 6, temperature=t),
        )

    want = run(0.8, 4, 0.9)
    for t, k, p in [
        (np.float32(0.8), np.int32(4), np.float32(0.9)),
        (np.float64(0.8), np.int64(4), np.float64(0.9)),
        (jnp.float32(0.8), jnp.int32(4), jnp.float32(0.9)),
        (jnp.asarray(0.8), jnp.asarray(4), jnp.asarray(0.9)),
    ]:
        for got, ref in zip(run(t, k, p), want, strict=True):
            np.testing.assert_array_equal(got, ref)


def test_a_jitted_sampler_compiles_once_for_every_setting(setup, key):
    """temperature, top_k and top_p passed as arguments of a jitted sample/generate are traced:
    one trace for every setting, and each setting draws what the eager call draws."""
    lm, params = setup
    prime = jnp.array([[1, 4], [2, 0]], jnp.int32)

    @jax.jit
    @chex.assert_max_traces(n=1)  # traced settings: one compilation for all of them
    def draw(k, temperature, top_k, top_p):
        return sampling.sample(
            k, lm, params, prime, 5, temperature=temperature, top_k=top_k, top_p=top_p
        )

    for t, k, p in [(0.5, 3, 0.9), (1.0, 9, 1.0), (2.0, 1, 0.5), (0.0, 5, 0.7)]:
        got = draw(key, t, k, p)
        want = sampling.sample(key, lm, params, prime, 5, temperature=t, top_k=k, top_p=p)
        np.testing.assert_array_equal(got, want)

    table = jax.nn.one_hot(jnp.array([2, 0, 3, 1]), 4) * 0.5

    @jax.jit
    @chex.assert_max_traces(n=1)
    def gen(k, temperature):
        return sampling.generate(
            k, lambda c, t: (c, table[t]), (), table[jnp.array([0])], 4, temperature=temperature
        )

    for t in (0.3, 1.5, 0.0):  # one scalar type: jit keys on weak vs strong dtypes
        np.testing.assert_array_equal(
            gen(key, t),
            sampling.generate(
                key, lambda c, t: (c, table[t]), (), table[jnp.array([0])], 4, temperature=t
            ),
        )


def test_temperature_zero_is_argmax_concrete_and_traced(setup, key):
    """temperature=0 is greedy decoding, given as a concrete value or traced (the logits are
    never divided by zero: row 0 holds a 0 logit, which 0 / 0 would make NaN)."""
    lm, params = setup
    logits = jnp.array([[0.0, 5.0, 4.9, -1.0], [3.0, -2.0, 1.0, 7.0]])
    argmax = [1, 3]
    assert sampling.sample_logits(key, logits, temperature=0).tolist() == argmax
    assert sampling.sample_logits(key, logits, temperature=0.0, top_p=0.5).tolist() == argmax
    traced = jax.jit(lambda t: sampling.sample_logits(key, logits, temperature=t, top_k=3))
    assert traced(0.0).tolist() == argmax
    assert traced(-1.0).tolist() == argmax  # a traced value cannot be checked: greedy
    # a tiny temperature sends every logit but the largest to -inf: still the argmax, not
    # a token outside top_k
    low = jnp.array([[-200.0, -100.0, -300.0, -400.0]])
    assert sampling.sample_logits(key, low, temperature=1e-37, top_k=1).tolist() == [1]
    prime = np.array([[1, 4], [2, 0]], np.int32)
    greedy = sampling.sample(key, lm, params, prime, 6, greedy=True)
    np.testing.assert_array_equal(sampling.sample(key, lm, params, prime, 6, temperature=0), greedy)
    np.testing.assert_array_equal(
        sampling.sample(None, lm, params, prime, 6, temperature=0), greedy
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, r"^temperature: expected a number >= 0 .*, got -1\.0"),
        ({"temperature": np.float32(-0.5)}, r"^temperature: expected a number >= 0 .*-0\.5"),
        ({"temperature": float("nan")}, r"^temperature: expected a number >= 0 .*nan"),
        ({"top_k": 0}, r"^top_k: expected an int in \[1, 9\].*, got 0"),
        ({"top_k": jnp.int32(-3)}, r"^top_k: expected an int in \[1, 9\].*-3"),
        ({"top_k": 10}, r"^top_k: expected an int in \[1, 9\].*, got 10"),
        ({"top_p": 0.0}, r"^top_p: expected a number in \(0, 1\], got 0\.0"),
        ({"top_p": 1.5}, r"^top_p: expected a number in \(0, 1\], got 1\.5"),
        ({"top_p": np.float32(0.0)}, r"^top_p: expected a number in \(0, 1\]"),
    ],
)
def test_bad_concrete_settings_are_refused_by_name(setup, key, kwargs, match):
    """The same checks in sample, sample_logits and generate (V=9 in each)."""
    lm, params = setup
    prime = jnp.array([[1], [2]], jnp.int32)
    table = jnp.zeros((9, 9))
    with pytest.raises(ValueError, match=match):
        sampling.sample(key, lm, params, prime, 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        sampling.sample_logits(key, jnp.zeros((2, 9)), **kwargs)
    with pytest.raises(ValueError, match=match):
        sampling.generate(key, lambda c, t: (c, table[t]), (), table[:1], 3, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": "0.5"}, r"^temperature: expected a real number"),
        ({"temperature": True}, r"^temperature: expected a real number"),
        ({"temperature": jnp.ones(2)}, r"^temperature: expected a real number .*float32\[2\]"),
        ({"top_k": 2.0}, r"^top_k: expected an int"),
        ({"top_p": "0.5"}, r"^top_p: expected a real number"),
        ({"greedy": "yes"}, r"^greedy: expected a bool"),
    ],
)
def test_settings_that_are_not_scalars_of_the_right_kind_are_type_errors(key, kwargs, match):
    with pytest.raises(TypeError, match=match):
        sampling.sample_logits(key, jnp.zeros((2, 9)), **kwargs)


def test_sample_with_no_key_when_greedy(setup):
    """The key is unused when greedy: None is accepted there, and refused otherwise."""
    lm, params = setup
    prime = np.array([[1, 4], [2, 0]], np.int32)
    got = sampling.sample(None, lm, params, prime, 5, greedy=True)
    want = sampling.sample(jax.random.key(7), lm, params, prime, 5, greedy=True)
    np.testing.assert_array_equal(got, want)
    assert sampling.sample_logits(None, jnp.array([0.0, 2.0, 1.0]), greedy=True).tolist() == 1
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key \(None only"):
        sampling.sample(None, lm, params, prime, 5)
    with pytest.raises(TypeError, match=r"^key: expected a jax.random key \(None only"):
        sampling.sample_logits(None, jnp.array([0.0, 2.0, 1.0]))


_TRACES = []


@jax.jit
def _draw_traced(key, logits, temperature, top_k, top_p):
    _TRACES.append(1)
    return sampling.sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)


@settings(max_examples=60, deadline=None)
@given(
    logits=hnp.arrays(
        np.float32, (3, 6), elements=st.floats(-30, 30, width=32, allow_subnormal=False)
    ),  # subnormals: XLA on CPU flushes them to zero
    temperature=st.one_of(st.floats(-2.0, 4.0, width=32), st.sampled_from([1e-37, 1e-44])),
    top_k=st.integers(-3, 10),
    top_p=st.floats(-0.5, 1.5, width=32),
    seed=st.integers(0, 2**31 - 1),
)
def test_traced_settings_are_read_safely_and_compile_once(logits, temperature, top_k, top_p, seed):
    """Any traced setting, in range or not (they cannot be checked): a token among the
    clip(top_k, 1, V) largest logits; the argmax when temperature <= 0; one of the most
    likely tokens when top_p <= 0; all through one compilation."""
    got = np.asarray(
        _draw_traced(
            jax.random.key(seed), logits, np.float32(temperature), np.int32(top_k),
            np.float32(top_p),
        )
    )  # fmt: skip
    v = logits.shape[-1]
    picked = logits[np.arange(3), got]
    kth = np.sort(logits, axis=-1)[:, v - min(max(top_k, 1), v)]
    assert np.all(picked >= kth)
    if temperature <= 0:
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    if top_p <= 0:
        np.testing.assert_array_equal(picked, logits.max(axis=-1))
    assert len(_TRACES) == 1
