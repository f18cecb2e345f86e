"""Plain NumPy float64 references for the composite models, written without jaxseq.

Every function works on ONE example and takes the library's parameter
containers only through attribute access (``p.w_q``, ``p.scale``, ...), so the
arithmetic here is independent of the code under test. Conventions copied from
the docstrings: weights ``[in, out]``; masks are boolean with True = may attend;
a query row with every key masked gets zero weights; the default score scale is
``1/sqrt(Dk)``; layer norm uses ``eps=1e-5``; the Transformer block is pre-LN
with the tanh approximation of GELU (``jax.nn.gelu``'s default).
"""

import _reference as ref
import jax
import ml_dtypes
import numpy as np


def f64(a):
    return None if a is None else np.asarray(a, np.float64)


def bf16_round(a):
    """Rounds to the nearest bfloat16 value (ties to even), returned as float64."""
    return np.asarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), np.float64)


def perturb(params, seed, scale=0.5):
    """``params`` with N(0, scale^2) noise added to every array: every bias non-zero,
    layer-norm scales and offsets random (and different between two layer norms)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(a.dtype) for a in leaves]
    noisy = [jax.numpy.asarray(a) for a in noisy]
    return jax.tree_util.tree_unflatten(tree, noisy)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# -- attention ------------------------------------------------------------------------


def masked_softmax(s, mask=None):
    """Softmax over the last axis; masked entries 0, a fully masked row all 0."""
    s = f64(s)
    if mask is None:
        mask = np.ones(s.shape, bool)
    s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    return e / np.where(den > 0, den, 1.0)


def attention(q, k, v, mask=None, bias=None, causal=False, scale=None):
    """``(softmax(q k^T * scale + bias) v, weights)`` for ``q [Tq, Dk]``, ``k [Tk, Dk]``, ``v [Tk, Dv]``."""
    q, k, v = f64(q), f64(k), f64(v)
    tq, tk = q.shape[0], k.shape[0]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.T * scale
    if bias is not None:
        s = s + f64(bias)
    mask = np.ones((tq, tk), bool) if mask is None else np.asarray(mask, bool)
    if causal:
        mask = mask & np.tril(np.ones((tq, tk), bool))
    w = masked_softmax(s, mask)
    return w @ v, w


def multi_head_attention(p, x, context=None, mask=None, causal=False):
    """Per head ``h``: ``q = x W_q[:, h] + b_q[h]``, ``k``/``v`` likewise from ``context``;
    the heads' outputs go through ``W_o[h]`` and are summed, plus ``b_o``.

    ``mask``: ``[Tq, Tk]`` or per head ``[K, Tq, Tk]``. Returns ``(out [Tq, Do], w [K, Tq, Tk])``.
    """
    x = f64(x)
    c = x if context is None else f64(context)
    nh = p.w_q.shape[1]
    out, ws = 0.0, []
    for h in range(nh):
        q = x @ f64(p.w_q)[:, h]
        k = c @ f64(p.w_k)[:, h]
        v = c @ f64(p.w_v)[:, h]
        if p.b_q is not None:
            q, k, v = q + f64(p.b_q)[h], k + f64(p.b_k)[h], v + f64(p.b_v)[h]
        m = None if mask is None else (mask[h] if np.ndim(mask) == 3 else mask)
        o, w = attention(q, k, v, m, causal=causal)
        out = out + o @ f64(p.w_o)[h]
        ws.append(w)
    if p.b_o is not None:
        out = out + f64(p.b_o)
    return out, np.stack(ws)


def layer_norm(p, x, eps=1e-5):
    x = f64(x)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * f64(p.scale) + f64(p.bias)


def dense(p, x):
    return f64(x) @ f64(p.w) + f64(p.b)


def transformer_block(p, x, mask=None, length=None, causal=True):
    """Pre-LN block: ``h = x + MHA(LN_1(x))``; ``y = h + W_2 gelu(W_1 LN_2(h))``."""
    x = f64(x)
    t = x.shape[0]
    if length is not None:
        keys = np.broadcast_to(np.arange(t)[None, :] < int(length), (t, t))
        mask = keys if mask is None else np.asarray(mask, bool) & keys
    a, w = multi_head_attention(p.attn, layer_norm(p.ln1, x), mask=mask, causal=causal)
    h = x + a
    return h + dense(p.mlp_out, gelu_tanh(dense(p.mlp_in, layer_norm(p.ln2, h)))), w


def additive_attention(p, query, keys, values=None, length=None):
    """Bahdanau: ``e_j = v . tanh(q W_q + b + k_j W_k)``; ``query [Dq]``; keys ``j >= length`` masked."""
    keys = f64(keys)
    values = keys if values is None else f64(values)
    e = np.tanh(f64(query) @ f64(p.w_q) + f64(p.b) + keys @ f64(p.w_k)) @ f64(p.v)
    mask = np.ones(e.shape, bool) if length is None else np.arange(e.shape[0]) < int(length)
    w = masked_softmax(e, mask)
    return w @ values, w


def luong_attention(p, query, keys, values=None, length=None):
    """Luong: ``e_j = q . k_j`` (``p.w`` None) or ``q^T W k_j``."""
    keys = f64(keys)
    values = keys if values is None else f64(values)
    qw = f64(query) if p.w is None else f64(query) @ f64(p.w)
    e = keys @ qw
    mask = np.ones(e.shape, bool) if length is None else np.arange(e.shape[0]) < int(length)
    w = masked_softmax(e, mask)
    return w @ values, w


# -- recurrent cells: the equations are those of _reference.py ---------------------------

# the models' cell names -> _reference's kinds
KINDS = {"lstm": "lstm", "gru": "gru", "rnn": "tanh"}


def cell_rollout(cell, p, xs, length=None, reverse=False):
    """One example from a zero carry: ``xs [T, D]`` -> ``ys [T, H]``, zeros past ``length``."""
    kind = KINDS[cell]
    carry = ref.zero_carry(kind, p.w_hh.shape[0])
    _, ys = ref.rollout(kind, ref.as_arrays(p), f64(xs), carry, length, reverse=reverse)
    return ys


# -- seq2seq with additive attention (one example) --------------------------------------


def seq2seq_encode(p, cell, bidirectional, src, length):
    """``src int[S]`` -> ``(states [S, He], h0 [Hd])``; ``h0 = tanh(W_b mean_{j<length} h_j + b_b)``."""
    x = f64(p.src_embedding)[np.asarray(src)]
    if bidirectional:
        yf = cell_rollout(cell, p.encoder.forward, x, length)
        yb = cell_rollout(cell, p.encoder.backward, x, length, reverse=True)
        states = np.concatenate([yf, yb], axis=-1)
    else:
        states = cell_rollout(cell, p.encoder, x, length)
    mean = states[: int(length)].sum(0) / max(int(length), 1)
    return states, np.tanh(dense(p.bridge, mean))


def seq2seq_initial_carry(cell, h0):
    return (h0, np.zeros_like(h0)) if cell == "lstm" else (h0,)


def seq2seq_step(p, cell, states, length, carry, y_prev):
    """One decoder step -> ``(carry, logits [Vt], weights [S])``."""
    ctx, w = additive_attention(p.attention, carry[0], states, length=length)
    x = np.concatenate([f64(p.tgt_embedding)[int(y_prev)], ctx])
    carry, h = ref.step(KINDS[cell], ref.as_arrays(p.decoder), carry, x)
    logits = dense(p.head, np.concatenate([h, ctx]))
    return carry, logits, w


def seq2seq_apply(p, cell, bidirectional, src, tgt_in, length):
    """Teacher forcing for one example: ``src int[S]``, ``tgt_in int[T]`` -> ``(logits [T, Vt], w [T, S])``."""
    states, h0 = seq2seq_encode(p, cell, bidirectional, src, length)
    carry = seq2seq_initial_carry(cell, h0)
    logits, ws = [], []
    for y in np.asarray(tgt_in):
        carry, lg, w = seq2seq_step(p, cell, states, length, carry, y)
        logits.append(lg)
        ws.append(w)
    return np.stack(logits), np.stack(ws)
