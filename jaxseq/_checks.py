"""Input validation shared by every public function.

Shape and dtype checks run at trace time, so a bad argument raises a
``ValueError``/``TypeError`` that names the argument, the expected and the
actual shape or dtype, before XLA ever sees it.

Value checks (:func:`check_in_range`) raise the same way for concrete values;
for traced values (under ``jit``, ``vmap``, ``grad``) they become a
``checkify.debug_check`` carrying the same message: a no-op in plain compiled
code, an error under :func:`jaxseq.checked`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# A shape spec is a tuple whose entries are ints (must match) or None (anything).
ShapeSpec = Sequence["int | None"]


def describe(x) -> str:
    """``float32[3, 4]`` style description of an array-like."""
    shape = tuple(np.shape(x))
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = np.asarray(x).dtype
    return f"{jnp.dtype(dtype).name}[{', '.join(str(int(d)) for d in shape)}]"


def _fmt_spec(spec: ShapeSpec, names: Sequence[str] | None = None) -> str:
    parts = []
    for i, d in enumerate(spec):
        if d is None:
            parts.append(names[i] if names else "*")
        else:
            label = f"{names[i]}={d}" if names else str(d)
            parts.append(label)
    return "[" + ", ".join(parts) + "]"


def as_array(name: str, x):
    """Converts ``x`` to a jax array, turning conversion failures into TypeError."""
    if isinstance(x, jax.Array | np.ndarray) or hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        return jnp.asarray(x)
    except Exception as e:  # noqa: BLE001 - re-raised with a readable message
        raise TypeError(f"{name}: expected an array, got {type(x).__name__} ({e})") from None


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {describe(x)}")


def check_integer(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {describe(x)}")


def check_bool(name: str, x) -> None:
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name}: expected dtype bool, got {describe(x)}")


def check_ndim(name: str, x, ndim: int, what: str = "") -> None:
    if x.ndim != ndim:
        hint = f" {what}" if what else ""
        raise ValueError(
            f"{name}: expected rank {ndim}{hint}, got rank {x.ndim} with shape {describe(x)}"
        )


def check_min_ndim(name: str, x, ndim: int, what: str = "") -> None:
    if x.ndim < ndim:
        hint = f" {what}" if what else ""
        raise ValueError(
            f"{name}: expected rank >= {ndim}{hint}, got rank {x.ndim} with shape {describe(x)}"
        )


def check_shape(name: str, x, spec: ShapeSpec, names: Sequence[str] | None = None) -> None:
    """Checks ``x.shape`` against ``spec`` (ints must match, None is free)."""
    shape = tuple(x.shape)
    ok = len(shape) == len(spec) and all(s is None or s == d for s, d in zip(spec, shape))
    if not ok:
        raise ValueError(f"{name}: expected shape {_fmt_spec(spec, names)}, got {describe(x)}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_rate(name: str, value) -> float:
    """A probability in ``[0, 1)`` (dropout rates); returns it as a float."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = None
    if isinstance(value, bool) or rate is None or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1), got {value!r}")
    return rate


def check_axes(name: str, axes, ndim: int) -> frozenset:
    """Normalises an int or a sequence of ints naming axes of an ``ndim``-array."""
    items = (axes,) if isinstance(axes, int) else axes
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {axes!r}") from None
    out = set()
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"{name}: expected ints, got {a!r} in {axes!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: axis {a} is out of range for an array of rank {ndim}")
        out.add(a % ndim)
    return frozenset(out)


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_key(name: str, key) -> None:
    """Accepts both new-style typed keys and raw uint32[2] keys."""
    if key is None:
        raise TypeError(f"{name}: expected a jax.random key, got None")
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is None or dtype != jnp.uint32 or tuple(np.shape(key))[-1:] != (2,):
        raise TypeError(
            f"{name}: expected a jax.random key (jax.random.key(...) or PRNGKey), "
            f"got {describe(key) if dtype is not None else type(key).__name__}"
        )


