"""The train state and a jitted train step for any task, with a non-finite guard.

The contract::

    loss_fn(params, carry, batch, key) -> (loss, (new_carry, metrics))

``batch`` is any pytree of arrays (a dict, a NamedTuple such as
:class:`jaxseq.data.Chunk`, ...); ``carry`` is the recurrent state carried from
one batch to the next in truncated BPTT, or ``None`` for tasks without one;
``metrics`` is a dict of scalars (may be empty); ``key`` is the step's PRNG key
(``fold_in(state.key, state.step)``), for dropout.

**Truncated BPTT.** The step runs the loss from the carry the previous batch
left (``state.carry``), backpropagates through this batch only (the incoming
carry is a constant: ``stop_gradient``) and stores the new carry for the next
batch. With a carry, every leaf of the batch is time-major ``[K, B, ...]``
(K steps, B streams) and B must be the carry's batch size. Batches of one
shape compile once; ``chunks_per_call=n`` scans over n stacked batches (every
leaf ``[n, ...]``) inside one jitted call.

**Non-finite guard.** A step whose loss or gradient norm is NaN/Inf keeps the
previous params, optimizer state and carry bit for bit, adds one to
``state.bad_steps`` and ``state.bad_streak`` (reset by the next good step) and
reports ``finite = False`` in its metrics. :func:`jaxseq.training.fit` warns at
the first such step and raises :class:`jaxseq.training.NonFiniteError` after
``max_bad_steps`` of them in a row, or when no step of a run applied an update.

**Mixed precision.** ``precision="bf16"`` runs the loss on bfloat16 casts of
float32 master weights; the loss, gradient norm and update stay float32
(:mod:`jaxseq.training.precision`).

**Several devices or processes.** The same step runs data-parallel when the
state and the batch are placed on a mesh (:func:`jaxseq.training.shard_state`,
:func:`jaxseq.training.shard_batch`, or ``fit(mesh=...)``): XLA inserts the
gradient all-reduce, so the update equals that of one device with the whole batch.

Shapes: K chunk length (time), B streams (batch), n batches per call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import _checks
from jaxseq.training.precision import cast_floating, compute_dtype

__all__ = [
    "TrainState",
    "TrainStep",
    "init_state",
    "make_train_step",
]


class TrainState(NamedTuple):
    """Everything a run needs to continue: made by :func:`init_state`, updated by a step.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> state = js.init_state({"w": jnp.zeros(2)}, js.make_optimizer("sgd", 0.1), jax.random.key(0))
    >>> int(state.step), state.carry is None
    (0, True)
    """

    params: Any
    opt_state: Any
    step: jax.Array  # int32[]: steps taken (good and bad); the data position
    key: jax.Array  # PRNG key; the step's dropout key is fold_in(key, step)
    carry: Any  # recurrent state carried from batch to batch ([B, H] leaves), or None
    bad_steps: jax.Array  # int32[]: non-finite steps so far (skipped)
    bad_streak: jax.Array  # int32[]: consecutive non-finite steps up to now


def _check_optimizer(optimizer) -> None:
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            "optimizer: expected an optax.GradientTransformation (e.g. js.make_optimizer(...)), "
            f"got {type(optimizer).__name__}"
        )


def init_state(params, optimizer, key, carry=None) -> TrainState:
    """A fresh :class:`TrainState` at step 0.

    Args:
      params: the model's parameter pytree.
      optimizer: any ``optax.GradientTransformation`` (e.g. :func:`make_optimizer`).
      key: a ``jax.random`` key; the key of step s is ``fold_in(key, s)``.
      carry: the initial recurrent state (e.g. ``model.initial_carry((B,))``), or None.

    >>> import jax, jax.numpy as jnp, optax, jaxseq as js
    >>> state = js.init_state({"w": jnp.ones((2, 3))}, optax.sgd(0.1), jax.random.key(0),
    ...                       carry=jnp.zeros((4, 8)))
    >>> state.carry.shape, int(state.bad_steps)
    ((4, 8), 0)
    """
    _check_optimizer(optimizer)
    _checks.check_key("key", key)
    z = jnp.zeros((), jnp.int32)
    state = TrainState(params, optimizer.init(params), z, key, carry, z, z)
    # distinct buffers for every leaf (shared zeros cannot be donated twice)
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)


def _check_batch(batch, carry_batch: tuple | None, n: int) -> None:
    """Validates a batch pytree in Python, before anything is traced."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(
            f"batch: expected a pytree of arrays, got {type(batch).__name__} with none"
        )
    for path, leaf in leaves:
        name = "batch" + jax.tree_util.keystr(path)
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"{name}: expected an array, got {type(leaf).__name__}")
        if not (jnp.issubdtype(leaf.dtype, jnp.number) or jnp.issubdtype(leaf.dtype, jnp.bool_)):
            raise TypeError(f"{name}: expected a numeric or bool array, got dtype {leaf.dtype}")
        shape = tuple(np.shape(leaf))
        if n > 1 and (not shape or shape[0] != n):
            raise ValueError(
                f"{name}: expected a leading axis of n={n} stacked batches (chunks_per_call), "
                f"got shape {list(shape)}"
            )
        if carry_batch is not None:
            axis = 1 if n == 1 else 2
            if shape[axis : axis + len(carry_batch)] != carry_batch:
                lay = "[K, B, ...]" if n == 1 else f"[n={n}, K, B, ...]"
                raise ValueError(
                    f"batch: {name} has shape {list(shape)}; with a carry every leaf is "
                    f"time-major {lay} (axis {axis} = B), but state.carry is for batch "
                    f"{list(carry_batch)}"
                )


