"""Data-parallel sharding over a 1-D ``jax.sharding.Mesh``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.data.streams import Chunk
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
    """
    jax.distributed.initialize(**kwargs)


def make_mesh(devices=None, axis_name: str = "data") -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
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


def _shard_tree(tree, mesh, axis: int):
    name = _axis_name(mesh)
    ndev = mesh.devices.size

    def put(x):
        x = jnp.asarray(x) if not hasattr(x, "ndim") else x
        if x.shape[axis] % ndev:
            raise ValueError(
                f"batch: {x.shape[axis]} streams (axis {axis} of shape {list(x.shape)}) do not "
                f"split evenly over {ndev} devices"
            )
        spec = [None] * x.ndim
        spec[axis] = name
        return _put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh):
    """Puts every leaf of ``tree`` on all devices of ``mesh`` (replicated)."""
    _axis_name(mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, rep), tree)


def shard_state(state: TrainState, mesh) -> TrainState:
    """Replicates params, optimizer state, step and key; splits the carry ``[B, H]`` over streams."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
    rest = replicate(state._replace(carry=None), mesh)
    return rest._replace(carry=_shard_tree(state.carry, mesh, 0))


def shard_batch(batch: Chunk, mesh) -> Chunk:
    """Splits a chunk ``[K, B]`` (or stacked ``[n, K, B]``) over the stream axis B."""
    return _shard_tree(batch, mesh, np.ndim(batch.inputs) - 1)
