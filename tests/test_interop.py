"""Parity with PyTorch (stored fixtures) and Flax (live), and the interop converters.

The PyTorch references live in ``tests/fixtures/torch_*.npz`` (written by
``tests/fixtures/make_torch_fixtures.py``); torch is not needed to run these tests.
"""

from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxseq as js
from jaxseq import interop

FIXTURES = Path(__file__).parent / "fixtures"
H = 6  # hidden size of every fixture
TOL = dict(rtol=1e-5, atol=1e-5)
CELLS = {
    "rnn_tanh": js.RNN(H),
    "rnn_relu": js.RNN(H, activation="relu"),
    "lstm": js.LSTM(H),
    "gru": js.GRU(H),
}


def load(name: str, prefix: str) -> dict:
    with np.load(FIXTURES / f"torch_{name}.npz") as f:
        return {k[len(prefix) :]: f[k] for k in f.files if k.startswith(prefix)}


def section(case: dict, tag: str) -> dict:
    return {k[len(tag) :]: v for k, v in case.items() if k.startswith(tag)}


def weight_grads(case: dict) -> dict:
    """PyTorch's ``.grad`` of every state dict entry (inputs and initial states left out)."""
    return {k: v for k, v in section(case, "g.").items() if k not in ("x", "h0", "c0")}


def assert_grads_match(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL)


def torch_final_states(carries, field: str) -> jax.Array:
    """Stacks per-layer carries into PyTorch's ``h_n`` layout ``[L * dirs, B, H]``."""
    out = []
    for c in carries:
        parts = [c.forward, c.backward] if isinstance(c, js.recurrent.BidirectionalCarry) else [c]
        out.extend(getattr(p, field) for p in parts)
    return jnp.stack(out)


def loss_and_aux(case, is_lstm, ys, carries):
    h_n = torch_final_states(carries, "h")
    loss = jnp.sum(ys * case["r_out"]) + jnp.sum(h_n * case["r_h"])
    c_n = None
    if is_lstm:
        c_n = torch_final_states(carries, "c")
        loss = loss + jnp.sum(c_n * case["r_c"])
    return loss, (ys, h_n, c_n)


def check_forward(case, is_lstm, loss, aux):
    ys, h_n, c_n = aux
    np.testing.assert_allclose(ys, case["out"], **TOL)
    np.testing.assert_allclose(h_n, case["h_n"], **TOL)
    if is_lstm:
        np.testing.assert_allclose(c_n, case["c_n"], **TOL)
    np.testing.assert_allclose(loss, case["loss"], rtol=1e-5)