def _carry_batch(carry):
    """``*B`` of a carry: the longest prefix of every leaf's ``shape[:-1]`` (leaves
    ``[*B, H]``, or ``[*B, K, Dk, Dv]`` beside ``[*B, K]`` as an mLSTM's)."""
    shapes = [tuple(leaf.shape[:-1]) for leaf in jax.tree_util.tree_leaves(carry)]
    if not shapes:
        return None
    b = min(shapes, key=len)
    for s in shapes:
        while s[: len(b)] != b:
            b = b[:-1]
    return b


class TrainStep:
    """The jitted train step made by :func:`make_train_step`.

    ``step(state, batch) -> (state, metrics)``; validates ``batch`` in Python
    before calling the compiled function; ``traces`` counts how often it traced
    (once per batch shape); ``chunks_per_call`` is n.

    >>> import jax, jax.numpy as jnp, optax, jaxseq as js
    >>> loss_fn = lambda p, c, b, k: (jnp.sum((p["w"] - b["x"]) ** 2), (c, {}))
    >>> step = js.make_train_step(loss_fn, optax.sgd(0.1))
    >>> state = js.init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0))
    >>> state, m = step(state, {"x": jnp.ones(2)})
    >>> state, m = step(state, {"x": jnp.ones(2)})
    >>> step.traces, int(state.step)
    (1, 2)
    """

    def __init__(self, fn, chunks_per_call: int, donate: bool):
        self.chunks_per_call = chunks_per_call
        self.traces = 0

        def counted(state, batch):
            self.traces += 1
            return fn(state, batch)

        self._jitted = jax.jit(counted, donate_argnums=(0,) if donate else ())

    def _check(self, state, batch):
        if not isinstance(state, TrainState):
            raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
        _check_batch(batch, _carry_batch(state.carry), self.chunks_per_call)

    def __call__(self, state: TrainState, batch):
        self._check(state, batch)
        return self._jitted(state, batch)

    def lower(self, state, batch):
        """``jax.jit(...).lower`` of the step on these arguments (for AOT compilation)."""
        self._check(state, batch)
        return self._jitted.lower(state, batch)


_CONTRACT = "loss_fn(params, carry, batch, key) -> (loss, (new_carry, metrics))"


def _describe_tree(tree) -> str:
    """``float32[4, 8]`` for an array, the type name for any other pytree."""
    return _checks.describe(tree) if hasattr(tree, "shape") else type(tree).__name__


def _check_carry_out(new_carry, carry_in, check_dtype: bool) -> None:
    """The carry a loss returns has the structure, shapes (and dtypes) of ``state.carry``."""
    if carry_in is None and new_carry is not None:
        raise ValueError(
            f"loss_fn: returned a carry ({_describe_tree(new_carry)}) but state.carry is None; "
            "start the state with the model's carry: init_state(..., "
            "carry=model.initial_carry(batch_shape)), or return (loss, (None, metrics)) for a "
            "task without one"
        )
    if carry_in is not None and new_carry is None:
        raise ValueError(
            "loss_fn: returned carry None but state.carry holds one; return the carry the "
            "model gives (loss, (new_carry, metrics)), or init_state(..., carry=None) for a "
            "task without one"
        )
    got = jax.tree_util.tree_structure(new_carry)
    want = jax.tree_util.tree_structure(carry_in)
    if got != want:  # type: ignore[operator]  # jax's PyTreeDef stub is opaque
        raise ValueError(
            f"loss_fn: returned a carry with structure {got}, but state.carry has structure "
            f"{want}; init_state(..., carry=model.initial_carry(batch_shape)) gives the "
            "structure the model returns"
        )
    pairs = zip(jax.tree_util.tree_leaves_with_path(new_carry), jax.tree_util.tree_leaves(carry_in))
    for (path, leaf), ref in pairs:
        if tuple(jnp.shape(leaf)) != tuple(jnp.shape(ref)):
            fix = "init_state(..., carry=model.initial_carry(batch_shape)) for the data's batch"
        elif check_dtype and jnp.result_type(leaf) != jnp.result_type(ref):
            fix = "return it in the dtype of state.carry, or start from a carry of this dtype"
        else:
            continue
        raise ValueError(
            f"loss_fn: returned carry{jax.tree_util.keystr(path)} as {_checks.describe(leaf)}, "
            f"but state.carry holds {_checks.describe(ref)} there; {fix}"
        )


