"""Generation by ``lax.scan``: one decoding loop (greedy, temperature, top-k, top-p) for
every model that can take one step at a time.

:func:`generate` is the loop. It takes a ``step(carry, tokens) -> (carry, logits)``
function and the logits of the first token to choose; it picks a token, feeds it
back, and repeats, inside one scan, so a whole generation compiles once for a
given length. :func:`sample` runs it for a language model (after one rollout over
the priming tokens), :func:`greedy_decode` for an encoder-decoder::

    ids = js.decoding.sample(key, model, params, prime, 200, temperature=0.8, top_k=10)
    toks, weights = js.decoding.greedy_decode(s2s, params, src, 20, bos_id=1)

Keys: the first token is drawn with ``k0`` and token ``i >= 1`` with ``keys[i - 1]``,
where ``k0, rest = split(key)`` and ``keys = split(rest, N)``.

Shapes: P priming length, N generated length, B batch (any number of dims), V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "generate",
    "greedy_decode",
    "sample",
    "sample_logits",
]


def _top_p_keep(scaled, keep, top_p):
    """Nucleus of ``softmax(where(keep, scaled, -inf))``: the most likely tokens whose
    probabilities, taken in decreasing order, first reach ``top_p`` (ties with the last
    one kept too); everything when ``top_p >= 1``."""
    masked = jnp.where(keep, scaled, -jnp.inf)
    desc = -jnp.sort(-masked, axis=-1)  # [*B, V], most likely first
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    v = scaled.shape[-1]
    n = jnp.clip(jnp.sum(before < top_p, axis=-1, keepdims=True), 1, v)  # >= 1 token
    cutoff = jnp.take_along_axis(desc, n - 1, axis=-1)
    return keep & ((masked >= cutoff) | (top_p >= 1.0))


def _check_top_p(top_p) -> None:
    """A concrete ``top_p`` must be a number in ``(0, 1]``; a traced one is used as is."""
    if top_p is None or not _checks.is_concrete(top_p):
        return
    try:
        p = float(top_p)
    except (TypeError, ValueError):
        p = None
    if isinstance(top_p, bool | str) or p is None or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")


def sample_logits(key, logits, *, temperature=1.0, top_k=None, top_p=None, greedy=False):
    """Draws token ids from ``logits: [*B, V]`` -> ``int32[*B]``.

    ``greedy``: argmax. Otherwise softmax of ``logits / temperature`` in float32,
    restricted to the ``top_k`` largest logits (all when None), then to its nucleus
    (``top_p``, Holtzman et al. 2020): the most likely tokens, in decreasing order,
    until their probability (after temperature and top-k) first reaches ``top_p``;
    the most likely token is always kept, a token tied with the last kept one is
    kept too, and ``top_p=1`` (or None) keeps them all. ``temperature``, ``top_k``,
    ``top_p`` and ``greedy`` may be traced values (one compilation for all settings);
    a concrete ``top_p`` outside ``(0, 1]`` is a ``ValueError``.

    >>> logits = jnp.array([[0.0, 5.0, 4.9, -1.0]])
    >>> sample_logits(jax.random.key(0), logits, greedy=True).tolist()
    [1]
    >>> int(sample_logits(jax.random.key(0), logits, top_k=2)[0]) in (1, 2)
    True
    >>> sample_logits(jax.random.key(0), jnp.log(jnp.array([0.6, 0.3, 0.1])), top_p=0.5).tolist()
    0
    """
    _checks.check_floating("logits", logits)
    _check_top_p(top_p)
    logits = logits.astype(jnp.float32)
    if greedy is True:  # a static choice: nothing to draw
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    scaled = logits / temperature
    keep = jnp.ones(logits.shape, jnp.bool_)
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
        kth = jnp.take(jnp.sort(logits, axis=-1), v - k, axis=-1)[..., None]
        keep = logits >= kth
    if top_p is not None:
        keep = _top_p_keep(scaled, keep, jnp.asarray(top_p, jnp.float32))
    drawn = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def _check_settings(length, temperature, top_k, vocab_size, top_p=None):
    n = _checks.check_positive_int("length", length)
    _check_top_p(top_p)
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if top_k is not None:
        _checks.check_positive_int("top_k", top_k)
        if top_k > vocab_size:
            raise ValueError(f"top_k: expected at most vocab_size={vocab_size}, got {top_k}")
    return n


def _decode(step, carry, first, keys, temperature, top_k, top_p, greedy, has_aux):
    """The loop: ``first`` is ``logits`` or ``(logits, aux)``; ``keys: [N, ...]``."""
    logits, aux = first if has_aux else (first, None)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    tok = sample_logits(keys[0], logits, **settings)

    def body(state, k):
        c, t = state
        c, out = step(c, t)
        lg, a = out if has_aux else (out, None)
        nxt = sample_logits(k, lg, **settings)
        return (c, nxt), (nxt, a)

    _, (toks, auxs) = jax.lax.scan(body, (carry, tok), keys[1:])
    toks = jnp.concatenate([tok[None], toks])
    if not has_aux:
        return toks
    auxs = jax.tree_util.tree_map(lambda a0, rest: jnp.concatenate([a0[None], rest]), aux, auxs)
    return toks, auxs


def _step_keys(key, n):
    """``[k0, split(rest, N)[0], ..., split(rest, N)[N-2]]`` for ``k0, rest = split(key)``."""
    k0, rest = jax.random.split(key)
    return jnp.concatenate([k0[None], jax.random.split(rest, n)[:-1]])


def generate(
    key,
    step,
    carry,
    logits,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    has_aux: bool = False,
):
    """The decoding loop: choose a token from ``logits``, feed it to ``step``, repeat.

    Args:
      key: PRNG key (``None`` allowed when ``greedy``).
      step: ``step(carry, tokens int32[*B]) -> (carry, logits [*B, V])``, or with
        ``has_aux`` ``-> (carry, (logits, aux))`` (e.g. attention weights).
      carry: the state ``step`` starts from.
      logits: ``[*B, V]``, the scores of the first token to choose (with ``has_aux``
        the pair ``(logits, aux)`` of the step that made them).
      length: N, the number of tokens to generate (``step`` runs N - 1 times).
      temperature, top_k, top_p, greedy: as :func:`sample_logits`.
      has_aux: ``step`` also returns a pytree to stack over the generated steps.

    Returns ``int32[N, *B]`` (and with ``has_aux`` the stacked ``aux [N, ...]``,
    entry ``i`` from the step whose logits chose token ``i``).

    >>> table = jnp.eye(4)[jnp.array([1, 2, 3, 0])] * 5.0  # token t -> logits favouring t+1
    >>> step = lambda c, t: (c, table[t])
    >>> generate(None, step, (), table[jnp.array([0])], 5, greedy=True)[:, 0].tolist()
    [1, 2, 3, 0, 1]
    """
    n = _checks.check_positive_int("length", length)
    if not callable(step):
        raise TypeError(
            f"step: expected a function (carry, tokens) -> (carry, logits), got {step!r}"
        )
    first = logits[0] if has_aux else logits
    first = _checks.as_array("logits", first)
    _checks.check_floating("logits", first)
    _checks.check_min_ndim("logits", first, 1, "[*B, V]")
    if key is None:
        if not (isinstance(greedy, bool) and greedy):
            raise TypeError("key: expected a jax.random key (None only with greedy=True), got None")
        key = jax.random.key(0)  # unused: argmax draws nothing
    _checks.check_key("key", key)
    _check_top_p(top_p)
    keys = _step_keys(key, n)
    return _decode(step, carry, logits, keys, temperature, top_k, top_p, greedy, has_aux)


def sample(
    key,
    model,
    params,
    prime,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    carry=None,
):
    """Generates ``length`` tokens after ``prime`` from a language model.

    Args:
      key: PRNG key (unused when ``greedy``).
      model: a :class:`jaxseq.models.LanguageModel` (any model with ``apply(params,
        carry, tokens) -> (carry, logits)``, ``initial_carry``, ``check_params`` and
        ``vocab_size``).
      params: its params.
      prime: ``int[P, *B]`` priming tokens (P >= 1), time-major, ids in ``[0, V)``
        (``ValueError`` otherwise; under ``jax.jit`` only inside :func:`jaxseq.checked`).
      length: N, the number of tokens to generate.
      temperature: divides the logits (< 1: more conservative, > 1: more diverse).
      top_k: sample only among the k most likely tokens.
      top_p: sample only from the nucleus: the most likely tokens whose probability
        first reaches ``top_p`` in ``(0, 1]`` (see :func:`sample_logits`).
      greedy: always take the most likely token.
      carry: initial model carry (zeros when None).

    Returns:
      ``int32[N, *B]`` generated tokens (the prime is not included).

    >>> from jaxseq.models import char_lm
    >>> lm = char_lm(9, num_layers=1, hidden_size=8, embedding_size=4)
    >>> params = lm.init(jax.random.key(0))
    >>> prime = jnp.array([[1, 2], [3, 4]])  # [P, B]
    >>> ids = sample(jax.random.key(1), lm, params, prime, 5, top_k=3, top_p=0.9)
    >>> ids.shape, ids.dtype
    ((5, 2), dtype('int32'))
    """
    _checks.check_key("key", key)
    prime = _checks.as_array("prime", prime)
    _checks.check_integer("prime", prime)
    _checks.check_min_ndim("prime", prime, 1, "[P, *B]")
    if prime.shape[0] < 1:
        raise ValueError(
            f"prime: expected at least one priming token [P>=1, *B], got {_checks.describe(prime)}"
        )
    n = _check_settings(length, temperature, top_k, model.vocab_size, top_p)
    if prime.size:  # checked here, where the ids are concrete (inside the jit it is a no-op)
        v = model.vocab_size
        _checks.check_in_range("prime", prime, 0, v - 1, f" (token ids, vocab_size V={v})")
    model.check_params(params)
    if carry is None:
        carry = model.initial_carry(tuple(prime.shape[1:]))
    k = model.vocab_size if top_k is None else int(top_k)
    p = 1.0 if top_p is None else float(top_p)
    return _sample_jit(model, n)(
        params, key, prime.astype(jnp.int32), carry, jnp.float32(temperature), jnp.int32(k),
        jnp.float32(p), jnp.bool_(greedy),
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _sample_jit(model, length):
    @jax.jit
    def run(params, key, prime, carry, temperature, top_k, top_p, greedy):
        carry, logits = model.apply(params, carry, prime)

        def step(c, tok):
            c, lg = model.apply(params, c, tok[None])
            return c, lg[0]

        keys = _step_keys(key, length)
        return _decode(step, carry, logits[-1], keys, temperature, top_k, top_p, greedy, False)

    return run


def greedy_decode(model, params, src, length: int, *, bos_id: int, src_lengths=None):
    """Greedy decoding of ``length`` tokens after ``bos_id`` from an encoder-decoder.

    Args:
      model: a :class:`jaxseq.models.Seq2SeqAttention` (any model with
        ``encode(params, src, src_lengths) -> Encoded``, ``step(params, enc, carry,
        y_prev) -> (carry, logits, weights)`` and ``tgt_vocab_size``).
      params: its params.
      src: ``int[S, B]`` source tokens, time-major.
      length: N, the number of tokens to generate.
      bos_id: the token the decoder starts from.
      src_lengths: optional ``int[B]`` source lengths (default S).

    Returns ``(tokens int32[N, B], attention weights float32[N, B, S])``; cut each
    sequence at its first end-of-sequence token yourself. One scan: compiles once.

    >>> from jaxseq.models import Seq2SeqAttention
    >>> s2s = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=6, attention_size=3)
    >>> params = s2s.init(jax.random.key(0))
    >>> toks, w = greedy_decode(s2s, params, jnp.zeros((4, 2), jnp.int32), 3, bos_id=0)
    >>> toks.shape, w.shape
    ((3, 2), (3, 2, 4))
    """
    n = _checks.check_positive_int("length", length)
    if not 0 <= int(bos_id) < model.tgt_vocab_size:
        raise ValueError(f"bos_id: expected an id in [0, {model.tgt_vocab_size}), got {bos_id!r}")
    enc = model.encode(params, src, src_lengths)
    b = enc.states.shape[0]

    def step(carry, y):
        carry, logits, w = model.step(params, enc, carry, y)
        return carry, (logits, w)

    carry, first = step(enc.carry, jnp.full((b,), int(bos_id), jnp.int32))
    return generate(None, step, carry, first, n, greedy=True, has_aux=True)