# -- PyTorch parity (fixtures) ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_parity_two_layer_bidirectional_packed(name):
    case, cell = load(name, "bi_"), CELLS[name]
    is_lstm = name == "lstm"
    sd = section(case, "w.")
    stack, params = interop.stack_from_torch(cell, sd)
    assert len(stack.layers) == 2 and all(isinstance(lay, js.Bidirectional) for lay in stack.layers)
    xs = jnp.asarray(case["x"], jnp.float32)
    lengths = jnp.asarray(case["lengths"], jnp.int32)
    assert int(lengths.min()) < int(lengths.max()) <= xs.shape[0]

    def f(params, xs):
        carries, ys = js.rollout(stack, params, xs, lengths=lengths)
        return loss_and_aux(case, is_lstm, ys, carries)

    (loss, aux), (g_params, g_x) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        params, xs
    )
    check_forward(case, is_lstm, loss, aux)
    np.testing.assert_allclose(g_x, case["g.x"], **TOL)
    assert_grads_match(interop.stack_grads_to_torch(stack, g_params), weight_grads(case))

    # grads_to_torch is the adjoint of from_torch: the same numbers as pulling the
    # parameter gradients back through the conversion itself.
    _, pull_back = jax.vjp(
        lambda sd_j: interop.stack_from_torch(cell, sd_j)[1],
        {k: jnp.asarray(v) for k, v in sd.items()},
    )
    assert_grads_match(pull_back(g_params)[0], weight_grads(case))


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_parity_one_layer_with_initial_state(name):
    case, cell = load(name, "uni_"), CELLS[name]
    is_lstm = name == "lstm"
    params = interop.from_torch(cell, section(case, "w."))
    xs = jnp.asarray(case["x"], jnp.float32)
    # PyTorch's (h0, c0) / h0: [num_layers * num_directions = 1, B, H]
    carry = interop.carry_from_torch(cell, (case["h0"], case["c0"]) if is_lstm else case["h0"])

    def f(params, xs, carry):
        final, ys = js.rollout(cell, params, xs, carry)
        return loss_and_aux(case, is_lstm, ys, (final,))

    grad_fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    (loss, aux), (g_params, g_x, g_carry) = grad_fn(params, xs, carry)
    check_forward(case, is_lstm, loss, aux)
    # The plain lax.scan path (not the default fused kernel) agrees too.
    _, ys_scan = jax.jit(lambda p, x, c: js.rollout(cell, p, x, c, kernel="scan"))(
        params, xs, carry
    )
    np.testing.assert_allclose(ys_scan, case["out"], **TOL)
    np.testing.assert_allclose(g_x, case["g.x"], **TOL)
    np.testing.assert_allclose(g_carry.h, case["g.h0"][0], **TOL)
    if is_lstm:
        np.testing.assert_allclose(g_carry.c, case["g.c0"][0], **TOL)
    assert_grads_match(interop.grads_to_torch(cell, g_params), weight_grads(case))


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_parity_no_bias(name):
    case, cell = load(name, "nobias_"), CELLS[name]
    is_lstm = name == "lstm"
    sd = section(case, "w.")
    assert sorted(sd) == ["weight_hh_l0", "weight_ih_l0"]
    params = interop.from_torch(cell, sd)
    for field in params._fields[2:]:
        np.testing.assert_array_equal(getattr(params, field), 0.0)
    xs = jnp.asarray(case["x"], jnp.float32)
    lengths = jnp.asarray(case["lengths"], jnp.int32)

    def f(params, xs):
        final, ys = js.rollout(cell, params, xs, lengths=lengths)
        return loss_and_aux(case, is_lstm, ys, (final,))

    (loss, aux), (g_params, g_x) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        params, xs
    )
    check_forward(case, is_lstm, loss, aux)
    np.testing.assert_allclose(g_x, case["g.x"], **TOL)
    assert_grads_match(interop.grads_to_torch(cell, g_params, bias=False), weight_grads(case))
    # The exported module has no biases either.
    assert sorted(interop.to_torch(cell, params, bias=False)) == sorted(sd)