def _check_loss_output(out, carry_in, check_dtype: bool) -> None:
    """Checks, while tracing, that ``out`` is ``(loss, (new_carry, metrics))``.

    ``loss`` a floating scalar, ``metrics`` a dict, ``new_carry`` shaped like
    ``carry_in`` (dtypes too when ``check_dtype``). Raises a ``TypeError`` or
    ``ValueError`` that says what came back and what to return instead.
    """
    if not isinstance(out, tuple | list) or len(out) != 2:
        if hasattr(out, "shape"):
            what = f"only the loss ({_checks.describe(out)})"
        elif isinstance(out, tuple | list):
            what = f"a {type(out).__name__} of length {len(out)}"
        else:
            what = type(out).__name__
        raise TypeError(
            f"loss_fn: expected {_CONTRACT}, got {what}; return e.g. (loss, (carry, {{}})), "
            "with carry None for a task without one"
        )
    loss, aux = out
    if not isinstance(aux, tuple | list) or len(aux) != 2:
        raise TypeError(
            f"loss_fn: expected {_CONTRACT}, got (loss, {type(aux).__name__}) as the second "
            "element; return the carry with the metrics: (loss, (carry, metrics)), carry None "
            "for a task without one"
        )
    if not (hasattr(loss, "dtype") or isinstance(loss, float)):
        raise TypeError(
            f"loss_fn: expected a floating-point scalar loss, got {type(loss).__name__}"
        )
    if jnp.shape(loss) != ():
        raise ValueError(
            f"loss_fn: expected a scalar loss, got {_checks.describe(loss)}; reduce it "
            "(e.g. a mean over the batch) before returning"
        )
    if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise TypeError(f"loss_fn: expected a floating-point loss, got {_checks.describe(loss)}")
    if not isinstance(aux[1], dict):
        raise TypeError(
            f"loss_fn: expected a dict of metrics (may be empty), got {type(aux[1]).__name__}"
        )
    _check_carry_out(aux[0], carry_in, check_dtype)


def _checked_loss(loss_fn, dtype):
    """``loss_fn`` whose output is checked against the contract when traced; with a
    low-precision ``dtype`` the params, carry and batch are cast inside it (float32
    master weights stay outside the differentiated function) and the loss returned in
    float32."""

    def f(params, carry, batch, key):
        if dtype != jnp.float32:
            params, carry, batch = cast_floating((params, carry, batch), dtype)
        out = loss_fn(params, carry, batch, key)
        _check_loss_output(out, carry, check_dtype=dtype == jnp.float32)
        loss, (new_carry, metrics) = out
        return jnp.asarray(loss).astype(jnp.float32), (new_carry, metrics)

    return f


def _tree_select(ok, new, old):
    return jax.tree_util.tree_map(lambda n, o: jax.lax.select(ok, n, o), new, old)


def _find_hyperparams(opt_state):
    """The ``hyperparams`` dict of the first ``inject_hyperparams`` state in ``opt_state``."""
    hp = getattr(opt_state, "hyperparams", None)
    if isinstance(hp, dict):
        return hp
    if isinstance(opt_state, tuple | list):
        for s in opt_state:
            hp = _find_hyperparams(s)
            if hp is not None:
                return hp
    return None


