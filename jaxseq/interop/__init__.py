"""Bring weights from PyTorch and Flax, and take them back.

PyTorch (``nn.RNN``/``nn.LSTM``/``nn.GRU`` state dicts; torch is never imported,
any array-like works, torch tensors included)::

    params = js.interop.from_torch(js.LSTM(256), module.state_dict(), layer=1, reverse=True)
    sd = js.interop.to_torch(js.LSTM(256), params, layer=1, reverse=True)   # numpy arrays
    stack, params = js.interop.stack_from_torch(js.GRU(256), module.state_dict())
    carry = js.interop.carry_from_torch(stack, h0)         # (h0, c0) for an LSTM
    carries, ys = js.rollout(stack, params, xs, carry, lengths=lengths)
    h_n = js.interop.carry_to_torch(stack, carries)         # [L * dirs, B, H], as torch

Flax linen (``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``, ``SimpleCell``)::

    params = js.interop.from_flax(js.GRU(256), variables)      # {'params': ...} or inner dict
    variables = js.interop.to_flax(js.GRU(256), params)        # {'params': ...}

Layouts. jaxseq stores ``w_ih: [D, G*H]``, ``w_hh: [H, G*H]`` with gates in
PyTorch's order (RNN: one; LSTM: i, f, g, o; GRU: r, z, n), ``b: [G*H]`` and for
the GRU ``b_hn: [H]``. PyTorch stores ``weight_ih_l{k}: [G*H, D]`` (the
transpose), ``weight_hh_l{k}: [G*H, H]`` and two biases; the maps are

* RNN, LSTM: ``w_ih = weight_ih.T``, ``w_hh = weight_hh.T``, ``b = bias_ih + bias_hh``;
* GRU: ``b = bias_ih + [bias_hh_r, bias_hh_z, 0]``, ``b_hn = bias_hh_n`` (the n
  gate's recurrent bias sits inside the reset, so it cannot be folded);
* ``bias=False`` modules give zero biases.

Going back, :func:`to_torch` puts the whole bias in ``bias_ih`` and zeros in
``bias_hh`` (except the GRU's n part, which is ``b_hn``): the same function,
not the same numbers. :func:`grads_to_torch` maps *gradients* instead (the
adjoint of :func:`from_torch`: both biases get the gradient of ``b``), so they
equal what ``.grad`` holds after PyTorch's backward pass.

Flax cells keep one ``[in, H]`` kernel per gate (``ii``, ``hf``, ...); their
equations are exactly jaxseq's: LSTMCell/OptimizedLSTMCell (same parameter
names) put the bias on the recurrent side (``hi``..``ho``), GRUCell has input
biases ``ir``/``iz``/``in`` and the reset-wrapped ``hn`` bias, SimpleCell has
``i`` (kernel, bias) and ``h`` (kernel). Flax's LSTM carry is ``(c, h)``;
jaxseq's is ``LSTMCarry(h, c)``: see :func:`carry_from_flax`.

Activations are not stored in weights: the jaxseq cell you pass decides them
(``js.RNN(H, activation="relu")`` for ``nn.RNN(nonlinearity="relu")`` or
``SimpleCell(activation_fn=nn.relu)``).

Every function validates its input and raises ``ValueError``/``TypeError`` that
names the key, the expected and the actual shape.
"""

from jaxseq.interop.flax import carry_from_flax, carry_to_flax, from_flax, to_flax
from jaxseq.interop.torch import (
    carry_from_torch,
    carry_to_torch,
    from_torch,
    grads_to_torch,
    stack_from_torch,
    stack_grads_to_torch,
    stack_to_torch,
    to_torch,
)

__all__ = [
    "carry_from_flax",
    "carry_to_flax",
    "carry_from_torch",
    "carry_to_torch",
    "from_flax",
    "from_torch",
    "grads_to_torch",
    "stack_from_torch",
    "stack_grads_to_torch",
    "stack_to_torch",
    "to_flax",
    "to_torch",
]
