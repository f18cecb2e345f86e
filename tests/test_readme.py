"""The README's Python code runs as written, and its two commands match CI."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python blocks"
    namespace = {"__name__": "readme"}  # blocks build on each other, as a reader runs them
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(first) == 2
    assert "benchmarks.scan_vs_unrolled" in first[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1] in ci
