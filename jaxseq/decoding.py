"""Generation by ``lax.scan``: one decoding loop (greedy, temperature, top-k, top-p) for
every model that can take one step at a time.

:func:`generate` is the loop. It takes a ``step(carry, tokens) -> (carry, logits)``
function and the logits of the first token to choose; it picks a token, feeds it
back, and repeats, inside one scan, so a whole generation compiles once for a
given length. :func:`sample` runs it for a language model (after one rollout over
the priming tokens), :func:`greedy_decode` for an encoder-decoder::

    ids = js.decoding.sample(key, model, params, prime, 200, temperature=0.8, top_k=10)
    toks, weights = js.decoding.greedy_decode(s2s, params, src, 20, bos_id=1, end_id=2)

Settings (``temperature``, ``top_k``, ``top_p``, ``greedy``) are scalars: Python, NumPy
or JAX, concrete or traced. Concrete ones are checked (``temperature >= 0``, 0 meaning
greedy; ``1 <= top_k <= V``; ``0 < top_p <= 1``); traced ones are the arguments of one
compiled program, so a sampler jitted over them traces once for every setting
(:func:`sample_logits` says how a traced value outside those ranges is read). With
``greedy=True`` or ``temperature=0`` the key is unused and may be None.

:func:`beam_search` keeps the K most probable prefixes over the same ``step``
contract, with length normalisation and an end token; :func:`beam_decode` runs it
for an encoder-decoder, :func:`lm_beam_search` for a language model::

    best = js.decoding.beam_decode(s2s, params, src, 20, bos_id=1, end_id=2, beam_size=4)
    best.tokens[:, :, 0]  # [N, B], the best hypothesis of each source

Keys: the first token is drawn with ``k0`` and token ``i >= 1`` with ``keys[i - 1]``,
where ``k0, rest = split(key)`` and ``keys = split(rest, N)``.

Shapes: P priming length, N generated length, B batch (any number of dims), V vocabulary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks

__all__ = [
    "BeamResult",
    "beam_decode",
    "beam_search",
    "generate",
    "greedy_decode",
    "lm_beam_search",
    "sample",
    "sample_logits",
]


def _top_p_keep(scaled, keep, top_p):
    """Nucleus of ``softmax(where(keep, scaled, min))``: the most likely tokens whose
    probabilities, taken in decreasing order, first reach ``top_p`` (ties with the last
    one kept too); everything when ``top_p >= 1``, the most likely token when ``top_p <= 0``."""
    masked = jnp.where(keep, scaled, jnp.finfo(jnp.float32).min)
    desc = -jnp.sort(-masked, axis=-1)  # [*B, V], most likely first
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    v = scaled.shape[-1]
    n = jnp.clip(jnp.sum(before < top_p, axis=-1, keepdims=True), 1, v)  # >= 1 token
    cutoff = jnp.take_along_axis(desc, n - 1, axis=-1)
    return keep & ((masked >= cutoff) | (top_p >= 1.0))


def _scalar(name, value, kind):
    """Checks that a setting is one scalar of ``kind`` ("int", "real" or "bool"): a
    Python, NumPy or JAX one, concrete or traced (``TypeError`` otherwise). Returns its
    value as a Python number when concrete, None when traced."""
    concrete = _checks.is_concrete(value)
    if concrete:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):  # ragged lists and the like
            arr = np.asarray(None)
        dtype, shape = arr.dtype, arr.shape
    else:
        dtype, shape = value.dtype, value.shape
    if kind == "bool":
        ok, what = dtype == np.bool_, "a bool"
    elif kind == "int":
        ok, what = jnp.issubdtype(dtype, jnp.integer), "an int"
    else:
        ok = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
        what = "a real number"
    if not ok or shape != ():
        got = repr(value) if not hasattr(value, "shape") else _checks.describe(value)
        raise TypeError(f"{name}: expected {what} (a Python, NumPy or JAX scalar), got {got}")
    if not concrete:
        return None
    return {"bool": bool, "int": int}.get(kind, float)(arr)


def _check_settings(temperature, top_k, top_p, greedy, vocab_size) -> bool:
    """Checks the sampling settings (types always, values where concrete) and says whether
    decoding is greedy for sure: ``greedy`` or ``temperature`` concretely True / 0."""
    t = _scalar("temperature", temperature, "real")
    if t is not None and not t >= 0.0:  # NaN too
        raise ValueError(
            f"temperature: expected a number >= 0 (0: greedy), got {_show(temperature)}"
        )
    if top_k is not None:
        k = _scalar("top_k", top_k, "int")
        if k is not None and not 1 <= k <= vocab_size:
            raise ValueError(
                f"top_k: expected an int in [1, {vocab_size}] (vocab_size V={vocab_size}), "
                f"got {_show(top_k)}"
            )
    if top_p is not None:
        p = _scalar("top_p", top_p, "real")
        if p is not None and not 0.0 < p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {_show(top_p)}")
    return _scalar("greedy", greedy, "bool") is True or t == 0.0


def _show(value):
    """A concrete scalar setting as the user would write it: ``-1.0``, ``np.float32(0.5)``."""
    return repr(value.item()) if isinstance(value, jax.Array) else repr(value)


def _key_or_placeholder(key, greedy: bool):
    """``key`` checked; None is allowed (and replaced) when the decoding is greedy for sure."""
    if key is None:
        if not greedy:
            raise TypeError(
                "key: expected a jax.random key (None only with greedy=True or "
                "temperature=0), got None"
            )
        return jax.random.key(0)  # unused: argmax draws nothing
    _checks.check_key("key", key)
    return key


def sample_logits(key, logits, *, temperature=1.0, top_k=None, top_p=None, greedy=False):
    """Draws token ids from ``logits: [*B, V]`` -> ``int32[*B]``.

    ``greedy`` or ``temperature=0``: argmax. Otherwise softmax of ``logits / temperature``
    in float32, restricted to the ``top_k`` largest logits (all when None), then to its
    nucleus (``top_p``, Holtzman et al. 2020): the most likely tokens, in decreasing
    order, until their probability (after temperature and top-k) first reaches ``top_p``;
    the most likely token is always kept, a token tied with the last kept one is kept
    too, and ``top_p=1`` (or None) keeps them all.

    Settings are scalars: Python, NumPy or JAX, concrete or traced (one compilation for
    every value when they are arguments of a jitted function). Concrete values are
    checked: ``temperature >= 0``, ``top_k`` an int in ``[1, V]``, ``top_p`` in ``(0, 1]``
    (``ValueError`` naming the argument otherwise). Traced values cannot be checked and
    are read so that nothing divides by zero or makes a NaN: a ``temperature`` below the
    smallest normal float32 (0, subnormal, negative, NaN) gives the argmax, ``top_k`` is
    clipped to ``[1, V]``, a ``top_p <= 0`` (or NaN) keeps only the most likely token and
    ``top_p >= 1`` keeps all.

    Args:
      key: PRNG key (None allowed when ``greedy=True`` or ``temperature=0``: unused).
      logits: ``[*B, V]`` scores, any floating dtype.
      temperature, top_k, top_p, greedy: as above.

    >>> logits = jnp.array([[0.0, 5.0, 4.9, -1.0]])
    >>> sample_logits(None, logits, greedy=True).tolist()
    [1]
    >>> sample_logits(None, logits, temperature=0).tolist()
    [1]
    >>> int(sample_logits(jax.random.key(0), logits, top_k=2)[0]) in (1, 2)
    True
    >>> sample_logits(jax.random.key(0), jnp.log(jnp.array([0.6, 0.3, 0.1])), top_p=0.5).tolist()
    0
    """
    logits = _checks.as_array("logits", logits)
    _checks.check_floating("logits", logits)
    _checks.check_min_ndim("logits", logits, 1, "[*B, V]")
    v = logits.shape[-1]
    static_greedy = _check_settings(temperature, top_k, top_p, greedy, v)
    key = _key_or_placeholder(key, static_greedy)
    logits = logits.astype(jnp.float32)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if static_greedy:  # nothing to draw
        return argmax
    t = jnp.asarray(temperature, jnp.float32)
    hot = t >= jnp.finfo(jnp.float32).tiny  # False for 0, subnormal, negative, NaN: argmax
    # shifted first: the most likely token stays at 0 (finite, above every masked one)
    # when a tiny temperature sends the others to -inf
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / jnp.where(hot, t, 1.0)
    keep = jnp.ones(logits.shape, jnp.bool_)
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
        kth = jnp.take(jnp.sort(logits, axis=-1), v - k, axis=-1)[..., None]
        keep = logits >= kth
    if top_p is not None:
        keep = _top_p_keep(scaled, keep, jnp.asarray(top_p, jnp.float32))
    masked = jnp.where(keep, scaled, jnp.finfo(jnp.float32).min)
    drawn = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.asarray(greedy) | ~hot, argmax, drawn)


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
      key: PRNG key (None allowed when ``greedy=True`` or ``temperature=0``: unused).
      step: ``step(carry, tokens int32[*B]) -> (carry, logits [*B, V])``, or with
        ``has_aux`` ``-> (carry, (logits, aux))`` (e.g. attention weights).
      carry: the state ``step`` starts from.
      logits: ``[*B, V]``, the scores of the first token to choose (with ``has_aux``
        the pair ``(logits, aux)`` of the step that made them).
      length: N, the number of tokens to generate (``step`` runs N - 1 times).
      temperature, top_k, top_p, greedy: as :func:`sample_logits` (scalars, concrete or
        traced; checked where concrete).
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
    static_greedy = _check_settings(temperature, top_k, top_p, greedy, first.shape[-1])
    keys = _step_keys(_key_or_placeholder(key, static_greedy), n)
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
      key: PRNG key (None allowed when ``greedy=True`` or ``temperature=0``: unused).
      model: a :class:`jaxseq.protocols.LanguageModel` (``js.RecurrentLM``,
        ``js.TransformerLM``, ``js.WindowLM`` or any model with ``apply(params,
        carry, tokens) -> (carry, logits)``, ``initial_carry``, ``check_params`` and
        ``vocab_size``).
      params: its params.
      prime: ``int[P, *B]`` priming tokens (P >= 1), time-major, ids in ``[0, V)``
        (``ValueError`` otherwise; under ``jax.jit`` only inside :func:`jaxseq.checked`).
      length: N, the number of tokens to generate.
      temperature: ``>= 0``, divides the logits (< 1: more conservative, > 1: more
        diverse; 0: greedy).
      top_k: sample only among the k most likely tokens, ``1 <= top_k <= V``.
      top_p: sample only from the nucleus: the most likely tokens whose probability
        first reaches ``top_p`` in ``(0, 1]`` (see :func:`sample_logits`).
      greedy: always take the most likely token.
      carry: initial model carry (zeros when None).

    Returns:
      ``int32[N, *B]`` generated tokens (the prime is not included).

    The settings are scalars (Python, NumPy or JAX), checked where concrete and read
    as :func:`sample_logits` reads them where traced. They are arguments of one
    compiled program: a new setting does not recompile, and a ``jax.jit`` that takes
    them as arguments traces once for all of them.

    >>> from jaxseq.models import char_lm
    >>> lm = char_lm(9, num_layers=1, hidden_size=8, embedding_size=4)
    >>> params = lm.init(jax.random.key(0))
    >>> prime = jnp.array([[1, 2], [3, 4]])  # [P, B]
    >>> ids = sample(jax.random.key(1), lm, params, prime, 5, top_k=3, top_p=0.9)
    >>> ids.shape, ids.dtype
    ((5, 2), dtype('int32'))
    >>> greedy = sample(None, lm, params, prime, 5, greedy=True)  # no key needed
    >>> bool(jnp.all(greedy == sample(None, lm, params, prime, 5, temperature=0)))
    True
    """
    if key is not None:  # first: a model passed as the key is named as such
        _checks.check_key("key", key)
    prime = _checks.as_array("prime", prime)
    _checks.check_integer("prime", prime)
    _checks.check_min_ndim("prime", prime, 1, "[P, *B]")
    if prime.shape[0] < 1:
        raise ValueError(
            f"prime: expected at least one priming token [P>=1, *B], got {_checks.describe(prime)}"
        )
    n = _checks.check_positive_int("length", length)
    v = model.vocab_size
    key = _key_or_placeholder(key, _check_settings(temperature, top_k, top_p, greedy, v))
    if prime.size:  # checked here, where the ids are concrete (inside the jit it is a no-op)
        _checks.check_in_range("prime", prime, 0, v - 1, f" (token ids, vocab_size V={v})")
    model.check_params(params)
    if carry is None:
        carry = model.initial_carry(tuple(prime.shape[1:]))
    settings = (
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(v if top_k is None else top_k, jnp.int32),
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        jnp.asarray(greedy, jnp.bool_),
    )  # arguments of one compiled program: a new setting does not recompile
    return _sample_jit(model, n)(params, key, prime.astype(jnp.int32), carry, *settings)


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


