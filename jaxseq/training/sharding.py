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

**Several processes** (one per host or accelerator, after
:func:`jaxseq.training.init_distributed`): :func:`make_mesh` spans the devices
of every process, and the arrays are global ``jax.Array`` s assembled with
``jax.make_array_from_process_local_data``. Every process calls the same
functions with the same arguments. :func:`shard_batch` takes the whole batch
and feeds only this process's rows of it (:func:`process_slice`: its streams,
its examples), or with ``local=True`` a batch that holds only those rows (a
per-process data source); :func:`shard_state` replicates the params and the
optimizer state on every device and splits the carry by stream, each process
holding its own streams' carry. One process behaves exactly as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks
from jaxseq.training.distributed import init_distributed
from jaxseq.training.step import TrainState

__all__ = [
    "init_distributed",
    "make_mesh",
    "process_slice",
    "shard_batch",
    "shard_state",
]


def make_mesh(devices=None, axis_name: str = "data") -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes).

    >>> import jax, jaxseq as js
    >>> mesh = js.training.make_mesh(jax.devices()[:1])
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


def _is_global(x) -> bool:
    """A ``jax.Array`` that spans devices of other processes too."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _host(x):
    """``x`` as host data (typed PRNG keys as their uint32 data, with a flag)."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), jax.random.key_impl(x)
    return np.asarray(x), None


def _rows(sharding, shape, axis: int) -> slice:
    """The contiguous rows ``[lo, hi)`` along ``axis`` that this process's devices hold."""
    idx = sharding.addressable_devices_indices_map(tuple(shape))
    spans = sorted({(s[axis].indices(shape[axis])[:2]) for s in idx.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(
            f"mesh: this process's devices hold rows {spans} of axis {axis}, not one contiguous "
            f"block; order the mesh's devices by process (make_mesh() does)"
        )
    return slice(lo, hi)


def process_slice(mesh, size: int) -> slice:
    """The rows of a batch axis of ``size`` examples that this process feeds on ``mesh``.

    With P processes of one device each on ``make_mesh()``, process p feeds rows
    ``[p * size // P, (p + 1) * size // P)``: its streams of a stream batch, its
    examples of a padded batch. On one process it is every row.

    >>> import jax, jaxseq as js
    >>> js.training.process_slice(js.training.make_mesh(), 8)
    slice(0, 8, None)
    """
    name = _axis_name(mesh)
    size = _checks.check_positive_int("size", size)
    if size % mesh.devices.size:
        raise ValueError(
            f"size: {size} examples do not split evenly over {mesh.devices.size} devices"
        )
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(name))
    return _rows(sharding, (size,), 0)


def _put(x, sharding, axis=None, local: bool = False):
    """Places one leaf. One process: ``device_put``. Several: a global array assembled from
    this process's rows (``local``: ``x`` holds only them; else ``x`` is the whole batch)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if _is_global(x):
        return jax.device_put(x, sharding)
    data, impl = _host(x)
    if axis is None:  # replicated: every process holds the whole value
        out = jax.make_array_from_process_local_data(sharding, data, data.shape)
    elif local:
        out = jax.make_array_from_process_local_data(sharding, data)
    else:
        rows = _rows(sharding, data.shape, axis)
        mine = data[(slice(None),) * axis + (rows,)]
        out = jax.make_array_from_process_local_data(sharding, mine, data.shape)
    return out if impl is None else jax.random.wrap_key_data(out, impl=impl)


def _shard_tree(tree, mesh, axis: int, what: str = "batch", local: bool = False):
    name = _axis_name(mesh)
    ndev = mesh.devices.size
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis: expected an int or a pytree of ints, got {axis!r}")
    share = ndev // jax.process_count() if local else ndev

    def put(path, x):
        x = jnp.asarray(x) if not hasattr(x, "ndim") else x
        where = what + jax.tree_util.keystr(path)
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(
                f"{where}: expected a batch axis {axis}, got shape {list(x.shape)} (rank {x.ndim})"
            )
        if x.shape[axis] % max(share, 1):
            per = "this process's" if local else ""
            raise ValueError(
                f"{where}: {x.shape[axis]} examples (axis {axis} of shape {list(x.shape)}) do "
                f"not split evenly over {per}{' ' if per else ''}{share} devices"
            )
        spec = [None] * x.ndim
        spec[axis] = name
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        return _put(x, sharding, axis % x.ndim, local)

    return jax.tree_util.tree_map_with_path(put, tree)


def replicate(tree, mesh):
    """Puts every leaf of ``tree`` on all devices of ``mesh`` (replicated)."""
    _axis_name(mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda x: _put(x, rep), tree)


def shard_state(state: TrainState, mesh) -> TrainState:
    """Replicates params, optimizer state, step and key; splits the carry ``[B, H]`` over B.

    ``state`` holds the whole carry (the same on every process); with several
    processes each keeps its own streams' rows. A state already on the mesh is
    returned as it is (resharded where its placement differs).

    >>> import jax, jax.numpy as jnp, optax, jaxseq as js
    >>> mesh = js.training.make_mesh(jax.devices()[:1])
    >>> state = js.init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0),
    ...                       carry=jnp.zeros((4, 3)))
    >>> tuple(js.training.shard_state(state, mesh).carry.sharding.spec)
    ('data', None)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected TrainState, got {type(state).__name__}")
    rest = replicate(state._replace(carry=None), mesh)
    return rest._replace(carry=_shard_tree(state.carry, mesh, 0, "state.carry"))


def shard_batch(batch, mesh, axis=1, *, local: bool = False):
    """Splits every leaf of a batch pytree over the mesh along its batch axis.

    Args:
      batch: any pytree of arrays.
      mesh: a 1-D mesh (:func:`make_mesh`).
      axis: the batch axis: an int for every leaf (default 1: time-major
        ``[K, B, ...]`` chunks; 2 for stacked ``[n, K, B, ...]``; 0 for batch-major
        ``[B, ...]``), or a pytree of ints with the structure of ``batch`` (or a
        prefix of it), e.g. ``PaddedBatcher.batch_axes``.
      local: with several processes, ``batch`` holds only this process's rows
        (:func:`process_slice`) and the global batch is their concatenation over
        the processes; by default it is the whole batch, the same on every process,
        and each process feeds its own rows of it. Ignored on one process.

    Returns:
      the batch, each leaf a ``jax.Array`` split over the devices along its axis
      (which must divide evenly).

    >>> import jax, numpy as np, jaxseq as js
    >>> mesh = js.training.make_mesh(jax.devices()[:1])
    >>> batch = {"tokens": np.zeros((5, 4), np.int32), "label": np.zeros(4, np.int32)}
    >>> out = js.training.shard_batch(batch, mesh, axis={"tokens": 1, "label": 0})
    >>> tuple(out["tokens"].sharding.spec), tuple(out["label"].sharding.spec)
    ((None, 'data'), ('data',))
    """
    local = bool(local) and jax.process_count() > 1
    if isinstance(axis, int | np.integer) and not isinstance(axis, bool):
        return _shard_tree(batch, mesh, int(axis), local=local)
    _axis_name(mesh)
    try:
        return jax.tree_util.tree_map(
            lambda a, sub: _shard_tree(sub, mesh, a, local=local), axis, batch
        )
    except ValueError as e:
        if "axis" in str(e) or "batch" in str(e):
            raise
        raise ValueError(
            f"axis: expected an int or a pytree of ints with the structure of batch, got {axis!r}"
        ) from None
