import _np_models as npm
import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cells import ProtocolCell

import jaxseq as js
from jaxseq import models


@pytest.fixture
def lm():
    return models.char_lm(
        6, cell="gru", num_layers=2, hidden_size=5, embedding_size=3, dropout_rate=0.3
    )


def test_shapes_and_carry_threading(lm, key):
    params = lm.init(key)
    tokens = jax.random.randint(jax.random.fold_in(key, 1), (9, 2), 0, 6)
    apply = jax.jit(lambda p, c, x: lm.apply(p, c, x))
    carry, logits = apply(params, lm.initial_carry((2,)), tokens)
    assert logits.shape == (9, 2, 6) and logits.dtype == jnp.float32
    assert len(carry) == 2 and carry[1].h.shape == (2, 5)
    c1, l1 = apply(params, lm.initial_carry((2,)), tokens[:4])
    c2, l2 = apply(params, c1, tokens[4:])
    np.testing.assert_allclose(jnp.concatenate([l1, l2]), logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(c2), jax.tree_util.tree_leaves(carry)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_apply_matches_reference(lm, key):
    """Embedding, two GRU layers from a given carry, per-sequence lengths and the head,
    against a NumPy float64 model with every weight and bias random and non-zero."""
    params = npm.perturb(lm.init(key), seed=11)
    tokens = jax.random.randint(jax.random.fold_in(key, 2), (6, 2), 0, 6)
    rng = np.random.default_rng(12)
    carry0 = tuple(
        js.recurrent.RNNCarry(jnp.asarray(rng.standard_normal((2, 5)), jnp.float32))
        for _ in range(2)
    )
    lengths = np.array([6, 3])
    carry, logits = jax.jit(lambda p, c, x, n: lm.apply(p, c, x, lengths=n))(
        params, carry0, tokens, jnp.asarray(lengths)
    )
    for b in range(2):
        h = np.asarray(params.embedding, np.float64)[np.asarray(tokens[:, b])]
        for i, (cp, c0) in enumerate(zip(params.stack, carry0)):
            c0b = (np.asarray(c0.h[b], np.float64),)
            (hb,), h = ref.rollout("gru", ref.as_arrays(cp), h, c0b, lengths[b])
            np.testing.assert_allclose(carry[i].h[b], hb, rtol=1e-5, atol=1e-6)
        want = npm.dense(params.head, h)
        np.testing.assert_allclose(logits[:, b], want, rtol=1e-5, atol=1e-6)


def test_reset_lengths_and_dropout(lm, key):
    params = lm.init(key)
    tokens = jax.random.randint(key, (6, 3), 0, 6)
    _, full = lm.apply(params, None, tokens)
    reset = jnp.zeros((6, 3), bool).at[3].set(True)
    _, lr = lm.apply(params, None, tokens, reset=reset)
    _, tail = lm.apply(params, None, tokens[3:])
    np.testing.assert_allclose(lr[3:], tail, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lr[:3], full[:3], rtol=1e-5, atol=1e-6)
    c_len, _ = lm.apply(params, None, tokens, lengths=jnp.array([2, 6, 4]))
    c_two, _ = lm.apply(params, None, tokens[:2])
    np.testing.assert_allclose(c_len[1].h[0], c_two[1].h[0], rtol=1e-5, atol=1e-6)
    _, d1 = lm.apply(params, None, tokens, key=jax.random.key(1))
    _, d2 = lm.apply(params, None, tokens, key=jax.random.key(2))
    assert not np.allclose(d1, d2) and not np.allclose(d1, full)


def test_variational_dropout_masks_embeddings_and_head_input_once_per_sequence(key):
    lm = models.char_lm(6, num_layers=1, hidden_size=5, embedding_size=3, dropout_rate=0.5,
                        variational_dropout=True)  # fmt: skip
    assert lm.stack.variational_dropout and lm.config()["variational_dropout"]
    params = lm.init(key)
    # the same masks, drawn by hand with the keys apply splits from its key
    tokens = jnp.zeros((9, 4), jnp.int32)
    k = jax.random.key(3)
    k_in, _, k_out = jax.random.split(k, 3)
    x = js.nn.dropout(k_in, js.nn.embed(params.embedding, tokens), 0.5, shared_axes=(0,))
    _, h = js.rollout(lm.stack.layers[0], params.stack[0], x)
    want = js.nn.dense(params.head, js.nn.dropout(k_out, h, 0.5, shared_axes=(0,)))
    _, got = lm.apply(params, None, tokens, key=k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _, plain = models.char_lm(
        6, num_layers=1, hidden_size=5, embedding_size=3, dropout_rate=0.5
    ).apply(params, None, tokens, key=k)
    assert not np.allclose(plain, got)


def test_vocab_and_config_errors(lm, key):
    params = lm.init(key)
    other = models.char_lm(7, cell="gru", num_layers=2, hidden_size=5, embedding_size=3)
    with pytest.raises(ValueError, match=r"params.embedding: expected shape \[V=7, E=3\]"):
        other.apply(params, None, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(TypeError, match="tokens: expected an integer dtype"):
        lm.apply(params, None, jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="cell: expected one of"):
        models.char_lm(5, cell="transformer")
    cfg = lm.config()
    assert cfg["vocab_size"] == 6 and cfg["layers"][0]["type"] == "GRU"
    assert cfg["layers"][1]["hidden_size"] == 5
    assert isinstance(js.models.RecurrentLM, type)


def test_recurrent_lm_with_a_user_cell_has_a_config_a_checkpointer_accepts(key, tmp_path):
    import json

    lm = models.RecurrentLM(5, 2, js.Stack([ProtocolCell(), js.Bidirectional(js.GRU(2))]))
    cfg = lm.config()
    assert cfg["layers"][0] == {"type": "ProtocolCell", "output_size": 3}
    assert cfg["layers"][1]["forward"] == cfg["layers"][1]["backward"]
    assert cfg["layers"][1]["forward"]["type"] == "GRU"
    assert json.loads(json.dumps(cfg)) == cfg
    params = lm.init(key)
    carry, logits = lm.apply(params, None, jnp.zeros((4, 2), jnp.int32))
    assert logits.shape == (4, 2, 5) and carry[0].shape == (2, 3)
    opt = js.make_optimizer("sgd", 0.1)
    state = js.init_state(params, opt, key)
    ckpt = js.Checkpointer(tmp_path / "ckpt", model_config=cfg)
    ckpt.save(state)
    restored, _ = js.Checkpointer(tmp_path / "ckpt", model_config=lm.config()).restore(state)
    np.testing.assert_array_equal(restored.params.stack[0], params.stack[0])


def test_config_uses_a_cells_own_config_and_rejects_a_non_dict(key):
    class Configured(ProtocolCell):
        def config(self):
            return {"decay": 0.5}

    class Broken(ProtocolCell):
        def config(self):
            return [0.5]

    cfg = models.RecurrentLM(5, 2, js.Stack([Configured()])).config()
    assert cfg["layers"] == [{"type": "Configured", "decay": 0.5}]
    with pytest.raises(
        TypeError, match=r"stack.layers\[0\] \(Broken\): config\(\) must return a dict"
    ):
        models.RecurrentLM(5, 2, js.Stack([Broken()])).config()


def test_missing_or_wrong_output_size_is_caught_when_the_model_is_built():
    class NoSize(ProtocolCell):
        output_size = property(lambda self: self.missing)

    class WrongSize(ProtocolCell):
        output_size = 4  # the step returns 3 features

    class StrSize(ProtocolCell):
        output_size = "3"

    # missing or not an int: the Stack the model is declared with refuses it
    with pytest.raises(
        TypeError, match=r"layers\[1\]: expected a cell or layer with an 'output_size'"
    ):
        models.RecurrentLM(5, 2, js.Stack([js.GRU(3), NoSize()]))
    with pytest.raises(TypeError, match=r"layers\[0\]: expected output_size to be a positive int"):
        models.RecurrentLM(5, 2, js.Stack([StrSize()]))
    # declared but not what the step returns: the model refuses it when it is built
    with pytest.raises(
        ValueError,
        match=r"stack.layers\[0\] \(WrongSize\): declares output_size=4 but its outputs "
        r"have last dim 3 \(for inputs of size 2\)",
    ):
        models.RecurrentLM(5, 2, js.Stack([WrongSize()]))
    with pytest.raises(ValueError, match=r"stack.layers\[1\].backward \(WrongSize\)"):
        models.RecurrentLM(
            5, 2, js.Stack([js.GRU(2), js.Bidirectional(ProtocolCell(), WrongSize())])
        )


def test_recurrent_lm_batch_major_equals_the_transposed_time_major_run(lm, key):
    params = npm.perturb(lm.init(key), seed=3)
    tokens = jax.random.randint(jax.random.fold_in(key, 1), (7, 3), 0, 6)  # [T, B]
    tokens = tokens.at[5:, 1].set(-100)  # padding past length 5
    reset = jnp.zeros((7, 3), bool).at[3, 0].set(True)
    lengths = jnp.array([7, 5, 6])
    carry0 = lm.initial_carry((3,))
    k = jax.random.fold_in(key, 2)
    c_tm, l_tm = lm.apply(params, carry0, tokens, reset=reset, lengths=lengths, key=k)
    c_bm, l_bm = jax.jit(
        lambda p, c, x, r: lm.apply(p, c, x, reset=r, lengths=lengths, key=k, time_major=False)
    )(params, carry0, tokens.T, reset.T)
    assert l_bm.shape == (3, 7, 6)
    np.testing.assert_allclose(l_bm, jnp.swapaxes(l_tm, 0, 1), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(c_bm), jax.tree_util.tree_leaves(c_tm)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="time_major: expected a Python bool"):
        lm.apply(params, None, tokens, time_major="no")
    with pytest.raises(ValueError, match=r"reset: expected.*\[\*B, T\] \(time_major=False\)"):
        lm.apply(params, None, tokens.T, reset=jnp.zeros((), bool), time_major=False)