# -- PyTorch converters ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_round_trip(name):
    cell = CELLS[name]
    sd = section(load(name, "bi_"), "w.")
    for layer in (0, 1):
        for reverse in (False, True):
            p = interop.from_torch(cell, sd, layer=layer, reverse=reverse)
            back = interop.to_torch(cell, p, layer=layer, reverse=reverse)
            sfx = f"_l{layer}" + ("_reverse" if reverse else "")
            assert sorted(back) == sorted(
                f"{n}{sfx}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            assert all(isinstance(v, np.ndarray) for v in back.values())
            np.testing.assert_array_equal(back[f"weight_ih{sfx}"], sd[f"weight_ih{sfx}"])
            np.testing.assert_array_equal(back[f"weight_hh{sfx}"], sd[f"weight_hh{sfx}"])
            # Same function: the biases may be split differently, but convert back identically.
            p2 = interop.from_torch(cell, back, layer=layer, reverse=reverse)
            chex.assert_trees_all_equal(p2, p)
    stack, params = interop.stack_from_torch(cell, sd)
    full = interop.stack_to_torch(stack, params)
    assert sorted(full) == sorted(sd)
    _, params2 = interop.stack_from_torch(cell, full)
    chex.assert_trees_all_equal(params2, params)


def test_torch_bias_layout():
    """b = b_ih + b_hh; for the GRU the n part of b_hh stays apart as b_hn."""
    rng = np.random.default_rng(0)
    d = 3
    for cell, g in ((js.LSTM(H), 4), (js.GRU(H), 3), (js.RNN(H), 1)):
        sd = {
            "weight_ih_l0": rng.normal(size=(g * H, d)).astype(np.float32),
            "weight_hh_l0": rng.normal(size=(g * H, H)).astype(np.float32),
            "bias_ih_l0": rng.normal(size=(g * H,)).astype(np.float32),
            "bias_hh_l0": rng.normal(size=(g * H,)).astype(np.float32),
        }
        p = interop.from_torch(cell, sd)
        np.testing.assert_array_equal(p.w_ih, sd["weight_ih_l0"].T)
        np.testing.assert_array_equal(p.w_hh, sd["weight_hh_l0"].T)
        if g == 3:
            b_hh = sd["bias_hh_l0"]
            np.testing.assert_array_equal(p.b[: 2 * H], sd["bias_ih_l0"][: 2 * H] + b_hh[: 2 * H])
            np.testing.assert_array_equal(p.b[2 * H :], sd["bias_ih_l0"][2 * H :])
            np.testing.assert_array_equal(p.b_hn, b_hh[2 * H :])
            back = interop.to_torch(cell, p)
            np.testing.assert_array_equal(back["bias_hh_l0"][: 2 * H], 0.0)
            np.testing.assert_array_equal(back["bias_hh_l0"][2 * H :], b_hh[2 * H :])
        else:
            np.testing.assert_array_equal(p.b, sd["bias_ih_l0"] + sd["bias_hh_l0"])
            back = interop.to_torch(cell, p)
            np.testing.assert_array_equal(back["bias_hh_l0"], 0.0)
        assert p.w_ih.dtype == jnp.float32


class FakeTensor:
    """Quacks like a torch tensor that requires grad: no __array__ until detached."""

    def __init__(self, value, requires_grad=True):
        self.value, self.requires_grad = np.asarray(value), requires_grad

    def __array__(self, dtype=None, copy=None):
        if self.requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad.")
        return self.value if dtype is None else self.value.astype(dtype)

    def detach(self):
        return FakeTensor(self.value, requires_grad=False)

    def cpu(self):
        return self

    def numpy(self):
        return self.value


def test_torch_accepts_tensor_like_and_prefix():
    sd = section(load("gru", "uni_"), "w.")
    want = interop.from_torch(js.GRU(H), sd)
    fake = {f"encoder.rnn.{k}": FakeTensor(v) for k, v in sd.items()}
    fake["encoder.embed.weight"] = FakeTensor(np.zeros((3, 2), np.float32))
    got = interop.from_torch(js.GRU(H), fake, prefix="encoder.rnn.")
    chex.assert_trees_all_equal(got, want)
    stack, params = interop.stack_from_torch(js.GRU(H), fake, prefix="encoder.rnn.")
    assert stack.layers == (js.GRU(H),)
    chex.assert_trees_all_equal(params[0], want)
    assert "encoder.rnn.weight_ih_l0" in interop.to_torch(js.GRU(H), want, prefix="encoder.rnn.")


def test_torch_live_module_if_installed():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.LSTM(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    stack, params = interop.stack_from_torch(js.LSTM(4), dict(module.named_parameters()))
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        out, (h_n, c_n) = module(x)
    run = jax.jit(lambda p, x: js.rollout(stack, p, x))
    carries, ys = run(params, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(ys, out.numpy(), **TOL)
    np.testing.assert_allclose(torch_final_states(carries, "h"), h_n.numpy(), **TOL)
    np.testing.assert_allclose(torch_final_states(carries, "c"), c_n.numpy(), **TOL)
    module.load_state_dict(
        {k: torch.from_numpy(v) for k, v in interop.stack_to_torch(stack, params).items()}
    )
    with torch.no_grad():
        out2, _ = module(x)
    np.testing.assert_allclose(out2.numpy(), out.numpy(), **TOL)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (2, False), (2, True)])
def test_torch_live_initial_state_through_carry_from_torch(kind, num_layers, bidirectional):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    modules = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
    cells = {"lstm": js.LSTM(4), "gru": js.GRU(4), "rnn": js.RNN(4)}
    module = modules[kind](3, 4, num_layers=num_layers, bidirectional=bidirectional)
    rows = num_layers * (2 if bidirectional else 1)
    x, h0, c0 = torch.randn(5, 2, 3), torch.randn(rows, 2, 4), torch.randn(rows, 2, 4)
    hx = (h0, c0) if kind == "lstm" else h0
    with torch.no_grad():
        out, hn = module(x, hx)
    stack, params = interop.stack_from_torch(cells[kind], dict(module.named_parameters()))
    carry = interop.carry_from_torch(stack, hx)
    final, ys = jax.jit(lambda p, x, c: js.rollout(stack, p, x, c))(
        params, jnp.asarray(x.numpy()), carry
    )
    np.testing.assert_allclose(ys, out.numpy(), **TOL)
    got = interop.carry_to_torch(stack, final)
    for g, w in zip(got, hn) if kind == "lstm" else [(got, hn)]:
        np.testing.assert_allclose(g, w.numpy(), **TOL)
    # the first layer alone (a cell or a Bidirectional) takes its own rows of h0
    first = modules[kind](3, 4, bidirectional=bidirectional)
    first.load_state_dict({k: v for k, v in module.state_dict().items() if "_l0" in k})
    hx0 = tuple(t[: rows // num_layers] for t in hx) if kind == "lstm" else h0[: rows // num_layers]
    with torch.no_grad():
        out0, _ = first(x, hx0)
    layer0 = interop.carry_from_torch(stack.layers[0], hx0)
    _, ys0 = js.rollout(stack.layers[0], params[0], jnp.asarray(x.numpy()), layer0)
    np.testing.assert_allclose(ys0, out0.numpy(), **TOL)


@pytest.mark.parametrize("layer", [
    js.LSTM(3),
    js.GRU(3),
    js.Bidirectional(js.RNN(3)),
    js.Stack([js.LSTM(3), js.LSTM(3), js.LSTM(3)]),
    js.Stack([js.Bidirectional(js.GRU(3)), js.Bidirectional(js.GRU(3))]),
])  # fmt: skip
def test_carry_from_torch_round_trip_and_row_order(layer):
    groups = interop.torch._torch_directions(layer)
    rows = sum(len(g) for g in groups)
    is_lstm = isinstance(groups[0][0], js.LSTM)
    # row r holds the value r (h) and -r (c), so every row can be traced to its place
    h0 = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None, None], (rows, 2, 3)).copy()
    hx = (h0, -h0) if is_lstm else h0
    carry = interop.carry_from_torch(layer, hx)
    layer.check_carry(carry, (2,))
    per_layer = carry if isinstance(layer, js.Stack) else (carry,)
    row = 0
    for c in per_layer:
        parts = [c.forward, c.backward] if isinstance(c, js.recurrent.BidirectionalCarry) else [c]
        for part in parts:
            np.testing.assert_array_equal(part.h, np.full((2, 3), row))
            if is_lstm:
                np.testing.assert_array_equal(part.c, np.full((2, 3), -row))
            row += 1
    back = interop.carry_to_torch(layer, carry)
    for got, want in zip(back, hx) if is_lstm else [(back, hx)]:
        np.testing.assert_array_equal(got, want)
    # unbatched PyTorch input: [L * dirs, H]
    unbatched = interop.carry_from_torch(layer, tuple(a[:, 0] for a in hx) if is_lstm else h0[:, 0])
    assert jax.tree_util.tree_leaves(unbatched)[0].shape == (3,)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["lstm", "gru", "rnn"]),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch=st.lists(st.integers(1, 3), max_size=2),
    hidden=st.integers(1, 4),
    single=st.booleans(),
)
def test_carry_to_torch_inverts_carry_from_torch_for_any_layout(
    kind, num_layers, bidirectional, batch, hidden, single
):
    cell = {"lstm": js.LSTM, "gru": js.GRU, "rnn": js.RNN}[kind](hidden)
    one = js.Bidirectional(cell) if bidirectional else cell
    layer = one if single else js.Stack([one] * num_layers)
    rows = (1 if single else num_layers) * (2 if bidirectional else 1)
    rng = np.random.default_rng(len(batch) * 100 + rows * 10 + hidden)
    states = [rng.standard_normal((rows, *batch, hidden)).astype(np.float32) for _ in range(2)]
    hx = tuple(states) if kind == "lstm" else states[0]
    carry = interop.carry_from_torch(layer, hx)
    layer.check_carry(carry, tuple(batch))  # the structure js.rollout takes
    back = interop.carry_to_torch(layer, carry)
    for got, want in zip(back, hx) if kind == "lstm" else [(back, hx)]:
        np.testing.assert_array_equal(got, want)


