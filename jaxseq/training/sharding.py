"""Data-parallel sharding over a 1-D ``jax.sharding.Mesh``.

Parameters and optimizer state are replicated; the carry ``[B, H]`` and the
batch are split along their batch axis B. The batch axis of a batch leaf is
given to :func:`shard_batch` as ``axis``: an int for every leaf (1 for the
time-major batches of :class:`jaxseq.data.StreamBatcher` and
:class:`jaxseq.data.SeriesBatcher`: ``[K, B, ...]``), or a pytree of ints with
the batch's structure (:attr:`jaxseq.data.PaddedBatcher.batch_axes`: 1 for the
time-major sequence fields, 0 for lengths and per-example fields). Stacked
batches ``[n, ...]`` (``chunks_per_call``) have every axis shifted by one.
The same jitted step runs on one device or many (XLA inserts the gradient
all-reduce); across hosts call :func:`init_distributed` first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.training.step import TrainState

__all__ = [
    "init_distributed",
    "make_mesh",
    "shard_batch",
    "shard_state",
]


def init_distributed(**kwargs) -> None:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``) for multi-host runs.

    Keyword arguments go to ``jax.distributed.initialize`` (coordinator address,
    number of processes, process id; on managed clusters they are detected).
    Call it once per process, before anything else touches JAX::

        js.training.init_distributed()  # then make_mesh() spans every host's devices

    >>> import jaxseq as js
    >>> callable(js.training.init_distributed)  # (one process here: not started)
    True
    """
    jax.distributed.initialize(**kwargs)


def make_mesh(devices=None, axis_name: str = "data") -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes).

    >>> import jax, jaxseq as js
    >>> mesh = js.make_mesh(jax.devices()[:1])
    >>> mesh.axis_names, mesh.devices.size
    (('data',), 1)
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got none")
    return jax.sharding.Mesh(np.array(devices), (axis_name,))


def _axis_name(mesh):
    if not isinstance(mesh, jax.sharding.Mesh) or len(mesh.axis_names) != 1:
        raise TypeError(f"mesh: expected a 1-D jax.sharding.Mesh (make_mesh), got {mesh!r}")
    return mesh.axis_names[0]


def _put(x, sharding):
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)


def _shard_tree(tree, mesh, axis: int, what: str = "batch"):
    name = _axis_name(mesh)
    ndev = mesh.devices.size
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis: expected an int or a pytree of ints, got {axis!r}")

    def put(path, x):
        x = jnp.asarray(x) if not hasattr(x, "ndim") else x
        where = what + jax.tree_util.keystr(path)
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(
                f"{where}: expected a batch axis {axis}, got shape {list(x.shape)} (rank {x.ndim})"
            )
        if x.shape[axis] % ndev:
            raise ValueError(
                f"{where}: {x.shape[axis]} examples (axis {axis} of shape {list(x.shape)}) do "
                f"not split evenly over {ndev} devices"
            )
        spec = [None] * x.ndim
        spec[axis] = name
        return _put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    return jax.tree_util.tree_map_with_path(put, tree)


def replicate(tree, mesh):
    """Puts every leaf of ``tree`` on all devices of ``mesh`` (replicated)."""
    _axis_name(mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, rep), tree)


def shard_state(state: TrainState, mesh) -> TrainState:
    """Replicates params, optimizer state, step and key; splits the carry ``[B, H]`` over B.

    >>> import jax, jax.numpy as jnp, optax, jaxseq as js
    >>> mesh = js.make_mesh(jax.devices()[:1])
    >>> state = js.init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0),
    ...                       carry=jnp.zeros((4, 3)))
    >>> tuple(js.shard_state(state, mesh).carry.sharding.spec)
    ('data', None)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
    rest = replicate(state._replace(carry=None), mesh)
    return rest._replace(carry=_shard_tree(state.carry, mesh, 0, "state.carry"))


def shard_batch(batch, mesh, axis=1):
    """Splits every leaf of a batch pytree over the mesh along its batch axis.

    Args:
      batch: any pytree of arrays.
      mesh: a 1-D mesh (:func:`make_mesh`).
      axis: the batch axis: an int for every leaf (default 1: time-major
        ``[K, B, ...]`` chunks; 2 for stacked ``[n, K, B, ...]``; 0 for batch-major
        ``[B, ...]``), or a pytree of ints with the structure of ``batch`` (or a
        prefix of it), e.g. ``PaddedBatcher.batch_axes``.

    Returns:
      the batch, each leaf a ``jax.Array`` split over the devices along its axis
      (which must divide evenly).

    >>> import jax, numpy as np, jaxseq as js
    >>> mesh = js.make_mesh(jax.devices()[:1])
    >>> batch = {"tokens": np.zeros((5, 4), np.int32), "label": np.zeros(4, np.int32)}
    >>> out = js.shard_batch(batch, mesh, axis={"tokens": 1, "label": 0})
    >>> tuple(out["tokens"].sharding.spec), tuple(out["label"].sharding.spec)
    ((None, 'data'), ('data',))
    """
    if isinstance(axis, int | np.integer) and not isinstance(axis, bool):
        return _shard_tree(batch, mesh, int(axis))
    _axis_name(mesh)
    try:
        return jax.tree_util.tree_map(lambda a, sub: _shard_tree(sub, mesh, a), axis, batch)
    except ValueError as e:
        if "axis" in str(e) or "batch" in str(e):
            raise
        raise ValueError(
            f"axis: expected an int or a pytree of ints with the structure of batch, got {axis!r}"
        ) from None