def make_train_step(
    loss_fn,
    optimizer,
    *,
    chunks_per_call: int = 1,
    donate: bool = True,
    precision: str = "fp32",
):
    """A jitted train step over one batch (or ``chunks_per_call`` stacked batches).

    Args:
      loss_fn: ``(params, carry, batch, key) -> (loss, (new_carry, metrics))``, e.g.
        :func:`lm_loss_fn`; ``batch`` any pytree of arrays, ``carry`` None for tasks
        without one, ``metrics`` a dict of scalars. Checked when the step is traced:
        another return (only the loss, ``(loss, {})``, a loss that is not a
        floating scalar, a carry whose structure, shapes or dtypes differ from
        ``state.carry``) raises a ``TypeError``/``ValueError`` that says what to
        return instead.
      optimizer: any ``optax.GradientTransformation`` (e.g. :func:`make_optimizer`).
      chunks_per_call: scan over this many batches (every leaf ``[n, ...]``) inside
        one call; metrics come back with a leading ``[n]`` axis.
      donate: donate the input state's buffers (do not reuse ``state`` after the call).
      precision: ``"fp32"``, or ``"bf16"``: the params, the incoming carry and the
        floating leaves of the batch are cast to bfloat16 inside the loss, so the
        forward and the backward multiply bfloat16 operands, while the params, the optimizer state
        and the stored carry stay in their own dtype (float32 master weights) and
        the loss, the gradient (cast back by the transpose of the cast), its norm and
        the update are float32 (see :mod:`jaxseq.training.precision`).

    Returns:
      a :class:`TrainStep`: ``step(state, batch) -> (state, metrics)``. Metrics:
      ``loss``, ``grad_norm`` (global norm before clipping), ``lr`` (the learning
      rate of this update, read from the optimizer's injected hyperparameters;
      absent when the optimizer has none), ``finite`` (False: skipped by the
      guard), ``bad_streak``, plus the loss function's metrics.

    >>> import jax, jax.numpy as jnp, jaxseq as js
    >>> def loss_fn(params, carry, batch, key):  # linear regression, batch-major
    ...     err = batch["x"] @ params["w"] - batch["y"]
    ...     return jnp.mean(err ** 2), (carry, {"max_err": jnp.max(jnp.abs(err))})
    >>> opt = js.make_optimizer("sgd", 0.1)
    >>> state = js.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    >>> step = js.make_train_step(loss_fn, opt)
    >>> batch = {"x": jnp.eye(3), "y": jnp.array([1.0, 2.0, 3.0])}
    >>> state, metrics = step(state, batch)
    >>> sorted(metrics)
    ['bad_streak', 'finite', 'grad_norm', 'loss', 'lr', 'max_err']
    >>> round(float(metrics["loss"]), 4), round(float(metrics["lr"]), 4)
    (4.6667, 0.1)
    >>> only_loss = js.make_train_step(lambda p, c, b, k: jnp.sum(p["w"]), opt)
    >>> try:
    ...     only_loss(state, batch)
    ... except TypeError as e:
    ...     print(str(e).split("got ")[1].split(";")[0])
    only the loss (float32[])
    """
    _check_optimizer(optimizer)
    n = _checks.check_positive_int("chunks_per_call", chunks_per_call)
    dtype = compute_dtype(precision)
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn: expected a function (params, carry, batch, key) -> (loss, (carry, "
            f"metrics)), got {type(loss_fn).__name__}"
        )

    grad_fn = jax.value_and_grad(_checked_loss(loss_fn, dtype), has_aux=True)

    def one(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        carry_in = jax.lax.stop_gradient(state.carry)
        (loss, (carry, aux)), grads = grad_fn(state.params, carry_in, batch, key)
        carry = jax.lax.stop_gradient(carry)
        if dtype != jnp.float32 and state.carry is not None:  # stored in its own dtype
            carry = jax.tree_util.tree_map(lambda c, s: c.astype(s.dtype), carry, state.carry)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(
            params=_tree_select(ok, params, state.params),
            opt_state=_tree_select(ok, opt_state, state.opt_state),
            step=state.step + 1,
            key=state.key,
            carry=_tree_select(ok, carry, state.carry),
            bad_steps=state.bad_steps + jnp.where(ok, 0, 1).astype(jnp.int32),
            bad_streak=jnp.where(ok, 0, state.bad_streak + 1).astype(jnp.int32),
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": grad_norm.astype(jnp.float32),
            "finite": ok,
            "bad_streak": new.bad_streak,
        }
        hp = _find_hyperparams(opt_state)
        if hp is not None and "learning_rate" in hp:
            metrics["lr"] = jnp.asarray(hp["learning_rate"], jnp.float32)
        return new, {**metrics, **aux}

    if n == 1:
        fn = one
    else:

        def fn(state, batch):
            return jax.lax.scan(one, state, batch)

    return TrainStep(fn, n, donate)
