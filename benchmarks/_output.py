"""Result files and what people see while a benchmark runs.

* :func:`write_results` -- ``<name>.json`` (environment + records) and
  ``<name>.md`` (a Markdown table + the environment).
* :func:`format_table` -- the Markdown table of a list of records.
* :func:`progress` -- a tqdm bar, off when stdout is not a terminal or ``quiet``.

Plots (PNG, matplotlib's Agg backend) are drawn by each script, next to these files.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["format_table", "progress", "write_results"]


def progress(iterable: Iterable, desc: str, *, quiet: bool = False, total: int | None = None):
    """A tqdm bar over ``iterable``; disabled when stdout is not a terminal or ``quiet``."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=quiet or not sys.stdout.isatty(),
        leave=False,
        dynamic_ncols=True,
    )


def _scalar(v) -> bool:
    return v is None or isinstance(v, str | bool | int | float | np.integer | np.floating)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float | np.floating):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}" if a < 1000 else f"{v:.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def format_table(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per record, ``columns`` (default: every scalar key seen)."""
    if columns is None:
        columns = []
        for rec in records:
            for k, v in rec.items():
                if k not in columns and _scalar(v):
                    columns.append(k)
    if not columns:
        return ""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for rec in records:
        lines.append("| " + " | ".join(_fmt(rec.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(
    out_dir,
    name: str,
    records: list[dict],
    env: dict,
    columns: list[str] | None = None,
    *,
    extra_md: str | None = None,
    title: str | None = None,
) -> dict:
    """Writes ``out_dir/<name>.json`` and ``out_dir/<name>.md``; returns their paths.

    The JSON is ``{"environment": env, "records": records}``; the Markdown holds
    ``title``, the table of ``records`` (``columns``, default every scalar key),
    ``extra_md`` (optional further sections) and the environment as a list.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    payload = {"environment": _jsonable(env), "records": _jsonable(list(records))}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    parts = [f"# {title or name}", "", format_table(records, columns), ""]
    if extra_md:
        parts += [extra_md.rstrip(), ""]
    parts += ["## Environment", ""]
    parts += [f"- {k}: `{_fmt(v) if v != '' else '(unset)'}`" for k, v in env.items()]
    md_path.write_text("\n".join(parts) + "\n")
    return {"json": str(json_path), "md": str(md_path)}