def greedy_decode(
    model, params, src, length: int, *, bos_id: int, end_id: int | None = None, src_lengths=None
):
    """Greedy decoding of ``length`` tokens after ``bos_id`` from an encoder-decoder.

    Args:
      model: a :class:`jaxseq.models.Seq2SeqAttention` (any model with
        ``encode(params, src, src_lengths) -> Encoded``, ``step(params, enc, carry,
        y_prev) -> (carry, logits, weights)`` and ``tgt_vocab_size``).
      params: its params.
      src: ``int[S, B]`` source tokens, time-major.
      length: N, the number of tokens to generate.
      bos_id: the token the decoder starts from.
      end_id: the end-of-sequence token, or None. As in :func:`beam_decode`, the
        positions after a sequence's first ``end_id`` hold ``end_id`` (and zero
        attention weights), so the result is ``beam_decode(..., beam_size=1)``'s best
        hypothesis; None: the N greedy tokens as they come.
      src_lengths: optional ``int[B]`` source lengths (default S).

    Returns ``(tokens int32[N, B], attention weights float32[N, B, S])``. One scan of
    N steps (also after every sequence has ended): compiles once.

    >>> from jaxseq.models import Seq2SeqAttention
    >>> s2s = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=6, attention_size=3)
    >>> params = s2s.init(jax.random.key(0))
    >>> src = jnp.zeros((4, 2), jnp.int32)
    >>> toks, w = greedy_decode(s2s, params, src, 3, bos_id=0)
    >>> toks.shape, w.shape
    ((3, 2), (3, 2, 4))
    >>> end = int(toks[0, 0])  # ends every sequence that starts as the first one
    >>> cut, _ = greedy_decode(s2s, params, src, 3, bos_id=0, end_id=end)
    >>> cut[:, 0].tolist() == [end] * 3
    True
    """
    n = _checks.check_positive_int("length", length)
    if not 0 <= int(bos_id) < model.tgt_vocab_size:
        raise ValueError(f"bos_id: expected an id in [0, {model.tgt_vocab_size}), got {bos_id!r}")
    end = _check_end_id(end_id, model.tgt_vocab_size)
    enc = model.encode(params, src, src_lengths)
    b = enc.states.shape[0]

    def step(carry, y):
        carry, logits, w = model.step(params, enc, carry, y)
        return carry, (logits, w)

    carry, first = step(enc.carry, jnp.full((b,), int(bos_id), jnp.int32))
    toks, weights = generate(None, step, carry, first, n, greedy=True, has_aux=True)
    if end is None:
        return toks, weights
    ended = toks == end
    after = jnp.cumsum(ended, axis=0) - ended > 0  # [N, B]: an end token came earlier
    return jnp.where(after, end, toks), jnp.where(after[..., None], 0.0, weights)


