"""MkDocs build hooks: the benchmark and example results pages come from the repository.

``benchmarks/README.md`` and ``examples/README.md`` (and the result files they
link to) are added to the site as they are in the repository, at the same
paths, so their relative links keep working and the pages never go stale.
Nothing is fetched: the build reads the working tree only.
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Files or folders of the repository that the site shows, at the same paths.
INCLUDED = ("benchmarks/README.md", "benchmarks/results", "examples/README.md", "examples/results")


def on_files(files, config):
    """Adds the repository's results pages (and what they link to) to the site."""
    for rel in INCLUDED:
        path = ROOT / rel
        if path.is_file():
            paths = [path]
        else:
            paths = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".gitignore")
        for p in paths:
            uri = p.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(p)))
    return files