def test_carry_from_torch_validation():
    stack = js.Stack([js.Bidirectional(js.LSTM(3)), js.Bidirectional(js.LSTM(3))])
    h0 = np.zeros((4, 2, 3), np.float32)
    with pytest.raises(TypeError, match=r"^hx: expected the pair \(h0, c0\) for a js.LSTM, as nn.LSTM takes it, got ndarray"):  # fmt: skip
        interop.carry_from_torch(stack, h0)
    with pytest.raises(ValueError, match=r"^hx\[0\] \(h0\): expected shape \[num_layers \* num_directions=4, \*B, H=3\] \(2 layer\(s\) x 2 direction\(s\)\), got float32\[2, 2, 3\]"):  # fmt: skip
        interop.carry_from_torch(stack, (h0[:2], h0[:2]))
    with pytest.raises(
        ValueError, match=r"^hx\[1\] \(c0\): expected shape .*H=3.*got float32\[4, 2, 5\]"
    ):
        interop.carry_from_torch(stack, (h0, np.zeros((4, 2, 5), np.float32)))
    with pytest.raises(ValueError, match=r"^hx\[1\] \(c0\): expected the shape of h0 \[4, 2, 3\], got float32\[4, 1, 3\]"):  # fmt: skip
        interop.carry_from_torch(stack, (h0, h0[:, :1]))
    with pytest.raises(TypeError, match=r"^hx: expected h0 \(one array\) for a js.GRU, as nn.RNN/nn.GRU take it, got a tuple of 2"):  # fmt: skip
        interop.carry_from_torch(js.GRU(3), (h0[:1], h0[:1]))
    with pytest.raises(TypeError, match=r"^hx \(h0\): expected a floating dtype"):
        interop.carry_from_torch(js.GRU(3), np.zeros((1, 2, 3), np.int32))
    with pytest.raises(
        TypeError, match=r"^layer.layers\[1\]: expected js.RNN, js.LSTM or js.GRU .*got MinGRU"
    ):
        interop.carry_from_torch(js.Stack([js.GRU(3), js.MinGRU(3)]), h0[:2])
    with pytest.raises(ValueError, match=r"^layer: a PyTorch module has one cell type and hidden size for all layers, got js.GRU\(3\), js.GRU\(4\)"):  # fmt: skip
        interop.carry_from_torch(js.Stack([js.GRU(3), js.GRU(4)]), h0[:2])
    with pytest.raises(TypeError, match=r"carry: expected a tuple of 2 layer carries"):
        interop.carry_to_torch(stack, stack.layers[0].initial_carry((2,)))
    with pytest.raises(TypeError, match=r"^carry: expected the carry of GRU"):
        interop.carry_to_torch(js.GRU(3), None)


