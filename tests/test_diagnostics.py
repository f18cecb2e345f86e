import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq.training import diagnostics


def test_identity_relu_rnn_passes_gradients_unchanged():
    cell = js.RNN(3, activation="relu")
    params = js.recurrent.RNNParams(jnp.zeros((2, 3)), jnp.eye(3), jnp.ones(3))  # h_t = h_{t-1} + 1
    xs = jnp.zeros((7, 4, 2))
    norms = diagnostics.grad_norm_per_step(cell, params, xs, lambda ys: jnp.sum(ys[-1]))
    np.testing.assert_allclose(norms, np.full(7, np.sqrt(12.0)), rtol=1e-6)


def test_last_step_matches_direct_gradient_and_vanishing_with_small_weights(key):
    cell = js.LSTM(5)
    params = cell.init(key, 3)
    params = params._replace(w_hh=params.w_hh * 0.1)
    xs = jax.random.normal(jax.random.fold_in(key, 1), (12, 2, 3))

    def loss(ys):
        return jnp.sum(jnp.sin(ys[-1]))

    norms = diagnostics.grad_norm_per_step(cell, params, xs, loss)
    _, ys = js.rollout(cell, params, xs)
    direct = jax.grad(loss)(ys)[-1]
    np.testing.assert_allclose(norms[-1], jnp.linalg.norm(direct), rtol=1e-5)
    assert norms.shape == (12,)
    assert float(norms[0]) < 1e-3 * float(norms[-1])  # vanishing back through time


def test_plots_and_errors(tmp_path, key):
    cell = js.GRU(4)
    params = cell.init(key, 2)
    xs = jnp.ones((5, 2))  # no batch dims
    norms = diagnostics.grad_norm_per_step(cell, params, xs, lambda ys: jnp.mean(ys))
    p = diagnostics.plot_grad_norms([norms, norms * 2], tmp_path / "g.png", labels=["a", "b"])
    assert (tmp_path / "g.png").stat().st_size > 1000 and p == tmp_path / "g.png"
    with pytest.raises(ValueError, match="loss_fn: expected a scalar loss"):
        diagnostics.grad_norm_per_step(cell, params, xs, lambda ys: ys)
    with pytest.raises(ValueError, match="xs: expected last dim D=2"):
        diagnostics.grad_norm_per_step(cell, params, jnp.ones((5, 3)), jnp.sum)
    m = tmp_path / "m.jsonl"
    m.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    e = tmp_path / "e.jsonl"
    e.write_text('{"step": 2, "val_loss": 1.7, "train_s": 30}\n')
    diagnostics.plot_training_curves(m, tmp_path / "c.png", eval_path=e)
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert len(diagnostics.read_jsonl(m)) == 2
