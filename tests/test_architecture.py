"""The package's shape: layers import only downward, the public API is explicit and documented.

These read the source (``ast``), so they fail on an import that points up,
a public name without a docstring example, or a private JAX import, before any
of it breaks at run time.
"""

from __future__ import annotations

import ast
import inspect
import io
import pathlib
import re
import tokenize

import pytest

import jaxseq as js

ROOT = pathlib.Path(js.__file__).parent

# Bottom to top. A module may import from its own layer and from any layer below it.
LAYERS = [
    ("jaxseq._checks", "jaxseq._numerics"),
    ("jaxseq.host_memory",),  # first: sets malloc up before JAX starts a backend
    ("jaxseq.masks", "jaxseq.initializers", "jaxseq.protocols", "jaxseq.checks"),
    ("jaxseq.nn",),
    ("jaxseq.recurrent",),
    ("jaxseq.attention",),
    ("jaxseq.data",),
    ("jaxseq.models",),
    ("jaxseq.decoding",),
    ("jaxseq.training",),
    ("jaxseq.interop",),
    ("jaxseq.flax", "jaxseq.equinox"),  # optional: need Flax/Equinox, never imported by the package
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
    # host_memory only asks whether JAX has started a backend, reading the private
    # module's state if it is loaded (JAX has no public query that does not start one)
    allowed = {ROOT / "host_memory.py"}
    text_hits = [str(p) for p in SOURCES if "jax._src" in p.read_text() and p not in allowed]
    assert not bad and not text_hits, bad or text_hits


# The sub-packages (and public modules of the lowest layer) whose ``__all__`` the top level draws on.
SUBPACKAGES = (
    "host_memory",
    "protocols",
    "masks",
    "initializers",
    "checks",
    "nn",
    "recurrent",
    "attention",
    "data",
    "models",
    "decoding",
    "training",
    "interop",
)
MAX_TOP_LEVEL = 60


def _home(name: str) -> str:
    """The sub-package a top-level name comes from (``"modules"`` for the sub-packages)."""
    if inspect.ismodule(getattr(js, name)):
        return "modules"
    homes = [s for s in SUBPACKAGES if name in getattr(js, s).__all__]
    assert len(homes) == 1, f"js.{name} is listed by {homes or 'no sub-package'}"
    return homes[0]


def test_all_is_explicit_sorted_and_resolves():
    """Every top-level name is its sub-package's object, listed once, grouped by
    sub-package (the sub-packages first), sorted within each group."""
    assert len(js.__all__) == len(set(js.__all__))
    assert not [n for n in js.__all__ if n.startswith("_")]
    for name in js.__all__:
        assert hasattr(js, name), name
        home = _home(name)
        if home == "modules":
            assert getattr(js, name).__name__ == f"jaxseq.{name}", name
        else:
            sub = getattr(js, home)
            assert getattr(js, name) is getattr(sub, name), (
                f"js.{name} is not {sub.__name__}.{name}"
            )
    groups = [_home(n) for n in js.__all__]
    order = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    assert len(order) == len(set(order)), f"groups not contiguous in __all__: {order}"
    assert order[0] == "modules"
    for g in order:
        names = [n for n, h in zip(js.__all__, groups) if h == g]
        assert names == sorted(names), f"group {g} not sorted: {names}"
    for s in SUBPACKAGES:
        assert s in js.__all__ and getattr(js, s).__name__ == f"jaxseq.{s}"
        for name in getattr(js, s).__all__:
            assert hasattr(getattr(js, s), name), f"jaxseq.{s}.__all__ lists missing {name}"


def _over_limit(names, limit=MAX_TOP_LEVEL) -> str | None:
    if len(names) > limit:
        return f"the top level exports {len(names)} names (at most {limit}): move some to their sub-package"
    return None


def test_the_top_level_is_a_small_core():
    assert _over_limit(js.__all__) is None, _over_limit(js.__all__)


def test_the_size_check_sees_a_large_top_level():
    assert _over_limit([f"n{i}" for i in range(MAX_TOP_LEVEL + 1)]) is not None
    assert _over_limit([f"n{i}" for i in range(MAX_TOP_LEVEL)]) is None


# ---- short functions -----------------------------------------------------------------

MAX_FUNCTION_LINES = 80


def _function_lengths(source: str):
    """``(qualified name, line, lines of code)`` of every function, docstring excluded:
    from the first statement after the docstring to the function's last line."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body
                first = body[0]
                is_doc = (
                    isinstance(first, ast.Expr)
                    and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)
                )
                start = body[1].lineno if is_doc and len(body) > 1 else first.lineno
                lines = 0 if is_doc and len(body) == 1 else child.end_lineno - start + 1
                name = f"{prefix}{child.name}"
                out.append((name, child.lineno, lines))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def _long_functions(path: pathlib.Path):
    return [
        f"{path.relative_to(ROOT.parent)}:{line} {name}: {n} lines"
        for name, line, n in _function_lengths(path.read_text())
        if n > MAX_FUNCTION_LINES
    ]


def test_no_function_is_longer_than_80_lines():
    long = [hit for p in SOURCES for hit in _long_functions(p)]
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines of code (split them):\n" + "\n".join(long)
    )


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    doc = '    """A docstring\n    of three\n    lines."""\n'
    ok = tmp_path / "ok.py"
    ok.write_text(f"def f():\n{doc}{body}\n")  # 80 lines of code: the docstring is not counted
    long = tmp_path / "long.py"
    long.write_text(
        f"class C:\n    def g(self):\n{body}\n        return 1\n".replace("\n    x", "\n        x")
    )
    assert [n for _, _, n in _function_lengths(ok.read_text())] == [MAX_FUNCTION_LINES]
    hits = [
        (name, n) for name, _, n in _function_lengths(long.read_text()) if n > MAX_FUNCTION_LINES
    ]
    assert hits == [("C.g", MAX_FUNCTION_LINES + 1)]


# ---- nothing private crosses a sub-package ---------------------------------------------

SHARED_PRIVATE = ("jaxseq._checks", "jaxseq._numerics")  # the lowest layer's shared helpers


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _is_module(dotted: str) -> bool:
    rel = pathlib.Path(*dotted.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _private_imports(source: str, me: str):
    """``(line, what)`` for each private name (a path part starting with ``_``) that the
    module ``me`` takes from another sub-package: imported, or read off an imported module."""
    mine = _subpackage(me)
    tree = ast.parse(source)
    hits, modules = [], {}

    def foreign(path: str) -> bool:
        return _subpackage(path) != mine and not path.startswith(SHARED_PRIVATE)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            paths = [(a.name, a.asname) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            paths = [(f"{node.module}.{a.name}", a.asname or a.name) for a in node.names]
        else:
            continue
        for path, local in paths:
            if not path.startswith("jaxseq.") or not foreign(path):
                continue
            private = [
                p for p in path.split(".")[1:] if p.startswith("_") and not p.startswith("__")
            ]
            if private:
                hits.append((node.lineno, path))
            elif local and _is_module(path):
                modules[local] = path
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            hits.append((node.lineno, f"{modules[node.value.id]}.{node.attr}"))
    return hits


def test_no_private_name_crosses_a_subpackage():
    bad = [
        f"{p.relative_to(ROOT.parent)}:{line} imports {what}"
        for p in SOURCES
        for line, what in _private_imports(p.read_text(), _module_name(p))
    ]
    assert not bad, "private names used across sub-packages (make them public, or move them to "
    "jaxseq._checks / jaxseq._numerics):\n" + "\n".join(bad)


def test_the_privacy_check_sees_a_private_import():
    src = (
        "from jaxseq.masks import _causal_offset\n"  # another sub-package's private name
        "from jaxseq.recurrent import rollouts\n"
        "from jaxseq.recurrent._segments import step\n"  # a private module, same sub-package
        "from jaxseq import _checks\n"  # the shared lowest layer: allowed
        "from jaxseq._numerics import acc_dtype\n"
        "x = rollouts._prepare\n"
    )
    assert _private_imports(src, "jaxseq.attention.dot_product") == [
        (1, "jaxseq.masks._causal_offset"),
        (3, "jaxseq.recurrent._segments.step"),
        (6, "jaxseq.recurrent.rollouts._prepare"),
    ]
    assert _private_imports(src, "jaxseq.recurrent.minimal") == [(1, "jaxseq.masks._causal_offset")]


# ---- no timings in the library's docstrings and comments -------------------------------

TIMING = re.compile(
    r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|us|µs|ns|s|sec|seconds|min|minutes)\b(?![/\w])"
    r"|\b[KMGT]?FLOP/?s\b|\bGFLOPS\b"
)


def _docs_and_comments(source: str):
    """``(line, text)`` of every comment and docstring of a module."""
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node.body[0].lineno, doc


def _timings(source: str):
    return [
        (line, m.group(0))
        for line, text in _docs_and_comments(source)
        for m in TIMING.finditer(text)
    ]


def test_no_timings_in_library_docstrings_or_comments():
    bad = [
        f"{p.relative_to(ROOT.parent)}:{line} {hit!r}"
        for p in SOURCES
        for line, hit in _timings(p.read_text())
    ]
    assert not bad, "measurements belong in benchmarks/README.md, not the library's text:\n" + (
        "\n".join(bad)
    )


def test_the_timing_check_sees_a_measurement():
    src = (
        '"""Module.\n\nThe fused kernel: 12.5 ms per step."""\n'
        "def f(x):\n"
        '    """Doc: 3 s on CPU, 134 GFLOP/s."""\n'
        "    return x  # 85.3 vs 87.9 ms\n"
        "# not timings: 3 steps, min 0 max 9, x.shape[2], 4 sequences, [T, B] s\n"
        'MSG = "took 2 s"  # a string, not a docstring or comment\n'
    )
    assert sorted(h for _, h in _timings(src)) == sorted(["12.5 ms", "3 s", "GFLOP/s", "87.9 ms"])


def _public_callables():
    """The top level's and every sub-package's public functions and classes, once each."""
    seen = set()
    names = [(n, getattr(js, n)) for n in js.__all__]
    names += [(n, getattr(getattr(js, s), n)) for s in SUBPACKAGES for n in getattr(js, s).__all__]
    for name, obj in names:
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


def test_the_rename_table_sends_each_name_to_its_subpackage():
    """Each "`js.X` for X in ..." row of the README's rename table names what left the
    top level, and each name is where the row says it went."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("### Renamed in") :]
    rows = re.findall(r"^\| `js\.X` for X in (.*?) \| `js\.(\w+)\.X` \|$", table, flags=re.M)
    assert rows, "no `js.X` for X in ... rows in the rename table"
    for names, sub in rows:
        for name in re.findall(r"`(\w+)`", names):
            assert name not in js.__all__, f"js.{name} is still at the top level"
            assert hasattr(getattr(js, sub), name), f"js.{sub}.{name} does not exist"
