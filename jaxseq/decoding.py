"""Generation from a language model by ``lax.scan``: greedy, temperature, top-k.

The priming tokens run through the model in one rollout; then each generated
token is fed back for the next step inside a scan, so the whole generation
compiles once for a given length::

    ids = js.decoding.sample(model, params, key, prime, 200, temperature=0.8, top_k=10)

Shapes: P priming length, N generated length, B batch (any number of dims), V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxseq import _checks

__all__ = [
    "sample",
    "sample_logits",
]


def sample_logits(key, logits, *, temperature=1.0, top_k=None, greedy=False):
    """Draws token ids from ``logits: [*B, V]`` -> ``int32[*B]``.

    ``greedy``: argmax. Otherwise softmax of ``logits / temperature`` restricted to
    the ``top_k`` largest logits (all when None), in float32. ``temperature``,
    ``top_k`` and ``greedy`` may be traced values (one compilation for all settings).
    """
    _checks.check_floating("logits", logits)
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
        kth = jnp.take(jnp.sort(logits, axis=-1), v - k, axis=-1)[..., None]
        logits = jnp.where(logits < kth, jnp.finfo(jnp.float32).min, logits)
    drawn = jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


def _check_args(model, prime, length, temperature, top_k):
    prime = _checks.as_array("prime", prime)
    _checks.check_integer("prime", prime)
    _checks.check_min_ndim("prime", prime, 1, "[P, *B]")
    if prime.shape[0] < 1:
        raise ValueError(
            f"prime: expected at least one priming token [P>=1, *B], got {_checks.describe(prime)}"
        )
    _checks.check_positive_int("length", length)
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if top_k is not None:
        _checks.check_positive_int("top_k", top_k)
        if top_k > model.vocab_size:
            raise ValueError(f"top_k: expected at most vocab_size={model.vocab_size}, got {top_k}")
    return prime


def sample(
    model,
    params,
    key,
    prime,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    carry=None,
):
    """Generates ``length`` tokens after ``prime``.

    Args:
      model: a :class:`jaxseq.models.LanguageModel`.
      params: its params.
      key: PRNG key (unused when ``greedy``).
      prime: ``int[P, *B]`` priming tokens (P >= 1), time-major.
      length: N, the number of tokens to generate.
      temperature: divides the logits (< 1: more conservative, > 1: more diverse).
      top_k: sample only among the k most likely tokens.
      greedy: always take the most likely token.
      carry: initial model carry (zeros when None).

    Returns:
      ``int32[N, *B]`` generated tokens (the prime is not included).
    """
    prime = _check_args(model, prime, length, temperature, top_k)
    _checks.check_key("key", key)
    model.check_params(params)
    if carry is None:
        carry = model.initial_carry(tuple(prime.shape[1:]))
    k = model.vocab_size if top_k is None else int(top_k)
    return _sample_jit(model, int(length))(
        params, key, prime.astype(jnp.int32), carry, jnp.float32(temperature), jnp.int32(k),
        jnp.bool_(greedy),
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _sample_jit(model, length):
    @jax.jit
    def run(params, key, prime, carry, temperature, top_k, greedy):
        carry, logits = model.apply(params, carry, prime)
        k0, key = jax.random.split(key)
        first = sample_logits(k0, logits[-1], temperature=temperature, top_k=top_k, greedy=greedy)

        def body(state, k):
            c, tok = state
            c, lg = model.apply(params, c, tok[None])
            nxt = sample_logits(k, lg[0], temperature=temperature, top_k=top_k, greedy=greedy)
            return (c, nxt), tok

        keys = jax.random.split(key, length)
        _, toks = jax.lax.scan(body, (carry, first), keys)
        return toks

    return run
