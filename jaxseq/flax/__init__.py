"""Flax modules over the jaxseq kernels: ``jaxseq.flax.linen`` and ``jaxseq.flax.nnx``.

Drop-in replacements for ``flax.linen.RNN``/``Bidirectional`` and
``flax.nnx.RNN``/``Bidirectional`` (same call signatures, same outputs, same
carries) that run a jaxseq cell or layer through :func:`jaxseq.rollout` (fused
kernels) instead of Flax's per-step scan::

    nn.RNN(nn.OptimizedLSTMCell(256))          ->  jaxseq.flax.linen.RNN(js.LSTM(256))
    nnx.RNN(nnx.OptimizedLSTMCell(d, 256, rngs=rngs))
                                               ->  jaxseq.flax.nnx.RNN(js.LSTM(256), d, rngs=rngs)

``jaxseq.flax.linen.variables_from_flax`` and ``jaxseq.flax.nnx.from_flax``
take over the weights of a trained Flax model. Flax is optional: ``import
jaxseq`` never imports it, and importing this package without it raises an
``ImportError`` that says how to install it.

>>> import jaxseq.flax
>>> sorted(name for name in ("linen", "nnx") if hasattr(jaxseq.flax, name))
['linen', 'nnx']
"""

try:
    import flax  # noqa: F401
except ImportError:
    raise ImportError(
        "jaxseq.flax needs Flax (linen and nnx modules over the jaxseq kernels): "
        "pip install flax  (or pip install -e '.[dev]')"
    ) from None

from jaxseq.flax import linen, nnx  # noqa: E402

__all__ = ["linen", "nnx"]
