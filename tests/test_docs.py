"""The API reference site builds in strict mode, so a broken reference fails the tests.

``mkdocs build --strict`` (the command in docs/index.md) runs into a temporary
directory: any warning fails it (a docstring cross-reference that names nothing,
a broken link between pages, a docstring the Google-style parser cannot read).
The pages are then checked for what the docstring rewriting promises: the
examples as code blocks, cross-references as links, the results pages present.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MISSING = [
    m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx")
    if importlib.util.find_spec(m.split(".")[0]) is None
]  # fmt: skip
needs_mkdocs = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the docs tools are not installed ({', '.join(MISSING)}): pip install -e '.[dev]'",
)


def _build(config: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_mkdocs
def test_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    run = _build(ROOT / "mkdocs.yml", site)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stderr[-6000:]}"
    pages = {
        name: (site / name / "index.html").read_text()
        for name in ("api/recurrent", "api/core", "api/flax", "benchmarks", "examples")
    }
    rec = pages["api/recurrent"]
    # the public API, time_major documented
    assert 'id="jaxseq.recurrent.rollout"' in rec and "time_major" in rec
    # doctest examples are code blocks, not nested quotes; roles became links
    assert "<blockquote>" not in rec and "&gt;&gt;&gt;" in rec
    assert not re.search(r":(func|class|mod|meth):`", rec)
    assert 'href="#jaxseq.recurrent.auto_unroll"' in rec  # :func:`~...dispatch.auto_unroll`
    # grouped Args entries come out one per name
    attention = (site / "api/attention/index.html").read_text()
    assert "<b><code>block_q</code></b>" in attention
    assert "<b><code>block_k</code></b>" in attention
    assert 'id="jaxseq.protocols.SequenceLayer"' in pages["api/core"]
    assert "jaxseq.flax.linen" in pages["api/flax"]
    # the results pages are the repository's READMEs, with what they link to
    assert "benchmarks/README.md" not in pages["benchmarks"]
    assert (site / "benchmarks/results/frameworks/frameworks/index.html").exists()
    assert len(pages["examples"]) > 1000


@needs_mkdocs
def test_a_reference_to_nothing_fails_the_build(tmp_path):
    """A docstring role naming nothing and a page link to a missing object both
    fail the strict build (one small site with the same plugins and extension)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# probe\n\n::: jaxseq.masks.lengths_to_mask\n\nSee [nothing][jaxseq.masks.no_such_name].\n"
    )
    main = (ROOT / "mkdocs.yml").read_text()
    plugins = main[main.index("\nplugins:") : main.index("\nnav:")]
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        f"site_name: probe\ndocs_dir: {docs}\nmarkdown_extensions:\n  - pymdownx.superfences"
        + plugins.replace("docs/_ext/", f"{ROOT}/docs/_ext/").replace("[.]", f"[{ROOT}]")
    )
    run = _build(config, tmp_path / "site")
    assert run.returncode != 0
    assert "jaxseq.masks.no_such_name" in run.stderr


def _extension():
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe (from mkdocstrings-python) is not installed: pip install -e '.[dev]'")
    path = ROOT / "docs/_ext/griffe_jaxseq.py"
    spec = importlib.util.spec_from_file_location("griffe_jaxseq", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docstring_rewriting(tmp_path):
    """The griffe extension's rewriting, on text and on a small package (no build)."""
    ext = _extension()
    doc = textwrap.dedent(
        """\
        Summary.

        Args:
          a, b: shared
            description.
          c: alone.

        Example::

            x = 1

        >>> 1 + 1
        2
        """
    )
    out = ext.fence_blocks(ext.split_grouped_args(doc))
    assert "  a: shared\n    description.\n  b: shared\n    description.\n  c: alone." in out
    assert "Example:\n\n```\nx = 1\n```" in out
    assert "```pycon\n>>> 1 + 1\n2\n```" in out

    import griffe

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe/__init__.py").write_text("from probe.inner import f\n")
    (tmp_path / "probe/inner.py").write_text('def f():\n    "F."\n\n\ndef g():\n    "G."\n')
    pkg = griffe.load("probe", search_paths=[str(tmp_path)])
    linked = ext.link_roles(
        ":func:`f`, :func:`~probe.f`, :func:`nothing`, :func:`jax.jit`, :exc:`ValueError`",
        pkg["inner"]["g"],
    )
    # a name in scope and an alias both link to the canonical path (optional:
    # plain code when no page documents it); a name of nothing stays a plain
    # reference, which the build reports as unresolved; other libraries: code
    assert linked == (
        '<autoref identifier="probe.inner.f" optional><code>f</code></autoref>, '
        '<autoref identifier="probe.inner.f" optional><code>f</code></autoref>, '
        "[`nothing`][nothing], `jax.jit`, `ValueError`"
    )


def test_quickstart_commands_are_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    quickstart = (ROOT / "docs/quickstart.md").read_text()
    commands = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    assert len(commands) == 2
    for cmd in commands:
        assert cmd.strip() in readme, f"docs/quickstart.md differs from README.md: {cmd}"


def test_the_core_page_and_the_readme_list_the_top_level():
    """docs/api/core.md and the README's layout name every top-level name (no build needed)."""
    import jaxseq as js

    core = (ROOT / "docs/api/core.md").read_text()
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("### Renamed in")]
    for text, where in ((core, "docs/api/core.md"), (layout, "the README's layout")):
        missing = [n for n in js.__all__ if f"`{n}`" not in text and f"`js.{n}`" not in text]
        assert not missing, f"{where} does not list these top-level names: {missing}"