# -- beam search -------------------------------------------------------------------------


class BeamResult(NamedTuple):
    """The ``K`` best hypotheses per batch entry, best first.

    ``tokens: int32[N, B, K]`` (time-major as :func:`generate`; positions after a
    hypothesis' end token hold the end token), ``scores: float32[B, K]`` (what the
    search ranks: ``log_probs / ((5 + lengths) / 6) ** alpha``), ``log_probs:
    float32[B, K]`` (sum of the chosen tokens' log-probabilities, end token
    included), ``lengths: int32[B, K]`` (tokens up to and including the end token;
    N for a hypothesis that did not end).
    """

    tokens: jax.Array
    scores: jax.Array
    log_probs: jax.Array
    lengths: jax.Array


def _length_penalty(lengths, alpha):
    """Wu et al. (2016): ``((5 + |Y|) / 6) ** alpha``."""
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def _check_end_id(end_id, v):
    if end_id is None:
        return None
    if isinstance(end_id, bool) or not isinstance(end_id, int | np.integer) or not 0 <= end_id < v:
        raise ValueError(f"end_id: expected None or a token id in [0, {v}), got {end_id!r}")
    return int(end_id)


def _check_alpha(alpha):
    if _checks.is_concrete(alpha):
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            a = None
        if isinstance(alpha, bool | str) or a is None or not a >= 0.0:
            raise ValueError(f"alpha: expected a number >= 0, got {alpha!r}")
    return jnp.asarray(alpha, jnp.float32)


