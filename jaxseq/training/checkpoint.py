"""Checkpoints of the whole train state with orbax: params, optimizer state,
step (the data position), RNG key, carried recurrent state, guard counters,
plus JSON metadata (model config, hyperparameters, training time).

Each save is atomic (orbax writes a temporary directory and renames it when
complete), synchronous (when :meth:`Checkpointer.save` returns, the checkpoint
is on disk, so a SIGKILL right after loses nothing), and only the last
``keep`` checkpoints are kept.

Restoring checks compatibility *before* reading any array: the model config
and the shapes of the saved state must match this run's, and the
hyperparameters must be the same unless ``override=True``::

    ckpt = Checkpointer("out/ckpt", keep=3, model_config=model.config(), hparams=hp)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(template_state)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import _checks

__all__ = [
    "Checkpointer",
    "IncompatibleCheckpointError",
]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint does not fit this run (model, shapes or hyperparameters)."""


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state):
    """Typed PRNG keys become their uint32 data; everything becomes a host numpy array."""

    def conv(x):
        if _is_typed_key(x):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(conv, state)


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
      model_config: a JSON-able model description (e.g. ``LanguageModel.config()``);
        a checkpoint whose config differs cannot be restored.
      hparams: JSON-able hyperparameters; a checkpoint with different values is
        restored only with ``override=True``.
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
        full = {
            "model": self.model_config,
            "hparams": self.hparams,
            "step": step,
            "typed_key": bool(_is_typed_key(state.key)),
            **_jsonable(meta or {}),
        }
        if step in self._mngr.all_steps():
            self._mngr.delete(step)  # e.g. a save at exit right after a periodic save
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(full)
            ),
            force=True,
        )
        self._mngr.wait_until_finished()
        return step

    # -- reading ------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict:
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

    def restore(self, template, step: int | None = None, *, override: bool = False):
        """Restores the checkpoint of ``step`` (default: latest) into the structure of ``template``.

        ``template`` is a state of this run (e.g. the fresh initial state); only its
        structure, shapes and dtypes are used. Returns ``(state, meta)``.
        """
        ocp = self._ocp
        step = self._resolve(step)
        meta = self.read_meta(step)
        self.check_compatible(meta, template, override=override, step=step)
        abstract = _saveable_shapes(template)
        got = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        got = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), got)
        if meta.get("typed_key") or _is_typed_key(template.key):
            impl = jax.random.key_impl(template.key) if _is_typed_key(template.key) else None
            got = got._replace(key=jax.random.wrap_key_data(got.key, impl=impl))
        return got, meta

    def close(self):
        self._mngr.close()
