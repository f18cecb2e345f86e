"""The package's shape: layers import only downward, the public API is explicit and documented.

These read the source (``ast``), so they fail on an import that points up,
a public name without a docstring example, or a private JAX import, before any
of it breaks at run time.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

import jaxseq as js

ROOT = pathlib.Path(js.__file__).parent

# Bottom to top. A module may import from its own layer and from any layer below it.
LAYERS = [
    ("jaxseq._checks", "jaxseq._numerics"),
    ("jaxseq.masks", "jaxseq.initializers", "jaxseq.protocols", "jaxseq.checks"),
    ("jaxseq.nn",),
    ("jaxseq.recurrent",),
    ("jaxseq.attention",),
    ("jaxseq.data",),
    ("jaxseq.models",),
    ("jaxseq.decoding",),
    ("jaxseq.training",),
    ("jaxseq.interop",),
    ("jaxseq.flax",),  # optional: needs Flax, never imported by the package itself
]


def _rank(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        for n in names:
            if module == n or module.startswith(n + "."):
                return i
    return None


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """``(line, imported module)`` for every jaxseq import in a file, ``from a import b`` as ``a.b``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                yield node.lineno, f"{node.module}.{a.name}"


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in SOURCES if p != ROOT / "__init__.py"]
    missing = [m for m in missing if _rank(m) is None]
    assert not missing, f"modules outside the layer list (add them to LAYERS): {missing}"


@pytest.mark.parametrize("path", [p for p in SOURCES if p != ROOT / "__init__.py"], ids=str)
def test_imports_point_down(path):
    me = _module_name(path)
    mine = _rank(me)
    up = []
    for line, mod in _imports(path):
        if mod == "jaxseq" or not mod.startswith("jaxseq."):
            if mod == "jaxseq":
                up.append(f"line {line}: imports the top-level package")
            continue
        r = _rank(mod)
        if r is not None and r > mine:
            up.append(f"line {line}: {me} (layer {mine}) imports {mod} (layer {r})")
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_the_import_graph_check_sees_an_upward_import(tmp_path):
    # The check itself can fail: a module of the recurrent layer importing training is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("from jaxseq.training import fit\nimport jaxseq.masks\n")
    ups = [m for _, m in _imports(bad) if (_rank(m) or 0) > _rank("jaxseq.recurrent")]
    assert ups == ["jaxseq.training.fit"]


def test_no_private_jax_imports():
    bad = [
        f"{p.relative_to(ROOT.parent)}:{line} imports {mod}"
        for p in SOURCES
        for line, mod in _imports(p)
        if mod.startswith("jax._src")
    ]
    text_hits = [str(p) for p in SOURCES if "jax._src" in p.read_text()]
    assert not bad and not text_hits, bad or text_hits


def test_all_is_explicit_sorted_and_resolves():
    assert len(js.__all__) == len(set(js.__all__))
    for name in js.__all__:
        assert hasattr(js, name), name
    for pkg in (js.recurrent, js.nn, js.attention, js.data, js.models, js.training, js.masks):
        for name in pkg.__all__:
            assert getattr(js, name) is getattr(pkg, name), (
                f"js.{name} is not {pkg.__name__}.{name}"
            )
    private = [n for n in js.__all__ if n.startswith("_")]
    assert not private


def _public_callables():
    seen = set()
    for name in js.__all__:
        obj = getattr(js, name)
        if inspect.ismodule(obj) or id(obj) in seen:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            seen.add(id(obj))
            yield name, obj


def test_every_public_function_and_class_has_a_docstring_example():
    missing = []
    for name, obj in _public_callables():
        doc = inspect.getdoc(obj) or ""
        if issubclass(type(obj), type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
            # NamedTuple containers of params/carries: fields and shapes suffice
            if not doc or doc.startswith(f"{name}("):
                missing.append(f"{name} (no docstring)")
            continue
        if inspect.isclass(obj) and issubclass(obj, Exception):
            if not doc:
                missing.append(f"{name} (no docstring)")
            continue
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"public names without a runnable docstring example: {missing}"


def test_examples_import_only_the_public_api():
    examples = pathlib.Path(__file__).parent.parent / "examples"
    bad = []
    for p in sorted(examples.glob("*.py")):
        for line, mod in _imports(p):
            if mod.startswith("jaxseq.") and any(part.startswith("_") for part in mod.split(".")):
                bad.append(f"{p.name}:{line} imports {mod}")
    assert not bad, bad