def _tile_beams(tree, k):
    """Leaves ``[B, ...]`` -> ``[B * K, ...]``, each entry repeated K times in a row."""
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), tree)


def _gather_beams(tree, parents, b, k):
    """Leaves ``[B * K, ...]``: row ``(i, j)`` becomes row ``(i, parents[i, j])``."""

    def one(x):
        y = x.reshape((b, k) + x.shape[1:])
        idx = parents.reshape(parents.shape + (1,) * (y.ndim - 2))
        return jnp.take_along_axis(y, idx, axis=1).reshape(x.shape)

    return jax.tree_util.tree_map(one, tree)


def beam_search(
    step,
    carry,
    logits,
    length: int,
    *,
    beam_size: int,
    end_id: int | None = None,
    alpha: float = 0.0,
) -> BeamResult:
    """Beam search over the same ``step`` contract as :func:`generate`.

    Keeps at most ``beam_size`` (K) prefixes alive. At each step every alive prefix
    is extended by every token and the ``K`` most probable extensions are kept;
    those ending with ``end_id`` leave the beam (it narrows) and join the finished
    hypotheses, of which the ``K`` best by length-normalised score are kept. After
    ``length`` tokens the alive beams finish too. Scores are ``log p(Y) / ((5 +
    |Y|) / 6) ** alpha`` (Wu et al. 2016; ``alpha=0``: the plain log-probability).
    ``beam_size=1`` is greedy decoding cut after the first end token; with ``K >=
    V ** (N - 1)`` nothing is pruned and the result is the exact top K. One scan
    of fixed length: compiles once, runs under ``jit``.

    Args:
      step: ``step(carry, tokens int32[B * K]) -> (carry, logits [B * K, V])``;
        row ``i * K + j`` is beam ``j`` of batch entry ``i``.
      carry: the state ``step`` starts from; every leaf has the batch ``B`` as
        its leading axis (tiled to ``B * K`` here, and reordered when beams are).
        State the step closes over (an encoder's output) must be tiled by the
        caller (``jnp.repeat(x, K, axis=0)``).
      logits: ``[B, V]``, the scores of the first token (as in :func:`generate`).
      length: N, the most tokens a hypothesis has (``step`` runs N - 1 times).
      beam_size: K.
      end_id: the token that ends a hypothesis (None: every hypothesis has N tokens).
      alpha: length normalisation ``>= 0`` (may be traced).

    Returns a :class:`BeamResult`: ``tokens int32[N, B, K]``, ``scores``,
    ``log_probs``, ``lengths`` ``[B, K]``, best first.

    >>> table = jnp.log(jnp.array([[0.1, 0.5, 0.4], [0.1, 0.2, 0.7], [0.9, 0.05, 0.05]]))
    >>> step = lambda c, t: (c, table[t])  # token 0 ends; 1 -> 2 is likely, 2 -> 0 too
    >>> res = beam_search(step, (), table[jnp.array([0])], 4, beam_size=2, end_id=0)
    >>> res.tokens[:, 0].T.tolist(), res.lengths.tolist()
    ([[2, 0, 0, 0], [1, 2, 0, 0]], [[2, 3]])
    >>> bool(jnp.allclose(res.log_probs[0, 0], jnp.log(0.4 * 0.9)))
    True
    """
    n = _checks.check_positive_int("length", length)
    k = _checks.check_positive_int("beam_size", beam_size)
    if not callable(step):
        raise TypeError(
            f"step: expected a function (carry, tokens) -> (carry, logits), got {step!r}"
        )
    logits = _checks.as_array("logits", logits)
    _checks.check_floating("logits", logits)
    _checks.check_ndim("logits", logits, 2, "[B, V]")
    b, v = logits.shape
    end = _check_end_id(end_id, v)
    alpha = _check_alpha(alpha)
    for path, leaf in jax.tree_util.tree_leaves_with_path(carry):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != b:
            raise ValueError(
                f"carry{jax.tree_util.keystr(path)}: expected the batch B={b} of logits as the "
                f"leading axis, got {_checks.describe(leaf)}"
            )
    # one program, also when called eagerly (inside a jit it is inlined)
    return jax.jit(functools.partial(_beam_core, step, n, k, end))(carry, logits, alpha)


