"""A causal Transformer language model whose carry is a key/value cache.

:class:`TransformerLM`: token embedding (plus learned positions), ``num_layers``
pre-LN causal blocks (:class:`jaxseq.attention.TransformerBlock`, run around the
cache's attention by its ``apply_with_attention``),
a final layer norm and a dense head over the vocabulary. It meets
:class:`jaxseq.protocols.LanguageModel`, so :func:`jaxseq.training.lm_loss_fn`,
:func:`jaxseq.training.evaluate_lm` and :func:`jaxseq.decoding.sample` use it
unchanged::

    model = js.models.transformer_lm(65, num_layers=4, d_model=256, num_heads=4, max_len=256)
    params = model.init(key)                      # TransformerLMParams
    cache = model.initial_carry((B,))             # KVCache: empty
    cache, logits = model.apply(params, cache, tokens)   # int[T, B] -> [T, B, V]
    cache, logits = model.step(params, cache, next_ids)  # int[B] -> [B, V]: one position

**The carry is a key/value cache** of fixed size ``C = max_len`` per layer
(:class:`KVCache`): the keys and values of the last ``C`` positions, written
into ring slots ``position % C``, with the position each slot holds. A call
attends from its ``T`` new positions to the cached ones and to each other
(causally), then writes its keys and values into the cache. Each position sees
itself and the ``C - 1`` positions before it:

* ``positions="rotary"`` (default): a **sliding window**. Generation and
  evaluation run for any number of tokens, each new one costing one step over
  ``C`` cached keys. Queries and keys are rotated (RoPE) by their offsets
  inside the call, so the angles stay bounded however long the stream.
  In truncated-BPTT training the cache carries the previous chunks' keys and
  values (without gradient, as Transformer-XL's memory), so every position of
  a chunk sees ``C - 1`` positions of context, not only the chunk's.
* ``positions="learned"``: absolute positions ``0 .. max_len-1`` counted from the
  carry's start (the last reset); a position past ``max_len - 1`` is an
  **error** (``ValueError`` with concrete values; under ``jit`` only inside
  :func:`jaxseq.checked`, plain ``jit`` clamps to the last row). Train it with
  a reset at every chunk (``StreamBatcher(..., reset_every_chunk=True)``,
  chunks of at most ``max_len``) and sample at most ``max_len`` tokens
  (prime included).

``reset[t]`` empties the cache before step ``t`` (positions restart at 0);
steps past ``lengths`` neither read nor write it. Shapes: T time, B batch (any
number of batch dims), D model size, K heads, Dh = D / K, L layers, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseq import _checks
from jaxseq._numerics import acc_dtype, under_forward_mode
from jaxseq.attention.positional import LearnedPositions, learned, rotary
from jaxseq.attention.transformer import TransformerBlock, TransformerBlockParams
from jaxseq.models._body import check_tokens, token_ids, valid_steps
from jaxseq.nn.dense import Dense, DenseParams, dense
from jaxseq.nn.dropout import dropout
from jaxseq.nn.embedding import Embedding, embed
from jaxseq.nn.norm import LayerNorm, LayerNormParams, layer_norm

__all__ = [
    "KVCache",
    "TransformerLM",
    "TransformerLMParams",
    "transformer_lm",
]

POSITIONS = ("rotary", "learned")


class TransformerLMParams(NamedTuple):
    """Transformer LM parameters: ``embedding [V, D]``, learned ``positions [max_len, D]``
    (``None`` with rotary positions), one :class:`~jaxseq.attention.TransformerBlockParams`
    per layer in ``blocks``, the final layer norm ``ln_f [D]`` and the ``head [D, V]``."""

    embedding: jax.Array  # [V, D]
    positions: jax.Array | None  # [max_len, D] or None
    blocks: tuple  # L x TransformerBlockParams
    ln_f: LayerNormParams
    head: DenseParams  # w [D, V], b [V]


class KVCache(NamedTuple):
    """The carry of a :class:`TransformerLM`: a ring of ``C = max_len`` slots per layer.

    ``slots``: ``int32[*B, C]``, the position held by each slot (-1: empty); ``keys``
    and ``values``: ``[*B, L, K, C, Dh]`` (keys before any rotary rotation);
    ``length``: ``int32[*B]``, the position of the next token (tokens since the last reset).
    """

    slots: jax.Array  # int32[*B, C]
    keys: jax.Array  # [*B, L, K, C, Dh]
    values: jax.Array  # [*B, L, K, C, Dh]
    length: jax.Array  # int32[*B]


def _rotate(x, positions):
    """RoPE of ``x: [N, K, T, Dh]`` at per-example ``positions: int[N, T]``."""
    per_head = jax.vmap(lambda x1, p1: rotary(x1, positions=p1), in_axes=(0, None))
    return jax.vmap(per_head)(x, positions)


def _core_scores(q, k, scale):
    acc = acc_dtype(q, k)
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=acc)
    return s * jnp.asarray(scale, acc)


def _core_forward(q, k, v, mask, scale):
    s = jnp.where(mask, _core_scores(q, k, scale), -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(mask, jnp.exp(s - top), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    sees = total > 0
    safe = jnp.where(sees, total, 1.0)
    w = jnp.where(sees, p / safe, 0.0)
    out = jnp.einsum(
        "...qk,...kd->...qd", w.astype(v.dtype), v, preferred_element_type=acc_dtype(w, v)
    ).astype(v.dtype)
    lse = jnp.where(sees, top + jnp.log(safe), jnp.inf)
    return out, lse


def _core_fwd(q, k, v, mask, scale):
    out, lse = _core_forward(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _core_bwd(scale, res, g):
    q, k, v, mask, out, lse = res
    do = g.astype(v.dtype)
    acc = lse.dtype
    w = jnp.where(mask, jnp.exp(_core_scores(q, k, scale) - lse), 0.0)
    dv = jnp.einsum("...qk,...qd->...kd", w.astype(do.dtype), do, preferred_element_type=acc)
    dw = jnp.einsum("...qd,...kd->...qk", do, v, preferred_element_type=acc)
    delta = jnp.sum(do.astype(acc) * out.astype(acc), axis=-1, keepdims=True)
    ds = (w * (dw - delta) * jnp.asarray(scale, acc)).astype(q.dtype)
    dq = jnp.einsum("...qk,...kd->...qd", ds, k, preferred_element_type=acc)
    dk = jnp.einsum("...qk,...qd->...kd", ds, q, preferred_element_type=acc)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_vjp(q, k, v, mask, scale):
    return _core_forward(q, k, v, mask, scale)[0]


_attention_vjp.defvjp(_core_fwd, _core_bwd)


def _softmax_attention(q, k, v, mask, scale: float):
    """Softmax attention with a hand-written backward, over head-major batches.

    ``q: [..., Tq, Dk]``, ``k: [..., Tk, Dk]``, ``v: [..., Tk, Dv]`` (the same leading
    dims), ``mask: bool`` broadcastable to ``[..., Tq, Tk]`` -> ``[..., Tq, Dv]`` in
    ``v``'s dtype. Scores and softmax accumulate in float32 (float64 for float64
    inputs); masked entries get exactly zero weight and a query that sees no key gets
    zeros. Callers zero the keys and values no query may see first, so padding never
    reaches a product (NaN * 0 is NaN).

    The forward keeps the log-sum-exp of each query's scores, not the ``[Tq, Tk]``
    weights; the backward rebuilds the weights from it and runs FlashAttention's four
    products without blocks: ``dv = wᵀ do``, ``dw = do vᵀ``, ``ds = w (dw - rowsum(do ∘
    out))``, ``dq = ds k``, ``dk = dsᵀ q``. Autodiff of the masked softmax keeps the
    weights and selects through the mask twice; the hand-written form took about a
    sixth less for this model's attention on a 2-core CPU. With 16-bit inputs every
    product takes 16-bit operands and accumulates into float32. Under ``jax.jvp`` (a
    ``custom_vjp`` has no forward mode) the plain formula runs.

    Per-example attention vmapped over heads and batch (``dot_product_attention``) keeps
    autodiff: there this backward measured 20-30% slower at T = 256 and 1024 (equal at
    T = 64; ``benchmarks/README.md``).
    """
    if under_forward_mode(q, k, v):
        return _core_forward(q, k, v, mask, scale)[0]
    return _attention_vjp(q, k, v, mask, float(scale))


def _attention(q, k, v, mask):
    """Softmax attention per example and head (head-major, so each product is one batched
    matmul): ``q: [N, K, T, Dh]``, ``k, v: [N, K, S, Dh]``, ``mask: bool[N, T, S]`` ->
    ``[N, K, T, Dh]``. Scores and softmax in float32 (float64 for float64 inputs); keys
    no query may see are zeroed before the products, so an empty or stale slot never
    reaches an output; a query that sees no key gets zeros."""
    seen = jnp.any(mask, axis=1)[:, None, :, None]  # [N, 1, S, 1]
    k = jnp.where(seen, k, jnp.zeros((), k.dtype))
    v = jnp.where(seen, v, jnp.zeros((), v.dtype))
    return _softmax_attention(q, k, v, mask[:, None], q.shape[-1] ** -0.5)


def _ring_writer(at, c: int):
    """``write(ring, new)``: the ring with slot ``at[n, t]`` (``c``: dropped) set to the
    chunk's step ``t``; ring ``[N, C]`` <- new ``[N, T]``, or ``[N, L, K, C, Dh]`` <-
    ``[N, L, K, T, Dh]``. Gathers, not a scatter (which costs a select per element on
    CPU): each slot takes the chunk step that writes it, if any (at most one does)."""
    t = at.shape[1]
    ti = jnp.arange(t, dtype=jnp.int32)
    hit = at[:, :, None] == jnp.arange(c, dtype=jnp.int32)[None, None, :]  # [N, T, C]
    src = jnp.max(jnp.where(hit, ti[None, :, None], -1), axis=1)  # [N, C]: step or -1
    idx = jnp.clip(src, 0, t - 1)

    def write(ring, new):
        if ring.ndim == 2:
            return jnp.where(src >= 0, jnp.take_along_axis(new, idx, axis=1), ring)
        got = jnp.take_along_axis(new, idx[:, None, None, :, None], axis=3)
        return jnp.where((src >= 0)[:, None, None, :, None], got, ring)

    return write


@dataclasses.dataclass(frozen=True)
class TransformerLM:
    """Embedding -> ``num_layers`` pre-LN causal blocks -> layer norm -> dense head.

    Args:
      vocab_size: V.
      num_layers: L.
      d_model: D (embedding and residual-stream size).
      num_heads: K (a divisor of D; rotary positions need an even ``D / K``).
      max_len: C, the cache size: each position attends to itself and the
        ``C - 1`` before it (and with learned positions, the longest sequence).
      positions: ``"rotary"`` (sliding window, any length) or ``"learned"``.
      mlp_size: F, the MLP hidden size (default ``4 * D``).
      dropout_rate: dropout on the embeddings and on both residual branches of
        every block, only when ``apply`` gets a ``key``.

    >>> lm = TransformerLM(11, num_layers=2, d_model=8, num_heads=2, max_len=6)
    >>> params = lm.init(jax.random.key(0))
    >>> cache, logits = jax.jit(lm.apply)(params, None, jnp.zeros((5, 3), jnp.int32))  # [T, B]
    >>> logits.shape, cache.keys.shape, cache.length.tolist()
    ((5, 3, 11), (3, 2, 2, 6, 4), [5, 5, 5])
    """

    vocab_size: int
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    max_len: int = 256
    positions: str = "rotary"
    mlp_size: int | None = None
    dropout_rate: float = 0.0

    def __post_init__(self):
        _checks.check_positive_int("vocab_size", self.vocab_size)
        _checks.check_positive_int("num_layers", self.num_layers)
        d = _checks.check_positive_int("d_model", self.d_model)
        nh = _checks.check_positive_int("num_heads", self.num_heads)
        _checks.check_positive_int("max_len", self.max_len)
        _checks.check_choice("positions", self.positions, POSITIONS)
        if d % nh:
            raise ValueError(f"num_heads: expected a divisor of d_model={d}, got {nh}")
        if self.positions == "rotary" and (d // nh) % 2:
            raise ValueError(
                f"num_heads: rotary positions need an even head size d_model/num_heads, "
                f"got {d}/{nh} = {d // nh}"
            )
        if self.mlp_size is not None:
            _checks.check_positive_int("mlp_size", self.mlp_size)
        _checks.check_rate("dropout_rate", self.dropout_rate)

    @property
    def head_size(self) -> int:
        """Dh = d_model / num_heads."""
        return self.d_model // self.num_heads

    @property
    def block(self) -> TransformerBlock:
        """The :class:`~jaxseq.attention.TransformerBlock` every layer runs (causal)."""
        return TransformerBlock(self.num_heads, self.mlp_size, dropout_rate=self.dropout_rate)

    def init(self, key, dtype=jnp.float32) -> TransformerLMParams:
        """Parameters: embedding and learned positions N(0, 0.02^2), the blocks of
        :meth:`~jaxseq.attention.TransformerBlock.init`, a unit layer norm and a
        LeCun-normal head ``[D, V]``."""
        _checks.check_key("key", key)
        ke, kp, kb, kh = jax.random.split(key, 4)
        d = self.d_model
        emb = Embedding(d, stddev=0.02).init(ke, self.vocab_size, dtype)
        pos = (
            LearnedPositions(self.max_len).init(kp, d, dtype)
            if self.positions == "learned"
            else None
        )
        blocks = tuple(self.block.init(k, d, dtype) for k in jax.random.split(kb, self.num_layers))
        head = Dense(self.vocab_size).init(kh, d, dtype)
        return TransformerLMParams(emb, pos, blocks, LayerNorm().init(None, d, dtype), head)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> KVCache:
        """An empty cache for batch ``*B``: every slot -1, keys and values zeros, length 0."""
        b = tuple(batch_shape)
        c, lay = self.max_len, (self.num_layers, self.num_heads, self.max_len, self.head_size)
        return KVCache(
            jnp.full(b + (c,), -1, jnp.int32),
            jnp.zeros(b + lay, dtype),
            jnp.zeros(b + lay, dtype),
            jnp.zeros(b, jnp.int32),
        )

    def config(self) -> dict:
        """A JSON-able description (compared when a checkpoint is restored)."""
        return {
            "type": "transformer",
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "max_len": self.max_len,
            "positions": self.positions,
            "mlp_size": self.mlp_size,
            "dropout_rate": float(self.dropout_rate),
        }

    def check_tokens(self, tokens, name: str = "tokens"):
        """Validates token ids ``int[T, *B]`` and returns them as an array."""
        return check_tokens(name, tokens)

    def check_params(self, params, name: str = "params") -> None:
        """Raises unless ``params`` are :class:`TransformerLMParams` of this model's sizes."""
        if not isinstance(params, TransformerLMParams):
            raise TypeError(f"{name}: expected TransformerLMParams, got {type(params).__name__}")
        v, d = self.vocab_size, self.d_model
        _checks.check_shape(f"{name}.embedding", params.embedding, (v, d), ("V", "D"))
        _checks.check_shape(f"{name}.head.w", params.head.w, (d, v), ("D", "V"))
        if self.positions == "learned":
            if params.positions is None:
                raise ValueError(
                    f"{name}.positions: expected a learned table [max_len={self.max_len}, D={d}], "
                    "got None"
                )
            _checks.check_shape(
                f"{name}.positions", params.positions, (self.max_len, d), ("max_len", "D")
            )
        elif params.positions is not None:
            raise ValueError(
                f"{name}.positions: expected None (rotary positions), "
                f"got {_checks.describe(params.positions)}"
            )
        blocks = params.blocks
        if not isinstance(blocks, tuple | list) or len(blocks) != self.num_layers:
            got = len(blocks) if isinstance(blocks, tuple | list) else type(blocks).__name__
            raise ValueError(f"{name}.blocks: expected {self.num_layers} blocks, got {got}")
        for i, bp in enumerate(blocks):
            if not isinstance(bp, TransformerBlockParams):
                raise TypeError(
                    f"{name}.blocks[{i}]: expected TransformerBlockParams, got {type(bp).__name__}"
                )
            _checks.check_shape(
                f"{name}.blocks[{i}].attn.w_q",
                bp.attn.w_q,
                (d, self.num_heads, self.head_size),
                ("D", "K", "Dh"),
            )

    def check_carry(self, carry, batch_shape, name: str = "carry") -> KVCache:
        """Raises unless ``carry`` is a :class:`KVCache` of this model for batch ``*B``."""
        if not isinstance(carry, KVCache):
            raise TypeError(
                f"{name}: expected a KVCache (model.initial_carry(batch_shape)), "
                f"got {type(carry).__name__}"
            )
        b = tuple(batch_shape)
        lay = (self.num_layers, self.num_heads, self.max_len, self.head_size)
        _checks.check_shape(f"{name}.slots", carry.slots, b + (self.max_len,))
        _checks.check_integer(f"{name}.slots", carry.slots)
        _checks.check_shape(f"{name}.keys", carry.keys, b + lay)
        _checks.check_shape(f"{name}.values", carry.values, b + lay)
        _checks.check_shape(f"{name}.length", carry.length, b)
        _checks.check_integer(f"{name}.length", carry.length)
        return carry

    def step(self, params: TransformerLMParams, carry, tokens, *, key=None):
        """One position: ``tokens: int[*B]`` -> ``(carry, logits float32[*B, V])``.

        The same as ``apply`` on ``tokens[None]``: the new key and value are written
        into slot ``length % max_len`` (``dynamic_update_slice``), then the token
        attends to the ``max_len`` slots.

        >>> lm = transformer_lm(7, num_layers=1, d_model=8, num_heads=2, max_len=4)
        >>> params = lm.init(jax.random.key(0))
        >>> cache, logits = jax.jit(lm.step)(params, lm.initial_carry((2,)), jnp.array([1, 2]))
        >>> logits.shape, cache.slots.tolist()
        ((2, 7), [[0, -1, -1, -1], [0, -1, -1, -1]])
        """
        tokens = check_tokens("tokens", tokens, "[*B]")
        carry, logits = self.apply(params, carry, tokens[None], key=key)
        return carry, logits[0]

    def apply(
        self, params: TransformerLMParams, carry, tokens, *, reset=None, lengths=None, key=None
    ):
        """Runs the model over ``tokens: int[T, *B]`` from the cache ``carry``.

        Args:
          params: :class:`TransformerLMParams`.
          carry: a :class:`KVCache` for batch ``*B`` (``None``: empty).
          tokens: ``int[T, *B]`` token ids in ``[0, V)``, time-major (with ``lengths``,
            padded steps may hold anything, e.g. ``-100``: they are not looked up).
          reset: optional ``bool[T, *B]``: empty the cache before step t (document
            starts); positions restart at 0 there.
          lengths: optional ``int[*B]``: steps past a sequence's length neither read
            nor write the cache (the returned cache is the one after its last valid step).
          key: dropout key; dropout is off when None (evaluation).

        Returns:
          ``(carry, logits: float32[T, *B, V])``.

        Raises:
          ValueError: a token id (at a valid step) outside ``[0, V)``, or with learned
            positions a position past ``max_len - 1``, naming the value and its index
            (under ``jax.jit`` only inside :func:`jaxseq.checked`).
        """
        self.check_params(params)
        tokens = self.check_tokens(tokens)
        t = tokens.shape[0]
        batch = tuple(tokens.shape[1:])
        valid = valid_steps(lengths, t, batch, tokens)
        tokens = token_ids("tokens", tokens, self.vocab_size, valid)
        if carry is None:
            carry = self.initial_carry(batch, params.embedding.dtype)
        self.check_carry(carry, batch)
        if reset is not None:
            reset = _checks.as_array("reset", reset)
            _checks.check_bool("reset", reset)
            if tuple(reset.shape) != (t, *batch):
                raise ValueError(
                    f"reset: expected shape {[t, *batch]} ([T, *B] of tokens "
                    f"{_checks.describe(tokens)}), got {_checks.describe(reset)}"
                )
        if key is not None:
            _checks.check_key("key", key)
        n = math.prod(batch)
        flat = jax.tree_util.tree_map(lambda a: a.reshape((n,) + a.shape[len(batch) :]), carry)
        tok = tokens.reshape(t, n).T  # [N, T]
        rst = None if reset is None else reset.reshape(t, n).T
        lens = None if lengths is None else jnp.asarray(lengths).reshape(n).astype(jnp.int32)
        flat, logits, pos = _run_flat(params, flat, tok, rst, lens, key, model=self)
        if self.positions == "learned" and _checks.is_concrete(pos):
            self._check_positions(pos)  # the compiled program's own check is a no-op
        carry = jax.tree_util.tree_map(lambda a: a.reshape(batch + a.shape[1:]), flat)
        return carry, jnp.moveaxis(logits, 1, 0).reshape((t, *batch, self.vocab_size))

    # -- internals on flattened batches: tokens [N, T], cache leaves [N, ...] ---------------

    def _check_positions(self, pos):
        c = self.max_len
        _checks.check_in_range(
            "positions",
            pos,
            0,
            c - 1,
            f" (learned positions: at most max_len={c} tokens since the carry's start or "
            "last reset; reset the carry, or use positions='rotary' for a sliding window)",
        )

    def _embed(self, params, tok, pos, key):
        x = embed(params.embedding, tok)  # [N, T, D]
        if self.positions == "learned":
            self._check_positions(pos)
            x = x + learned(params.positions, positions=pos.reshape(-1)).reshape(x.shape)
        if key is not None and self.dropout_rate > 0.0:
            x = dropout(key, x, self.dropout_rate)
        return x

    def _head(self, params, x):
        return dense(params.head, layer_norm(params.ln_f, x)).astype(jnp.float32)

    def _keys(self, key):
        if key is None or self.dropout_rate == 0.0:
            return None, [None] * self.num_layers
        k0, *ks = jax.random.split(key, self.num_layers + 1)
        return k0, ks

    def _one_step(self, params, cache: KVCache, tok, key):
        """``tok: int[N]``: write slot ``length % C`` first, then attend to the C slots."""
        c = self.max_len
        length = cache.length  # [N]
        slot = length % c
        k_emb, k_layers = self._keys(key)
        x = self._embed(params, tok[:, None], length[:, None], k_emb)  # [N, 1, D]
        put = jax.vmap(lambda ring, s, new: jax.lax.dynamic_update_slice_in_dim(ring, new, s, 0))
        put_heads = jax.vmap(
            lambda ring, s, new: jax.lax.dynamic_update_slice_in_dim(ring, new, s, 1)
        )  # ring [K, C, Dh], new [K, 1, Dh]
        slots = put(cache.slots, slot, length[:, None])
        mask = ((slots >= 0) & (length[:, None] - slots < c))[:, None, :]  # [N, 1, C]
        rel = slots - length[:, None]  # [N, C] in [-C+1, 0]
        keys, values = [], []

        for i, bp in enumerate(params.blocks):

            def attend(q, k, v, i=i):
                ring_k = put_heads(cache.keys[:, i], slot, k)  # [N, K, C, Dh]
                ring_v = put_heads(cache.values[:, i], slot, v)
                keys.append(ring_k)
                values.append(ring_v)
                if self.positions == "rotary":  # the query sits at offset 0: no rotation
                    ring_k = _rotate(ring_k, rel)
                return _attention(q, ring_k, ring_v, mask)

            x = self.block.apply_with_attention(bp, x, attend, key=k_layers[i])
        new = KVCache(slots, jnp.stack(keys, 1), jnp.stack(values, 1), length + 1)
        return new, self._head(params, x), length[:, None]  # and the positions read

    def _chunk(self, params, cache: KVCache, tok, reset, lengths, key):
        """``tok: int[N, T]``: attend to the cache and the chunk, then write the chunk."""
        n, t = tok.shape
        c = self.max_len
        ti = jnp.arange(t, dtype=jnp.int32)
        n_valid = jnp.full((n,), t, jnp.int32) if lengths is None else lengths
        valid = ti[None, :] < n_valid[:, None]  # [N, T]
        if reset is None:
            last = jnp.full((n, t), -1, jnp.int32)
        else:  # the step of the last reset at or before t (-1: none in this chunk)
            last = jax.lax.cummax(jnp.where(reset & valid, ti[None, :], -1), axis=1)
        length = cache.length
        pos = jnp.where(last >= 0, ti[None, :] - last, length[:, None] + ti[None, :])  # [N, T]
        sees_cache = last < 0
        # who may attend whom: cached slots in the window, then the chunk causally
        from_cache = (
            sees_cache[:, :, None]
            & (cache.slots[:, None, :] >= 0)
            & (pos[:, :, None] - cache.slots[:, None, :] < c)
        )  # [N, T, C]
        dist = ti[:, None] - ti[None, :]
        in_chunk = (last[:, :, None] == last[:, None, :]) & ((dist >= 0) & (dist < c))[None]
        mask = jnp.concatenate([from_cache, in_chunk], axis=-1)  # [N, T, C + T]
        # a chunk that starts with a reset everywhere (training with reset_every_chunk,
        # a fresh cache) reads no slot: its attention skips the cache (half the keys)
        reads_cache = jnp.any(from_cache)
        # rotary offsets relative to the chunk: query/key i at i, slot with position p at p - length
        rel_chunk = jnp.broadcast_to(ti[None, :], (n, t))
        rel_cache = cache.slots - length[:, None]
        # what the chunk writes: its last C valid steps after its last reset
        idx_last = jnp.maximum(n_valid - 1, 0)
        last_final = jnp.take_along_axis(last, idx_last[:, None], axis=1)  # [N, 1]
        write = valid & (last == last_final) & (ti[None, :] >= n_valid[:, None] - c)
        at = jnp.where(write, pos % c, c)  # slot, or c: dropped
        any_reset = jnp.any(last >= 0, axis=1) & (n_valid > 0)
        kept = jnp.where(any_reset[:, None], -1, cache.slots)

        write = _ring_writer(at, c)
        k_emb, k_layers = self._keys(key)
        x = self._embed(params, tok, jnp.where(valid, pos, 0), k_emb)
        keys, values = [], []
        for i, bp in enumerate(params.blocks):

            def attend(q, k, v, i=i):
                keys.append(k)
                values.append(v)
                if self.positions == "rotary":
                    q, k = _rotate(q, rel_chunk), _rotate(k, rel_chunk)

                def with_cache(q, k, v, ck, cv):
                    if self.positions == "rotary":
                        ck = _rotate(ck, rel_cache)
                    k_all = jnp.concatenate([ck, k], axis=2)
                    v_all = jnp.concatenate([cv, v], axis=2)
                    return _attention(q, k_all, v_all, mask)

                def chunk_only(q, k, v, ck, cv):
                    return _attention(q, k, v, in_chunk)

                # each branch is rebuilt in the backward (jax.checkpoint), so the cond
                # keeps only its inputs, not zeros for the untaken branch's residuals;
                # the layer's own cache slices are operands: closed over, the cache of
                # every layer was a residual the other branch filled with zeros
                return jax.lax.cond(
                    reads_cache, jax.checkpoint(with_cache), jax.checkpoint(chunk_only),
                    q, k, v, cache.keys[:, i], cache.values[:, i],
                )  # fmt: skip

            x = self.block.apply_with_attention(bp, x, attend, key=k_layers[i])
        last_pos = jnp.take_along_axis(pos, idx_last[:, None], axis=1)[:, 0]
        new = KVCache(
            write(kept, pos),
            write(cache.keys, jnp.stack(keys, 1)),
            write(cache.values, jnp.stack(values, 1)),
            jnp.where(n_valid > 0, last_pos + 1, length).astype(jnp.int32),
        )
        return new, self._head(params, x), jnp.where(valid, pos, 0)


