import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import checkpoint, train


def _state(key, hidden=6, vocab=5):
    model = js.models.char_lm(vocab, layers=1, hidden=hidden, embed_dim=3)
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
    other, st_other = _state(key, hidden=8)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="incompatible model"):
        checkpoint.Checkpointer(tmp_path, model_config=other.config()).restore(st_other)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="saved shape"):
        checkpoint.Checkpointer(tmp_path).restore(st_other)  # no config: shapes still checked
    ck = checkpoint.Checkpointer(tmp_path, model_config=model.config(), hparams={"lr": 2})
    with pytest.raises(
        checkpoint.IncompatibleCheckpointError, match=r"lr: checkpoint has 1.*override"
    ):
        ck.restore(st)
    got, _ = ck.restore(st, override=True)
    assert _bits(got) == _bits(st)


def test_missing_checkpoint_is_a_clear_error(key, tmp_path):
    _, st = _state(key)
    ck = checkpoint.Checkpointer(tmp_path / "none")
    assert ck.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ck.restore(st)
