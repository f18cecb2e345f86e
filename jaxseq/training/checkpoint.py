"""Checkpoints of the whole train state with orbax: params, optimizer state,
step (the data position), RNG key, carried recurrent state, guard counters,
plus JSON metadata (model config, hyperparameters, training time).

Each save is atomic (orbax writes a temporary directory and renames it when
complete, so a write cut short leaves the checkpoints before it as they were),
synchronous (when :meth:`Checkpointer.save` returns, the checkpoint is on disk,
so a SIGKILL right after loses nothing), and only the last ``keep`` checkpoints
are kept.

Each checkpoint also records the shape and a CRC-32 of every array it holds
(every array one process holds whole: with several processes, the replicated
ones). A checkpoint whose files were truncated, deleted or altered later is
*damaged*: :meth:`Checkpointer.restore` of the latest one then warns, naming
the damaged step and what is wrong, and restores the newest intact one instead,
or with ``strict=True`` raises :class:`CheckpointDamagedError`.

Restoring checks compatibility *before* reading any array: the model config
and the shapes of the saved state must match this run's, and the
hyperparameters must be the same unless ``override=True``::

    ckpt = Checkpointer("out/ckpt", keep=3, model_config=model.config(), hparams=hp)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(template_state)

With several processes (:func:`jaxseq.training.init_distributed`) saving and
restoring are collective: every process calls them with the same arguments;
orbax writes each process's shards of the global arrays (the carry, split by
stream) and one copy of the replicated ones and of the metadata, so the
directory must be one that every process sees (a shared file system or a
bucket). A run killed on all processes resumes exactly, as on one.

For evaluation and sampling, :meth:`Checkpointer.restore_params` (or the
function :func:`restore_params`) reads the parameters alone: no optimizer,
carry or batch size is needed, and nothing else is read from disk. It is
also the way to resume with a new optimizer (for instance a schedule over a
longer run): restore the params, then build a fresh state around them.
"""

from __future__ import annotations

import os
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks

__all__ = [
    "CheckpointDamagedError",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "restore_params",
]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint does not fit this run (model, shapes or hyperparameters).

    >>> import jaxseq as js
    >>> issubclass(js.training.IncompatibleCheckpointError, ValueError)
    True
    """


class CheckpointDamagedError(RuntimeError):
    """A checkpoint on disk cannot be read back as it was written: a file of it is
    missing, truncated or altered (its ``step`` attribute; None when every
    checkpoint of the directory is damaged).

    >>> import jaxseq as js
    >>> e = js.training.CheckpointDamagedError("checkpoint: step 8 is damaged", step=8)
    >>> issubclass(js.training.CheckpointDamagedError, RuntimeError), e.step
    (True, 8)
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_global(x) -> bool:
    """A ``jax.Array`` that spans devices of other processes too."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _to_saveable(state):
    """Typed PRNG keys become their uint32 data; everything becomes a host numpy array,
    except the global arrays of a multi-process run, which orbax writes shard by shard
    (each process its own)."""

    def conv(x):
        if _is_typed_key(x):
            x = jax.random.key_data(x)
        if _is_global(x):
            return x
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(conv, state)


def _restore_target(template):
    """The abstract tree to restore into: global arrays keep the template's sharding (each
    process reads its own shards); the rest is read as host arrays."""

    def conv(x):
        data = jax.eval_shape(jax.random.key_data, x) if _is_typed_key(x) else x
        if _is_global(x):
            return jax.ShapeDtypeStruct(np.shape(data), data.dtype, sharding=x.sharding)
        return np.zeros(np.shape(data), data.dtype)

    return jax.tree_util.tree_map(conv, template)


def _saveable_shapes(tree):
    """``ShapeDtypeStruct`` of what :func:`_to_saveable` makes of ``tree``, reading nothing."""

    def conv(x):
        if _is_typed_key(x):
            return jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

    return jax.tree_util.tree_map(conv, tree)


def _path_part(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes_by_path(tree) -> dict:
    """``{"params/stack/0/w_ih": shape}`` for every leaf (NamedTuples and dicts alike)."""
    return {
        "/".join(_path_part(k) for k in path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


_INTEGRITY = "integrity"  # the meta entry with the shapes and CRCs of the saved arrays


def _checksums(tree) -> dict:
    """``{path: CRC-32}`` of every leaf this process holds whole (a host array, or a
    global array replicated on every device); the shards of split arrays are skipped."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                continue
            x = x.addressable_data(0)
        data = np.ascontiguousarray(np.asarray(x))
        flat = data.view(np.uint8).ravel()
        # numpy's stubs declare the buffer protocol on Python 3.12+ only
        out["/".join(_path_part(k) for k in path)] = zlib.crc32(flat)  # type: ignore[arg-type]
    return out