# -- PyTorch validation ----------------------------------------------------------------------


def small_sd(g, h=H, d=3, bias=True, layer=0):
    sd = {
        f"weight_ih_l{layer}": np.zeros((g * h, d), np.float32),
        f"weight_hh_l{layer}": np.zeros((g * h, h), np.float32),
    }
    if bias:
        sd[f"bias_ih_l{layer}"] = np.zeros((g * h,), np.float32)
        sd[f"bias_hh_l{layer}"] = np.zeros((g * h,), np.float32)
    return sd


def test_torch_wrong_cell_type_names_key_and_shapes():
    with pytest.raises(
        ValueError,
        match=r"weight_ih_l0'\] for js\.GRU\(hidden_size=6\): expected shape "
        r"\[3\*H=18, D\], got float32\[24, 3\] \(that is 4\*H: weights of a LSTM",
    ):
        interop.from_torch(js.GRU(H), small_sd(4))
    with pytest.raises(ValueError, match=r"weights of a GRU, not a LSTM"):
        interop.from_torch(js.LSTM(H), small_sd(3))
    with pytest.raises(ValueError, match=r"weight_hh_l0'\] .*expected shape \[4\*H=20, H=5\]"):
        interop.from_torch(js.LSTM(5), {**small_sd(4, h=5), "weight_hh_l0": np.zeros((20, 6))})
    with pytest.raises(ValueError, match=r"\[4\*H=20, D\], got float32\[24, 3\]"):
        interop.from_torch(js.LSTM(5), small_sd(4))  # hidden size 6 weights for H=5


