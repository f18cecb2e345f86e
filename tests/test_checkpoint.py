import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import training as train
from jaxseq.training import checkpoint


def _state(key, hidden_size=6, vocab_size=5):
    model = js.models.char_lm(vocab_size, num_layers=1, hidden_size=hidden_size, embedding_size=3)
    opt = train.make_optimizer("adam", 1e-2)
    st = train.init_state(model.init(key), opt, key, model.initial_carry((2,)))
    # make every leaf distinctive
    st = st._replace(
        step=jnp.int32(7),
        carry=jax.tree_util.tree_map(lambda c: c + 0.25, st.carry),
        opt_state=jax.tree_util.tree_map(
            lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, st.opt_state
        ),
    )
    return model, st


def _zeros_like_state(st):
    """The same structure, shapes and dtypes as ``st`` with every value zero (key: another seed)."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, st._replace(key=None))
    return zeros._replace(key=jax.random.key(12345))


def _bits(tree):
    def conv(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes()

    return [conv(x) for x in jax.tree_util.tree_leaves(tree)]


def test_roundtrip_is_bit_identical_and_keeps_last_k(key, tmp_path):
    model, st = _state(key)
    ck = checkpoint.Checkpointer(tmp_path, keep=2, model_config=model.config(), hparams={"lr": 1})
    for s in (3, 5, 7):
        ck.save(st._replace(step=jnp.int32(s)), {"data_position": [0, s]})
    assert ck.all_steps() == [5, 7] and ck.latest_step() == 7
    ck.save(st)  # saving the same step again replaces it
    _, fresh = _state(jax.random.key(99))
    got, meta = ck.restore(fresh)
    assert type(got) is train.TrainState
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(st)
    assert _bits(got) == _bits(st)
    assert jnp.issubdtype(got.key.dtype, jax.dtypes.prng_key)
    assert meta["step"] == 7 and meta["model"] == model.config()
    got5, meta5 = ck.restore(fresh, step=5)
    assert int(got5.step) == 5 and meta5["data_position"] == [0, 5]
    ck.close()


def test_incompatible_model_and_hparams_are_refused_before_reading(key, tmp_path):
    model, st = _state(key)
    checkpoint.Checkpointer(tmp_path, model_config=model.config(), hparams={"lr": 1}).save(st)
    other, st_other = _state(key, hidden_size=8)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="incompatible model"):
        checkpoint.Checkpointer(tmp_path, model_config=other.config()).restore(st_other)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="saved shape"):
        checkpoint.Checkpointer(tmp_path).restore(st_other)  # no config: shapes still checked
    ck = checkpoint.Checkpointer(tmp_path, model_config=model.config(), hparams={"lr": 2})
    with pytest.raises(
        checkpoint.IncompatibleCheckpointError, match=r"lr: checkpoint has 1.*override"
    ):
        ck.restore(st)
    got, _ = ck.restore(_zeros_like_state(st), override=True)  # a template of other values
    assert _bits(got) == _bits(st)


def test_missing_checkpoint_is_a_clear_error(key, tmp_path):
    _, st = _state(key)
    ck = checkpoint.Checkpointer(tmp_path / "none")
    assert ck.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ck.restore(st)


def test_restore_into_a_zero_template_gives_the_saved_values(key, tmp_path):
    model, st = _state(key)
    template = _zeros_like_state(st)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(template.params))
    ck = checkpoint.Checkpointer(tmp_path, model_config=model.config())
    ck.save(st)
    got, meta = ck.restore(template)
    assert meta["step"] == 7 and int(got.step) == 7
    want_leaves = jax.tree_util.tree_leaves(_bits_tree(st))
    got_leaves = jax.tree_util.tree_leaves(_bits_tree(got))
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    # the template was only a shape: its zeros and its key are nowhere in the result
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(st.key))
    assert np.any(np.asarray(got.params.head.w))
    np.testing.assert_array_equal(np.asarray(got.carry[0].h), np.asarray(st.carry[0].h))
    assert float(np.asarray(got.carry[0].h).min()) == 0.25  # the +0.25 of _state


def _bits_tree(tree):
    def conv(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree_util.tree_map(conv, tree)


def test_restored_state_resumes_identically(key, tmp_path):
    model = js.models.char_lm(5, num_layers=1, hidden_size=6, embedding_size=3, dropout_rate=0.2)
    opt = train.make_optimizer("adam", 1e-2)
    bt = js.data.StreamBatcher(np.arange(2 * 30) % 5, 2, 4)
    step = train.make_train_step(train.lm_loss_fn(model), opt, donate=False)
    st = train.init_state(model.init(key), opt, key, model.initial_carry((2,)))
    for s in range(3):
        st, _ = step(st, bt.at_step(s))
    ck = checkpoint.Checkpointer(tmp_path, model_config=model.config())
    ck.save(st)
    ref, ref_losses = st, []
    for s in range(3, 6):
        ref, m = step(ref, bt.at_step(s))
        ref_losses.append(float(m["loss"]))
    # a fresh run of another seed at step 0, restored from the checkpoint
    other = jax.random.key(77)
    fresh = train.init_state(model.init(other), opt, other, model.initial_carry((2,)))
    got, _ = ck.restore(fresh)
    assert int(got.step) == 3
    got_losses = []
    for s in range(int(got.step), 6):
        got, m = step(got, bt.at_step(s))
        got_losses.append(float(m["loss"]))
    assert got_losses == ref_losses  # exact: same params, optimizer state, key and carry
    assert _bits(got) == _bits(ref)
    # the fresh run itself would have given other losses
    alt, m = step(fresh, bt.at_step(3))
    assert float(m["loss"]) != ref_losses[0]