def _short(e: BaseException, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _diff(saved, current, prefix=""):
    """Human-readable differences between two JSON-like values."""
    out = []
    if isinstance(saved, dict) and isinstance(current, dict):
        for k in sorted(set(saved) | set(current)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{name}: not in the checkpoint, this run has {current[k]!r}")
            elif k not in current:
                out.append(f"{name}: checkpoint has {saved[k]!r}, this run has none")
            else:
                out.extend(_diff(saved[k], current[k], name))
    elif saved != current:
        out.append(f"{prefix}: checkpoint has {saved!r}, this run has {current!r}")
    return out


class Checkpointer:
    """Saves and restores :class:`jaxseq.training.TrainState` under ``directory``.

    Args:
      directory: the checkpoint root (one subdirectory per step).
      keep: how many of the most recent checkpoints to keep.
      model_config: a JSON-able model description (e.g. ``RecurrentLM.config()``);
        a checkpoint whose config differs cannot be restored.
      hparams: JSON-able hyperparameters; a checkpoint with different values is
        restored only with ``override=True``.

    >>> import tempfile, jax, jax.numpy as jnp, jaxseq as js
    >>> opt = js.make_optimizer("adam", 1e-2)
    >>> state = js.init_state({"w": jnp.arange(3.0)}, opt, jax.random.key(0))
    >>> ckpt = js.Checkpointer(tempfile.mkdtemp(), keep=2)
    >>> ckpt.save(state, {"note": "step 0"})
    0
    >>> restored, meta = ckpt.restore(state)
    >>> restored.params["w"].tolist(), meta["note"]
    ([0.0, 1.0, 2.0], 'step 0')
    >>> ckpt.restore_params({"w": jnp.zeros(3)})["w"].tolist()  # params alone
    [0.0, 1.0, 2.0]
    """

    def __init__(self, directory, *, keep: int = 3, model_config=None, hparams=None):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = _checks.check_positive_int("keep", keep)
        self.model_config = _jsonable(model_config) if model_config is not None else None
        self.hparams = _jsonable(hparams) if hparams is not None else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    # -- saving -------------------------------------------------------------------------
    def save(self, state, meta: dict | None = None) -> int:
        """Writes ``state`` as the checkpoint of step ``int(state.step)``; returns the step."""
        ocp = self._ocp
        step = int(state.step)
        saveable = _to_saveable(state)
        full = {
            "model": self.model_config,
            "hparams": self.hparams,
            "step": step,
            "typed_key": bool(_is_typed_key(state.key)),
            **_jsonable(meta or {}),
            _INTEGRITY: {
                "shapes": {k: list(v) for k, v in _shapes_by_path(saveable).items()},
                "crc32": _checksums(saveable),
            },
        }
        if step in self._mngr.all_steps():
            self._mngr.delete(step)  # e.g. a save at exit right after a periodic save
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saveable), meta=ocp.args.JsonSave(full)
            ),
            force=True,
        )
        self._mngr.wait_until_finished()
        return step

    # -- reading ------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of the checkpoint of ``step`` (default: latest)."""
        ocp = self._ocp
        step = self._resolve(step)
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def _resolve(self, step):
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"checkpoint: no checkpoint found in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"checkpoint: no step {step} in {self.directory}; have {steps}")
        return step

    def check_compatible(self, meta: dict, template, *, override: bool = False, step=None):
        """Raises :class:`IncompatibleCheckpointError` if the checkpoint cannot be resumed here."""
        if self.model_config is not None and meta.get("model") is not None:
            d = _diff(meta["model"], self.model_config)
            if d:
                raise IncompatibleCheckpointError(
                    "checkpoint: saved for an incompatible model: " + "; ".join(d)
                )
        # shapes of the saved arrays against the template, before reading them
        saved = _shapes_by_path(self._mngr.item_metadata(step)["state"])
        want = _shapes_by_path(_saveable_shapes(template))
        if set(saved) != set(want):
            missing = sorted(set(want) - set(saved))[:3]
            extra = sorted(set(saved) - set(want))[:3]
            raise IncompatibleCheckpointError(
                f"checkpoint: the saved state has {len(saved)} arrays, this run's has {len(want)} "
                f"(a different model or optimizer); missing {missing}, unexpected {extra}"
            )
        for path, w in want.items():
            if saved[path] != w:
                raise IncompatibleCheckpointError(
                    f"checkpoint: {path}: saved shape {list(saved[path])}, "
                    f"this run expects {list(w)}"
                )
        if self.hparams is not None and meta.get("hparams") is not None:
            d = _diff(meta["hparams"], self.hparams)
            if d and not override:
                raise IncompatibleCheckpointError(
                    "checkpoint: hyperparameters differ from the checkpoint's ("
                    + "; ".join(d)
                    + "); resume with the same settings or pass override=True (--override)"
                )

    def restore_params(self, template_params, step: int | None = None):
        """The parameters of the checkpoint of ``step`` (default: latest), alone.

        ``template_params`` is a parameter pytree of this run's model (e.g.
        ``model.init(key)``); only its structure, shapes and dtypes are used. The
        optimizer state, carry, step and key of the checkpoint are not read, so
        any optimizer and any batch size will do. The model config is checked
        when this checkpointer has one; the shapes always.
        """
        ocp = self._ocp
        step = self._resolve(step)
        meta = self.read_meta(step)
        if self.model_config is not None and meta.get("model") is not None:
            d = _diff(meta["model"], self.model_config)
            if d:
                raise IncompatibleCheckpointError(
                    "checkpoint: saved for an incompatible model: " + "; ".join(d)
                )
        saved_tree = self._mngr.item_metadata(step)["state"]
        saved_params = saved_tree["params"] if "params" in saved_tree else None
        saved = {
            "/".join(_path_part(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(saved_params)
        }
        want_paths = [
            "/".join(_path_part(k) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(template_params)
        ]
        want_leaves, treedef = jax.tree_util.tree_flatten(template_params)
        if set(saved) != set(want_paths):
            missing = sorted(set(want_paths) - set(saved))[:3]
            extra = sorted(set(saved) - set(want_paths))[:3]
            raise IncompatibleCheckpointError(
                f"checkpoint: the saved params have {len(saved)} arrays, template_params has "
                f"{len(want_paths)} (a different model); missing {missing}, unexpected {extra}"
            )
        for path, leaf in zip(want_paths, want_leaves):
            got = tuple(saved[path].shape)
            if got != tuple(np.shape(leaf)):
                raise IncompatibleCheckpointError(
                    f"checkpoint: params/{path}: saved shape {list(got)}, template_params has "
                    f"{list(np.shape(leaf))}"
                )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        item = {
            "params": jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved_params
            )
        }
        restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=device), item)
        with ocp.PyTreeCheckpointer() as reader:
            got = reader.restore(
                os.path.join(self.directory, str(step), "state"),
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )["params"]
        by_path = {
            "/".join(_path_part(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(got)
        }
        leaves = [
            jnp.asarray(by_path[p], dtype=getattr(w, "dtype", None))
            for p, w in zip(want_paths, want_leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def restore(
        self, template, step: int | None = None, *, override: bool = False, strict: bool = False
    ):
        """Restores the checkpoint of ``step`` (default: latest) into the structure of ``template``.

        ``template`` is a state of this run (e.g. the fresh initial state); only its
        structure, shapes and dtypes are used. Returns ``(state, meta)``.

        A damaged checkpoint (a file missing, truncated or altered, found by its
        recorded shapes and CRC-32 checksums or by a read that fails) raises
        :class:`CheckpointDamagedError` naming its step, when it was asked for by
        ``step`` or with ``strict=True``. Otherwise the latest checkpoint that is
        intact is restored, with a ``RuntimeWarning`` for each damaged one passed
        over. A checkpoint that does not fit this run raises
        :class:`IncompatibleCheckpointError` at once.

        With several processes every process calls it; a template placed on a mesh
        (:func:`jaxseq.training.shard_state`) gives a state placed the same way,
        each process reading only its own shards, and all of them agree on which
        checkpoint is intact.
        """
        if step is not None:
            return self._restore_step(self._resolve(step), template, override)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"checkpoint: no checkpoint found in {self.directory}")
        damaged = []
        for i, s in enumerate(reversed(steps)):
            try:
                return self._restore_step(s, template, override)
            except CheckpointDamagedError as e:
                if strict:
                    raise
                damaged.append(str(e))
                older = steps[-i - 2] if i + 1 < len(steps) else None
                then = f"restoring step {older} instead" if older is not None else "none is left"
                warnings.warn(f"{e}; {then}", RuntimeWarning, stacklevel=2)
        raise CheckpointDamagedError(
            f"checkpoint: every checkpoint in {self.directory} is damaged: " + "; ".join(damaged)
        )

    def _restore_step(self, step: int, template, override: bool):
        """Restores one step; :class:`CheckpointDamagedError` when it is damaged."""
        ocp = self._ocp
        multi = jax.process_count() > 1
        meta: dict = {}  # read first; used only when it was read without a problem
        got, problem = None, None
        try:
            meta = self.read_meta(step)
            recorded = meta.get(_INTEGRITY)
            if recorded is not None:  # the arrays on disk are the ones the save recorded
                on_disk = {
                    k: list(v)
                    for k, v in _shapes_by_path(self._mngr.item_metadata(step)["state"]).items()
                }
                if on_disk != recorded["shapes"]:
                    lost = sorted(set(recorded["shapes"]) - set(on_disk))[:3]
                    problem = (
                        f"its array index lists {len(on_disk)} arrays, the save wrote "
                        f"{len(recorded['shapes'])}" + (f" (missing {lost})" if lost else "")
                    )
        except Exception as e:  # noqa: BLE001 - any failure to read it back is damage
            problem = f"its metadata cannot be read ({type(e).__name__}: {_short(e)})"
        problem = self._agree(problem, multi)
        if problem is None:
            self.check_compatible(meta, template, override=override, step=step)
            try:
                if multi:
                    target = _restore_target(template)
                else:
                    target = _saveable_shapes(template)
                got = self._mngr.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )["state"]
                if not multi:
                    got = jax.tree_util.tree_map(np.asarray, got)
                recorded = (meta.get(_INTEGRITY) or {}).get("crc32", {})
                now = _checksums(got)
                bad = [k for k, v in recorded.items() if k in now and now[k] != v]
                if bad:
                    problem = f"the CRC-32 of {len(bad)} arrays differs from the save's ({bad[:3]})"
            except Exception as e:  # noqa: BLE001
                problem = f"its arrays cannot be read ({type(e).__name__}: {_short(e)})"
            problem = self._agree(problem, multi)
        if problem is not None:
            raise CheckpointDamagedError(f"checkpoint: step {step} is damaged: {problem}", step)
        got = jax.tree_util.tree_map(lambda x: x if _is_global(x) else jnp.asarray(x), got)
        if meta.get("typed_key") or _is_typed_key(template.key):
            impl = jax.random.key_impl(template.key) if _is_typed_key(template.key) else None
            got = got._replace(key=jax.random.wrap_key_data(got.key, impl=impl))
        meta = {k: v for k, v in meta.items() if k != _INTEGRITY}
        return got, meta

    @staticmethod
    def _agree(problem, multi: bool):
        """With several processes: a problem any of them found is everyone's."""
        if not multi:
            return problem
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(problem is not None))
        if problem is None and np.any(flags):
            bad = [int(i) for i in np.flatnonzero(np.asarray(flags).ravel())]
            problem = f"process {bad[0]} could not read its part"
        return problem

    def close(self):
        """Releases the checkpoint manager (pending writes are finished first)."""
        self._mngr.close()


def restore_params(directory, template_params, *, step: int | None = None, model_config=None):
    """The parameters of the latest (or ``step``'s) checkpoint under ``directory``, alone.

    See :meth:`Checkpointer.restore_params`: no optimizer, carry or batch size
    needed; ``model_config``, when given, must equal the saved one.

    >>> import os, tempfile, jax, jax.numpy as jnp, optax, jaxseq as js
    >>> directory = tempfile.mkdtemp()
    >>> state = js.init_state({"w": jnp.ones(2)}, optax.adam(0.1), jax.random.key(0))
    >>> _ = js.Checkpointer(directory).save(state)
    >>> js.training.restore_params(directory, {"w": jnp.zeros(2)})["w"].tolist()
    [1.0, 1.0]
    """
    if not os.path.isdir(os.fspath(directory)):
        raise FileNotFoundError(f"directory: no checkpoint directory {os.fspath(directory)!r}")
    ckpt = Checkpointer(directory, model_config=model_config)
    try:
        return ckpt.restore_params(template_params, step)
    finally:
        ckpt.close()