def test_torch_missing_and_bad_keys():
    with pytest.raises(ValueError, match=r"missing key 'weight_ih_l1_reverse' \(layer=1"):
        interop.from_torch(js.GRU(H), small_sd(3), layer=1, reverse=True)
    sd = small_sd(3)
    del sd["bias_hh_l0"]
    with pytest.raises(ValueError, match=r"missing key 'bias_hh_l0': expected both biases"):
        interop.from_torch(js.GRU(H), sd)
    with pytest.raises(
        ValueError, match=r"bias_ih_l0'\] .*expected shape \[3\*H=18\], got float32\[17\]"
    ):
        interop.from_torch(js.GRU(H), {**small_sd(3), "bias_ih_l0": np.zeros((17,), np.float32)})
    with pytest.raises(TypeError, match=r"weight_hh_l0'\]: expected a floating dtype, got int32"):
        interop.from_torch(js.RNN(H), {**small_sd(1), "weight_hh_l0": np.zeros((H, H), np.int32)})
    with pytest.raises(ValueError, match=r"weight_hr_l0'\]: LSTMs with proj_size"):
        interop.from_torch(js.LSTM(H), {**small_sd(4), "weight_hr_l0": np.zeros((2, H))})
    with pytest.raises(TypeError, match=r"state_dict: expected a mapping"):
        interop.from_torch(js.LSTM(H), [np.zeros(3)])
    with pytest.raises(TypeError, match=r"cell: expected js.RNN, js.LSTM or js.GRU"):
        interop.from_torch(js.Bidirectional(js.LSTM(H)), small_sd(4))
    with pytest.raises(ValueError, match=r"layer: expected a non-negative int, got -1"):
        interop.from_torch(js.LSTM(H), small_sd(4), layer=-1)


def test_torch_stack_validation():
    with pytest.raises(ValueError, match=r"no key 'weight_ih_l<k>' found"):
        interop.stack_from_torch(js.GRU(H), {"fc.weight": np.zeros((2, 2))})
    sd = {**small_sd(3), **small_sd(3, d=H, layer=1)}
    sd["weight_ih_l0_reverse"] = sd["weight_ih_l0"]
    with pytest.raises(ValueError, match=r"missing key 'weight_ih_l1_reverse'"):
        interop.stack_from_torch(js.GRU(H), sd)
    sd = {k: FakeTensor(v) for k, v in {**small_sd(3), **small_sd(3, d=5, layer=1)}.items()}
    with pytest.raises(
        ValueError,
        match=r"weight_ih_l1'\] .*expected shape \[3\*H=18, D=6\].*got float32\[18, 5\]",
    ):
        interop.stack_from_torch(js.GRU(H), sd)
    sd = {**small_sd(3), "weight_ih_l0_reverse": np.zeros((18, 4), np.float32)}
    sd["weight_hh_l0_reverse"] = sd["weight_hh_l0"]
    with pytest.raises(
        ValueError, match=r"weight_ih_l0_reverse'\]: expected shape \[18, 3\] like the forward"
    ):
        interop.stack_from_torch(js.GRU(H), sd, prefix="")
    mixed = js.Stack((js.GRU(H), js.LSTM(H)))
    params = (
        interop.from_torch(js.GRU(H), small_sd(3)),
        interop.from_torch(js.LSTM(H), small_sd(4, d=H)),
    )
    with pytest.raises(ValueError, match=r"one cell type, hidden size and direction count"):
        interop.stack_to_torch(mixed, params)
    with pytest.raises(ValueError, match=r"params: expected a tuple of 2 layer params"):
        interop.stack_to_torch(mixed, params[:1])