def _beam_core(step, n, k, end, carry, logits, alpha):
    b, v = logits.shape
    fill = 0 if end is None else end
    neg = jnp.float32(-jnp.inf)

    def select(t, logits, alive):
        """Extends the alive beams by ``logits [B, K, V]`` at position ``t``."""
        seqs, scores, fin = alive
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        cand = (scores[:, :, None] + logp).reshape(b, k * v)
        top, idx = jax.lax.top_k(cand, k)  # [B, K]
        parents, toks = idx // v, (idx % v).astype(jnp.int32)
        cseqs = jnp.take_along_axis(seqs, parents[:, :, None], axis=1)  # [B, K, N]
        cseqs = cseqs.at[:, :, t].set(toks)
        last = t == n - 1
        ends = jnp.full(toks.shape, last) if end is None else (toks == end) | last
        live = top > neg
        # finished: merge the new ones with the earlier ones, best K by normalised score
        f_seqs, f_scores, f_logp, f_len = fin
        new_norm = top / _length_penalty(jnp.full(toks.shape, t + 1), alpha)
        all_scores = jnp.concatenate([f_scores, jnp.where(ends & live, new_norm, neg)], 1)
        best, pick = jax.lax.top_k(all_scores, k)
        pick3 = pick[:, :, None]
        f_seqs = jnp.take_along_axis(jnp.concatenate([f_seqs, cseqs], 1), pick3, axis=1)
        f_logp = jnp.take_along_axis(jnp.concatenate([f_logp, top], 1), pick, axis=1)
        new_len = jnp.full(toks.shape, t + 1, jnp.int32)
        f_len = jnp.take_along_axis(jnp.concatenate([f_len, new_len], 1), pick, axis=1)
        fin = (f_seqs, best, f_logp, f_len)
        # alive: the kept candidates that did not end (an ended one leaves a dead slot)
        return (cseqs, jnp.where(ends, neg, top), fin), parents, toks

    seqs = jnp.full((b, k, n), fill, jnp.int32)
    scores = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, neg), (b, k))
    fin = (
        seqs,
        jnp.full((b, k), neg),
        jnp.full((b, k), neg),
        jnp.zeros((b, k), jnp.int32),
    )
    first = jnp.broadcast_to(logits[:, None, :], (b, k, v))
    alive, parents, toks = select(0, first, (seqs, scores, fin))
    carry = _gather_beams(_tile_beams(carry, k), parents, b, k)

    def body(state, t):
        c, alive, toks = state
        c, lg = step(c, toks.reshape(b * k))
        lg = _checks.as_array("logits", lg)
        if lg.shape != (b * k, v):
            raise ValueError(
                f"step: expected logits of shape [B*K={b * k}, V={v}], got {_checks.describe(lg)}"
            )
        alive, parents, toks = select(t, lg.reshape(b, k, v), alive)
        return (_gather_beams(c, parents, b, k), alive, toks), None

    (_, alive, _), _ = jax.lax.scan(body, (carry, alive, toks), jnp.arange(1, n))
    f_seqs, f_scores, f_logp, f_len = alive[2]
    return BeamResult(jnp.moveaxis(f_seqs, 2, 0), f_scores, f_logp, f_len)


