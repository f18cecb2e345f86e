"""The package as users get it: the sdist and wheel build offline and pass ``twine check``,
the wheel installs into a fresh environment and runs the README's Quickstart from there,
and mypy passes on the sources (at the level set in ``pyproject.toml``)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import jaxseq

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The copy the distributions are built from leaves out version control, build outputs,
# caches, environments and run outputs (none of them is packaged).
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", "__pycache__", "*.egg-info", "build", "dist", ".*cache", ".hypothesis", "site",
    ".venv", "venv", "results", "out",
)  # fmt: skip


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _quickstart() -> str:
    """The first python block under the README's "## Quickstart" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """``(sdist, wheel)`` built offline from a copy of the checkout, the wheel from the sdist."""
    tmp = tmp_path_factory.mktemp("dists")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    out = tmp / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_distributions_pass_twine_check_and_hold_the_package(dists):
    sdist, wheel = dists
    _run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)])
    assert wheel.name == f"jaxseq-{jaxseq.__version__}-py3-none-any.whl"

    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxseq/py.typed" in names
    assert {n.split("/")[0] for n in names} == {"jaxseq", f"jaxseq-{jaxseq.__version__}.dist-info"}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxseq").rglob("*.py")}
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"

    with tarfile.open(sdist) as tar:
        top = {n.split("/", 2)[1] for n in tar.getnames() if n.count("/") >= 1}
    wanted = {"README.md", "CHANGELOG.md", "pyproject.toml", "jaxseq"}
    wanted |= {p.name for p in ROOT.glob("LICEN[CS]E*")}
    assert wanted <= top, f"missing from the sdist: {sorted(wanted - top)}"
    assert not top & {"tests", "benchmarks", "examples", "docs"}, sorted(top)


def test_wheel_installs_and_runs_the_quickstart_from_its_own_environment(dists, tmp_path):
    _, wheel = dists
    venv = tmp_path / "venv"
    # The interpreter's own packages (jax, ...) are visible, so nothing is downloaded; its
    # pip installs into the new environment.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = str(next(p for p in (bin_dir / "python", bin_dir / "python.exe") if p.exists()))
    _run([python, "-m", "pip", "install", "--no-index", "--no-deps", "-q", str(wheel)])

    script = tmp_path / "quickstart.py"
    script.write_text(
        _quickstart()
        + "\nimport importlib.metadata\n"
        + "print(js.__file__)\n"
        + "assert importlib.metadata.version('jaxseq') == js.__version__\n"
    )
    # -I: no PYTHONPATH, user site or script directory, so no route back to the checkout
    # (its editable install is in the interpreter's packages, behind the environment's own).
    out = _run([python, "-I", str(script)], cwd=tmp_path)
    imported = pathlib.Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert imported.is_relative_to(venv.resolve()), imported
    assert not imported.is_relative_to(ROOT), imported


def test_mypy_passes():
    """``python -m mypy`` with the settings of ``[tool.mypy]`` in pyproject.toml."""
    _run([sys.executable, "-m", "mypy"], cwd=ROOT)