def test_to_torch_bias_false_needs_zero_bias():
    cell = js.LSTM(H)
    params = interop.from_torch(cell, small_sd(4))
    interop.to_torch(cell, params, bias=False)  # zero biases: fine
    params = params._replace(b=params.b.at[H].set(1.0))
    with pytest.raises(ValueError, match=r"params.b: bias=False needs zero biases"):
        interop.to_torch(cell, params, bias=False)
    with pytest.raises(TypeError, match=r"params: expected GRUParams for GRU, got LSTMParams"):
        interop.to_torch(js.GRU(H), params)


# -- Flax parity (live) ----------------------------------------------------------------------

FLAX_CASES = {
    "LSTMCell": (lambda: nn.LSTMCell(H), js.LSTM(H), {}),
    "OptimizedLSTMCell": (lambda: nn.OptimizedLSTMCell(H), js.LSTM(H), {}),
    "GRUCell": (lambda: nn.GRUCell(H), js.GRU(H), {}),
    "SimpleCell": (lambda: nn.SimpleCell(H), js.RNN(H), {}),
    "SimpleCell-relu": (lambda: nn.SimpleCell(H, activation_fn=nn.relu), js.RNN(H, "relu"), {}),
    "SimpleCell-residual": (
        lambda: nn.SimpleCell(H, residual=True),
        js.RNN(H),
        {"residual": True},
    ),
}