def beam_decode(
    model,
    params,
    src,
    length: int,
    *,
    bos_id: int,
    end_id: int | None,
    beam_size: int,
    alpha: float = 0.0,
    src_lengths=None,
) -> BeamResult:
    """Beam search decoding of an encoder-decoder (:func:`greedy_decode`'s model contract).

    The encoder runs once; its output is tiled to ``B * K`` rows for the decoder.

    Args:
      model, params, src, length, bos_id, src_lengths: as :func:`greedy_decode`.
      end_id: the end-of-sequence token (None: every hypothesis has ``length`` tokens).
      beam_size, alpha: as :func:`beam_search`.

    Returns a :class:`BeamResult` (``tokens int32[N, B, K]``, best first).

    >>> from jaxseq.models import Seq2SeqAttention
    >>> s2s = Seq2SeqAttention(7, 5, embedding_size=4, hidden_size=6, bidirectional=False)
    >>> params = s2s.init(jax.random.key(0))
    >>> src = jnp.zeros((4, 2), jnp.int32)
    >>> res = beam_decode(s2s, params, src, 3, bos_id=0, end_id=1, beam_size=2)
    >>> res.tokens.shape, res.scores.shape
    ((3, 2, 2), (2, 2))
    """
    n = _checks.check_positive_int("length", length)
    k = _checks.check_positive_int("beam_size", beam_size)
    if not 0 <= int(bos_id) < model.tgt_vocab_size:
        raise ValueError(f"bos_id: expected an id in [0, {model.tgt_vocab_size}), got {bos_id!r}")
    end = _check_end_id(end_id, model.tgt_vocab_size)
    alpha = _check_alpha(alpha)
    enc = model.encode(params, src, src_lengths)  # validates src where it is concrete
    return _beam_decode_jit(model, n, k, int(bos_id), end)(params, enc, alpha)


