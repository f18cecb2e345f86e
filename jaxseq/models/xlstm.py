"""The xLSTM stack (Beck et al. 2024): mLSTM blocks with an sLSTM block among them.

The paper writes a stack ``xLSTM[a:b]`` for ``a`` mLSTM blocks to ``b`` sLSTM
blocks; its language models are ``xLSTM[7:1]`` (one sLSTM in every eight
blocks) and ``xLSTM[1:0]`` (mLSTM only). The ``xlstm`` package places the sLSTM
blocks by index (``slstm_at``); so does :func:`xlstm_stack`, and by default it
puts one at index 1 of every group of eight layers (index 1, 9, 17, ...), which
is ``xLSTM[7:1]`` for eight layers, ``[1:1]`` for two and ``[1:0]`` for one.

The layers are the cells :class:`jaxseq.recurrent.MLSTM` and
:class:`jaxseq.recurrent.SLSTM` (the paper's block cores: gates, memories and
output gates) in a :class:`jaxseq.Stack`, by default with residual connections
from the second layer on. A model takes it as any stack::

    stack = js.models.xlstm_stack(256, 4)                   # mLSTM, sLSTM, mLSTM, mLSTM
    lm = js.models.RecurrentLM(vocab_size, 64, stack)
    lm = js.models.char_lm(vocab_size, cell="xlstm", num_layers=4, hidden_size=256)  # the same
"""

from __future__ import annotations

from jaxseq import _checks
from jaxseq.recurrent.layers import Bidirectional, Stack
from jaxseq.recurrent.mlstm import MLSTM
from jaxseq.recurrent.slstm import SLSTM

__all__ = [
    "xlstm_stack",
]


def _slstm_at(slstm_at, num_layers: int) -> tuple:
    if slstm_at is None:
        return tuple(range(1, num_layers, 8))
    if isinstance(slstm_at, int | bool) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in slstm_at
    ):
        raise TypeError(f"slstm_at: expected a sequence of layer indices (ints), got {slstm_at!r}")
    at = tuple(slstm_at)
    bad = [i for i in at if not 0 <= i < num_layers]
    if bad or len(set(at)) != len(at):
        raise ValueError(
            f"slstm_at: expected distinct layer indices in [0, {num_layers}) "
            f"(num_layers={num_layers}), got {list(at)}"
        )
    return at


def xlstm_stack(
    hidden_size: int,
    num_layers: int,
    *,
    slstm_at=None,
    num_heads: int = 4,
    residual: bool = True,
    bidirectional: bool = False,
    dropout_rate: float = 0.0,
    variational_dropout: bool = False,
    mlstm_kwargs=None,
    slstm_kwargs=None,
) -> Stack:
    """A :class:`jaxseq.Stack` of ``num_layers`` mLSTM cells with sLSTM cells at ``slstm_at``.

    Args:
      hidden_size: H of every layer (each direction), a multiple of ``num_heads``.
      num_layers: the number of layers.
      slstm_at: the indices of the sLSTM layers (default: index 1 of every group of
        eight, ``xLSTM[7:1]``; ``()``: mLSTM only, ``xLSTM[1:0]``).
      num_heads: the heads of both cells (K).
      residual: add each layer's input to its output from the second layer on.
      bidirectional: wrap every layer in a :class:`jaxseq.Bidirectional`.
      dropout_rate, variational_dropout: dropout between layers, as :class:`jaxseq.Stack`.
      mlstm_kwargs, slstm_kwargs: further settings of each kind of cell.

    Inputs ``[T, *B, D]`` (time-major), outputs ``[T, *B, H]`` (``2H`` bidirectional);
    the carry is a tuple of the layers' carries (``MLSTMState``, ``SLSTMCarry``).

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> stack = js.models.xlstm_stack(8, 3, num_heads=2)
    >>> [type(layer).__name__ for layer in stack.layers]
    ['MLSTM', 'SLSTM', 'MLSTM']
    >>> carries, ys = js.rollout(stack, stack.init(jax.random.key(0), 5), jnp.ones((4, 2, 5)))
    >>> ys.shape, carries[0].c.shape, carries[1].h.shape   # [T, B, H]; [B, K, H/K, H/K]
    ((4, 2, 8), (2, 2, 4, 4), (2, 8))
    """
    h = _checks.check_positive_int("hidden_size", hidden_size)
    n = _checks.check_positive_int("num_layers", num_layers)
    at = _slstm_at(slstm_at, n)
    m_kw = {"num_heads": num_heads, **dict(mlstm_kwargs or {})}
    s_kw = {"num_heads": num_heads, **dict(slstm_kwargs or {})}
    layers = []
    for i in range(n):
        cell = SLSTM(h, **s_kw) if i in at else MLSTM(h, **m_kw)
        layers.append(Bidirectional(cell) if bidirectional else cell)
    return Stack(
        tuple(layers),
        residual=residual,
        dropout_rate=dropout_rate,
        variational_dropout=variational_dropout,
    )