def check_tree_matches(name: str, tree, expected, what: str) -> None:
    """Checks that ``tree`` has the structure, shapes and dtypes of ``expected``."""
    t_struct = jax.tree_util.tree_structure(tree)
    e_struct = jax.tree_util.tree_structure(expected)
    if t_struct != e_struct:  # type: ignore[operator]  # jax's PyTreeDef stub is opaque
        raise ValueError(f"{name}: expected {what} with structure {e_struct}, got {t_struct}")
    for path_leaf, e_leaf in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree_util.tree_leaves(expected)
    ):
        path, leaf = path_leaf
        where = jax.tree_util.keystr(path)
        if tuple(np.shape(leaf)) != tuple(np.shape(e_leaf)):
            raise ValueError(
                f"{name}{where}: expected shape {describe(e_leaf)} for {what}, got {describe(leaf)}"
            )


def check_lengths(lengths, batch_shape, xs):
    """Validates ``lengths: int[*B]`` against the batch dims ``*B`` of ``xs: [T, *B, ...]``; returns an array."""
    lengths = as_array("lengths", lengths)
    check_integer("lengths", lengths)
    if tuple(lengths.shape) != tuple(batch_shape):
        raise ValueError(
            f"lengths: expected shape {list(batch_shape)} (the batch dims of xs "
            f"{describe(xs)}), got {describe(lengths)}"
        )
    return lengths


def compiled_after_checks(fn, static_argnames: tuple[str, ...]):
    """``fn``, the part of a public function that runs after its checks, as one compiled
    program where no argument is a tracer (a call outside ``jit``, ``grad`` and ``vmap``):
    ``jax.jit`` with ``static_argnames`` (passed by keyword), compiled once per shapes and
    settings instead of running op by op. Under a transformation it is ``fn`` itself,
    traced into the caller's program. The checks stay outside, on concrete values.

    >>> import jax.numpy as jnp
    >>> twice = compiled_after_checks(lambda x, *, n: x * n, ("n",))
    >>> twice(jnp.ones(2), n=2).tolist(), jax.jit(lambda x: twice(x, n=3))(jnp.ones(1)).tolist()
    ([2.0, 2.0], [3.0])
    """
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (fn if any_tracer(args, kwargs) else jitted)(*args, **kwargs)

    return call


def any_tracer(*trees) -> bool:
    """True when a leaf of ``trees`` is a tracer (the call is inside ``jit``, ``grad`` or
    ``vmap``)."""
    return not all(is_concrete(x) for x in jax.tree_util.tree_leaves(trees))


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_in_range(name: str, x, lo: int, hi: int, what: str = "") -> None:
    """Every entry of ``x`` in ``[lo, hi]`` (inclusive).

    Concrete ``x``: raises ``ValueError`` naming ``name``, the range and the
    offending value and its index. Traced ``x``: a ``checkify.debug_check``
    with the same message (checked only under :func:`jaxseq.checked`).
    ``what`` explains the bounds, e.g. ``" (T=10)"``.
    """
    head = f"{name}: expected values in [{lo}, {hi}]{what}, got "
    if is_concrete(x):
        v = np.asarray(x)
        bad = (v < lo) | (v > hi)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{head}{v[idx].item()} at index {list(idx)} (min {v.min()}, max {v.max()})"
            )
        return
    x = jnp.asarray(x)
    checkify.debug_check(
        jnp.all((x >= lo) & (x <= hi)), head + "min {} max {}", jnp.min(x), jnp.max(x)
    )


def check_step_lengths(lengths, batch_shape, t: int, xs):
    """``lengths: int[*B]`` of the sequences in ``xs: [T, *B, ...]``, each in ``[0, T]``
    (:func:`check_lengths`, then :func:`check_in_range`); returns them as int32.

    >>> check_step_lengths([3, 0], (2,), 3, jnp.zeros((3, 2, 4))).tolist()
    [3, 0]
    """
    lengths = check_lengths(lengths, batch_shape, xs)
    check_in_range("lengths", lengths, 0, t, f" (T={t})")
    return lengths.astype(jnp.int32)


def check_step_flags(name: str, x, shape, layout: str, of: str, ref):
    """A bool per step and sequence (``reset``, ``mask``) of ``shape``, laid out as
    ``layout`` (e.g. ``"[T, *B]"``) for the argument ``of`` (its value ``ref``,
    named in the message); returns it as an array.

    >>> check_step_flags("reset", [[True], [False]], (2, 1), "[T, *B]", "xs", jnp.zeros((2, 1, 3))).shape
    (2, 1)
    """
    x = as_array(name, x)
    check_bool(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {list(shape)} ({layout} of {of} {describe(ref)}), "
            f"got {describe(x)}"
        )
    return x