def normal(seed, shape, scale=1.0):
    """Standard normal float32 draws from numpy (no per-shape jax compilation)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_flax_variables(flax_cell, seed, d):
    """Flax's own variable tree (names, shapes) with every leaf drawn at random.

    Only the structure comes from ``flax_cell.init`` (traced, not run); random
    leaves also keep flax's zero default biases from hiding bias mix-ups.
    """
    carry = jax.eval_shape(lambda: flax_cell.initialize_carry(jax.random.key(0), (1, d)))
    shapes = jax.eval_shape(flax_cell.init, jax.random.key(0), carry, jnp.zeros((1, d)))
    rng = np.random.default_rng(seed)
    draw = lambda leaf: jnp.asarray(0.4 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map(draw, shapes)


@pytest.mark.parametrize("case", list(FLAX_CASES))
def test_flax_cell_parity_step_by_step(case):
    make, cell, kw = FLAX_CASES[case]
    flax_cell, d, t = make(), 4, 5
    variables = random_flax_variables(flax_cell, 0, d)
    params = interop.from_flax(cell, variables, **kw)
    jax.tree_util.tree_map(  # the inner dict works too
        np.testing.assert_array_equal, interop.from_flax(cell, variables["params"], **kw), params
    )
    xs = normal(1, (t, 2, 3, d))
    carry_js = jax.tree_util.tree_map(lambda z: normal(2, z.shape, 0.5), cell.initial_carry((2, 3)))
    carry_fx = interop.carry_to_flax(cell, carry_js)
    flax_step, js_step = jax.jit(flax_cell.apply), jax.jit(cell.step)
    for i in range(t):
        carry_fx, y_fx = flax_step(variables, carry_fx, xs[i])
        carry_js, y_js = js_step(params, carry_js, xs[i])
        np.testing.assert_allclose(y_js, y_fx, err_msg=f"step {i}", **TOL)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, **TOL),
            carry_js,
            interop.carry_from_flax(cell, carry_fx),
        )

    back = interop.to_flax(cell, params, **kw)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, variables
    )


@pytest.mark.parametrize("case", ["LSTMCell", "GRUCell", "SimpleCell"])
def test_flax_rnn_parity_with_lengths(case):
    """nn.RNN (batch-major, seq_lengths) vs js.rollout (time-major, lengths)."""
    make, cell, kw = FLAX_CASES[case]
    d, t = 3, 6
    rnn = nn.RNN(make(), return_carry=True)
    variables = random_flax_variables(make(), 3, d)
    variables = {"params": {"cell": variables["params"]}}  # nn.RNN nests the cell's params
    # No length 0 here: flax then returns the carry of the last padded step, jaxseq the initial one.
    lengths = jnp.array([6, 2, 4, 1], jnp.int32)
    xs_bt = normal(4, (4, t, d))
    carry_fx, ys_fx = jax.jit(rnn.apply)(variables, xs_bt, seq_lengths=lengths)
    params = interop.from_flax(cell, variables, **kw)
    run = jax.jit(lambda p, xs: js.rollout(cell, p, xs, lengths=lengths))
    carry_js, ys_js = run(params, jnp.swapaxes(xs_bt, 0, 1))
    valid = (jnp.arange(t)[None, :] < lengths[:, None])[..., None]
    ys_fx = jnp.where(valid, ys_fx, 0.0)  # flax leaves padded outputs as they fall
    np.testing.assert_allclose(jnp.swapaxes(ys_js, 0, 1), ys_fx, **TOL)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, **TOL),
        carry_js,
        interop.carry_from_flax(cell, carry_fx),
    )


def test_flax_from_js_params_drive_flax_cell():
    """to_flax of jaxseq params gives a flax GRUCell equal to js.GRU."""
    cell = js.GRU(H)
    params = js.recurrent.GRUParams(
        normal(5, (3, 3 * H)), normal(6, (H, 3 * H)), normal(7, (3 * H,)), normal(8, (H,))
    )
    x = normal(9, (2, 3))
    h0 = jnp.ones((2, H)) * 0.3
    h_fx, _ = nn.GRUCell(H).apply(interop.to_flax(cell, params), h0, x)
    h_js, _ = cell.step(params, js.recurrent.RNNCarry(h0), x)
    np.testing.assert_allclose(h_js.h, h_fx, **TOL)


def test_flax_validation():
    gru_vars = random_flax_variables(nn.GRUCell(H), 10, 3)
    with pytest.raises(
        ValueError,
        match=r"variables\['params'\]: missing \['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io'\] "
        r"for flax LSTMCell/OptimizedLSTMCell params; got keys .*look like flax GRUCell",
    ):
        interop.from_flax(js.LSTM(H), gru_vars)
    with pytest.raises(
        ValueError,
        match=r"\['ir'\]\['kernel'\] for js.GRU\(hidden_size=5\): expected shape \[D=3, H=5\], got float32\[3, 6\]",
    ):
        interop.from_flax(js.GRU(5), gru_vars)
    bad = jax.tree_util.tree_map(lambda x: x, gru_vars)
    bad["params"]["hn"] = {"kernel": gru_vars["params"]["hn"]["kernel"]}
    with pytest.raises(ValueError, match=r"\['hn'\]: missing 'bias'"):
        interop.from_flax(js.GRU(H), bad)
    bad["params"]["hn"] = dict(gru_vars["params"]["hn"], bias=jnp.zeros((H + 1,)))
    with pytest.raises(
        ValueError, match=r"\['hn'\]\['bias'\] .*expected shape \[H=6\], got float32\[7\]"
    ):
        interop.from_flax(js.GRU(H), bad)
    bad["params"]["in"] = dict(gru_vars["params"]["in"], kernel=jnp.zeros((4, H)))
    with pytest.raises(
        ValueError, match=r"\['in'\]\['kernel'\] .*expected shape \[D=3, H=6\], got float32\[4, 6\]"
    ):
        interop.from_flax(js.GRU(H), bad)
    with pytest.raises(ValueError, match=r"residual: only flax SimpleCell has it"):
        interop.from_flax(js.GRU(H), gru_vars, residual=True)
    with pytest.raises(TypeError, match=r"variables: expected a mapping"):
        interop.from_flax(js.GRU(H), [1, 2])
    with pytest.raises(TypeError, match=r"carry: expected flax LSTM carry \(c, h\)"):
        interop.carry_from_flax(js.LSTM(H), jnp.zeros((2, H)))
