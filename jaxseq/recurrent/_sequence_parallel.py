"""Sequence parallelism: a linear recurrence's time axis split over one mesh axis.

The plumbing shared by :func:`jaxseq.recurrent.linear_recurrence` and
:func:`jaxseq.recurrent.linear_attention` with ``mesh`` and ``sequence_axis``.
Each of the ``n`` devices of the axis holds ``T / n`` consecutive steps and

1. summarises its slice: the decay across it (the product of its effective
   gates: 0 once a reset cuts it) and its end state from a zero start
   (``linear_recurrence``: the single-device solver run from zero, its outputs
   kept; ``linear_attention``: one product of the decayed keys and the values,
   no outputs);
2. gathers the summaries of every device (``all_gather``: ``O(n * state)``
   numbers, never ``O(T)``) and combines them by a scan over the devices
   (:func:`entering`), from the initial state for the first slice processed:
   the state entering its own slice, and the final state (the same on every
   device);
3. gives its outputs from that entering state: ``linear_recurrence`` adds, by
   linearity ``h_t(h_in) = h_t(0) + h_t(h_in; b = 0)``, a second solve with
   zero inputs from ``h_in``; ``linear_attention`` runs the single-device
   solver on its slice from ``S_in``.

``lengths`` stay global step counts: a device's valid steps are those with
``offset + t < lengths``, ``offset = axis_index * T / n`` (:func:`local_valid`).
A reset on a slice's first step cuts, in reverse, the state that slice passes
down to the one before it (:func:`reverse_cut`); every other reset is inside a
slice, where the solver sees it. Padded steps pass the state through, so the
state after the last slice processed is the one after each sequence's last
valid step, on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "check_mesh",
    "entering",
    "gather",
    "live_resets",
    "local_valid",
    "reverse_cut",
    "shard",
]


def check_mesh(mesh, sequence_axis, t: int) -> int | None:
    """The size ``n`` of ``mesh``'s axis ``sequence_axis`` (None when neither is given),
    after checking that ``T = t`` splits evenly over it.

    >>> import jax, numpy as np
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))
    >>> check_mesh(mesh, "seq", 12), check_mesh(None, None, 12)
    (1, None)
    """
    if mesh is None and sequence_axis is None:
        return None
    if mesh is None or sequence_axis is None:
        raise ValueError(
            "mesh, sequence_axis: expected both (sequence parallelism) or neither, got "
            f"mesh={type(mesh).__name__ if mesh is not None else None}, "
            f"sequence_axis={sequence_axis!r}"
        )
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if sequence_axis not in mesh.axis_names:
        raise ValueError(
            f"sequence_axis: expected one of the mesh's axis names {list(mesh.axis_names)}, "
            f"got {sequence_axis!r}"
        )
    n = int(mesh.shape[sequence_axis])
    if t % n:
        raise ValueError(
            f"sequence_axis: T={t} steps do not split evenly over the {n} devices of mesh "
            f"axis {sequence_axis!r}; pad T to a multiple of {n} and pass lengths"
        )
    return n


def _auto(mesh):
    """``mesh`` with every axis of type Auto: ``shard_map`` then places plain inputs itself."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _explicit(mesh, args) -> bool:
    """Whether to run on ``mesh`` as it is, arguments resharded by ``jax.reshard``: its
    axes are Explicit and it is the context mesh (``jax.set_mesh``), or an argument's
    type already carries an Explicit sharding."""
    if jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return False
    context = jax.sharding.get_abstract_mesh()
    if not context.empty:
        return context == mesh.abstract_mesh
    leaves = jax.tree_util.tree_leaves(args)
    explicit = jax.sharding.AxisType.Explicit
    # a mesh in a type is not enough: the outputs of an earlier call on the Auto mesh
    # (a js.Stack's lower layer) carry that mesh, with Auto axes
    return any(explicit in tuple(jax.typeof(x).sharding.mesh.axis_types) for x in leaves)


def shard(body, mesh, axis, in_sharded: tuple[bool, ...], out_sharded: tuple[bool, ...]):
    """``body`` under ``jax.shard_map``: each argument (output) split along its leading
    (time) axis over ``axis`` where ``in_sharded`` (``out_sharded``) says so, else
    whole on every device. An argument may be None (no leaves).

    A mesh of Explicit axes that is the context mesh (``jax.set_mesh``) or that
    the arguments' types are sharded over is used as it is, the arguments resharded
    to those specs (``jax.reshard``); otherwise the mesh runs with Auto axes, so
    plain arrays are accepted as they are."""
    spec = jax.sharding.PartitionSpec
    in_specs = tuple(spec(axis) if s else spec() for s in in_sharded)
    out_specs = tuple(spec(axis) if s else spec() for s in out_sharded)

    def run(*args):
        explicit = _explicit(mesh, args)
        if explicit:
            place = lambda x, p: jax.reshard(x, jax.sharding.NamedSharding(mesh, p))
            args = tuple(x if x is None else place(x, p) for x, p in zip(args, in_specs))
        mapped = jax.shard_map(
            body,
            mesh=mesh if explicit else _auto(mesh),
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=False,
        )
        return mapped(*args)

    return run


def local_valid(axis, t_local: int, lengths):
    """``bool[T / n, *B]``: the valid steps of this device's slice, from global
    ``lengths: int[*B]`` (None when ``lengths`` is None)."""
    if lengths is None:
        return None
    start = jax.lax.axis_index(axis) * t_local
    steps = start + jnp.arange(t_local, dtype=lengths.dtype)
    return steps.reshape((t_local,) + (1,) * lengths.ndim) < lengths[None]


def live_resets(reset, valid):
    """``bool[T / n, *B]`` the resets on valid steps (None when ``reset`` is None)."""
    if reset is None or valid is None:
        return reset
    return reset & valid


def reverse_cut(reset, valid, reverse: bool):
    """``bool[*B]``: in reverse, a reset on the slice's first (valid) step empties the
    state the slice passes to the one processed after it (None: no cut)."""
    live = live_resets(reset, valid)
    if live is None or not reverse:
        return None
    return live[0]


def gather(axis, *xs):
    """Each ``x`` of every device of ``axis``, stacked: ``[n, *x.shape]``."""
    return tuple(jax.lax.all_gather(x, axis) for x in xs)


def entering(axis, decay, end, init, reverse: bool):
    """``(state entering this device's slice, final state)`` from every device's
    ``decay`` (broadcasting against the state) and ``end`` state from zero, both
    ``[n, ...]``: ``s_in[d + 1] = decay[d] * s_in[d] + end[d]`` from ``s_in[0] = init``
    (reverse: from the last device down). The final state is the state after the
    last slice processed, the same on every device."""

    def body(s, x):
        d, e = x
        return d * s + e, s

    final, s_in = jax.lax.scan(body, init, (decay, end), reverse=reverse)
    here = jax.lax.dynamic_index_in_dim(s_in, jax.lax.axis_index(axis), 0, keepdims=False)
    return here, final