def _run_flat(params, flat, tok, rst, lens, key, *, model: TransformerLM):
    """The model on flattened batches (``tok: int[N, T]``, cache leaves ``[N, ...]``):
    ``(cache, logits [N, T, V], positions [N, T])``, the positions it embedded at."""
    if tok.shape[1] == 1 and rst is None and lens is None:
        flat, logits, pos = model._one_step(params, flat, tok[:, 0], key)
        return flat, logits[:, None], pos
    return model._chunk(params, flat, tok, rst, lens, key)


# outside jit, one compiled program instead of op-by-op dispatch (whose `cond` of new
# closures compiled again at every call)
_run_flat = _checks.compiled_after_checks(_run_flat, ("model",))


def transformer_lm(
    vocab_size: int,
    *,
    num_layers: int = 4,
    d_model: int = 256,
    num_heads: int = 4,
    max_len: int = 256,
    positions: str = "rotary",
    mlp_size: int | None = None,
    dropout_rate: float = 0.0,
) -> TransformerLM:
    """A causal Transformer language model (see :class:`TransformerLM`).

    ``max_len`` is the context: each position attends to itself and the
    ``max_len - 1`` before it (a sliding window with ``positions="rotary"``, the
    longest sequence with ``"learned"``).

    >>> lm = transformer_lm(65, num_layers=2, d_model=16, num_heads=2, max_len=32)
    >>> params = lm.init(jax.random.key(0))
    >>> len(params.blocks), params.blocks[0].mlp_in.w.shape, params.positions is None
    (2, (16, 64), True)
    """
    return TransformerLM(
        vocab_size,
        num_layers=num_layers,
        d_model=d_model,
        num_heads=num_heads,
        max_len=max_len,
        positions=positions,
        mlp_size=mlp_size,
        dropout_rate=dropout_rate,
    )