@functools.lru_cache(maxsize=32)
def _beam_decode_jit(model, n, k, bos, end):
    @jax.jit
    def run(params, enc, alpha):
        b = enc.lengths.shape[0]
        carry, logits, _ = model.step(params, enc, enc.carry, jnp.full((b,), bos, jnp.int32))
        tiled = _tile_beams(enc, k)

        def step(c, y):
            c, lg, _ = model.step(params, tiled, c, y)
            return c, lg

        return beam_search(step, carry, logits, n, beam_size=k, end_id=end, alpha=alpha)

    return run


def lm_beam_search(
    model,
    params,
    prime,
    length: int,
    *,
    beam_size: int,
    end_id: int | None = None,
    alpha: float = 0.0,
    carry=None,
) -> BeamResult:
    """The most probable continuations of ``prime`` under a language model, by beam search.

    Args:
      model, params, carry: as :func:`sample`.
      prime: ``int[P, B]`` priming tokens (P >= 1, one batch dim), ids in ``[0, V)``.
      length: N, the most tokens generated after the prime.
      beam_size, end_id, alpha: as :func:`beam_search`.

    Returns a :class:`BeamResult` (``tokens int32[N, B, K]``, the prime not included).

    >>> from jaxseq.models import char_lm
    >>> lm = char_lm(9, num_layers=1, hidden_size=8, embedding_size=4)
    >>> params = lm.init(jax.random.key(0))
    >>> res = lm_beam_search(lm, params, jnp.array([[1, 2], [3, 4]]), 5, beam_size=3)
    >>> res.tokens.shape, res.lengths.tolist()
    ((5, 2, 3), [[5, 5, 5], [5, 5, 5]])
    """
    prime = _checks.as_array("prime", prime)
    _checks.check_integer("prime", prime)
    _checks.check_ndim("prime", prime, 2, "[P, B]")
    if prime.shape[0] < 1:
        raise ValueError(
            f"prime: expected at least one priming token [P>=1, B], got {_checks.describe(prime)}"
        )
    v = model.vocab_size
    _checks.check_in_range("prime", prime, 0, v - 1, f" (token ids, vocab_size V={v})")
    model.check_params(params)
    n = _checks.check_positive_int("length", length)
    k = _checks.check_positive_int("beam_size", beam_size)
    end = _check_end_id(end_id, v)
    alpha = _check_alpha(alpha)
    if carry is None:
        carry = model.initial_carry((prime.shape[1],))
    return _lm_beam_jit(model, n, k, end)(params, prime.astype(jnp.int32), carry, alpha)


@functools.lru_cache(maxsize=32)
def _lm_beam_jit(model, n, k, end):
    @jax.jit
    def run(params, prime, carry, alpha):
        carry, logits = model.apply(params, carry, prime)

        def step(c, tok):
            c, lg = model.apply(params, c, tok[None])
            return c, lg[0]

        return beam_search(step, carry, logits[-1], n, beam_size=k, end_id=end, alpha=alpha)

    return run
