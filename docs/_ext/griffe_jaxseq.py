"""Griffe extension: jaxseq's docstrings as Markdown for mkdocstrings (Google style).

The docstrings are Google style (``Args:``, ``Returns:``) with a few
reStructuredText habits that Markdown does not know. Before rendering, this
rewrites, in every docstring of the package:

* parameters documented together (``block_q, block_k: ...``) into one
  ``Args`` entry per name, with the shared description;
* doctest examples (``>>>`` lines and their output, up to a blank line) into
  fenced ``pycon`` blocks (Markdown would read ``>>>`` as nested quotes);
* literal blocks introduced by ``::`` into fenced blocks;
* cross-reference roles (``:func:`rollout```, ``:class:`~jaxseq.protocols.Cell```,
  ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``) into
  links. A target is looked up from the object's own scope (its class, its
  module, the packages above it, then as a full path; ``js.`` stands for
  ``jaxseq.``, and the module's imports count); one that exists links to its
  page (under its canonical path) when it
  is documented there, and stays code otherwise. One that exists nowhere is
  left as a plain cross-reference, which the build reports as unresolved, so
  ``mkdocs build --strict`` fails on it.

The source files are not changed: this runs on the loaded object tree only.
"""

from __future__ import annotations

import builtins
import re

import griffe

ROLE = re.compile(
    r":(?:py:)?(func|class|mod|meth|attr|data|obj|exc|const):`(~?)([^`<>\s]+?)(\(\))?`"
)
FENCE = "```"
# Roots of names that belong to other libraries: shown as code, not linked.
OUTSIDE = {"jax", "jnp", "lax", "np", "numpy", "optax", "flax", "nnx", "torch", "orbax", "typing"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_blocks(text: str) -> str:
    """Doctest examples and ``::`` literal blocks as fenced code blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(FENCE):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        if stripped.startswith(">>>"):
            pad = " " * _indent(line)
            if out and out[-1].strip():
                out.append("")
            out.append(pad + FENCE + "pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(pad + FENCE)
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            # reST literal block: the indented lines after a blank line
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > base:
                head = stripped[:-2].rstrip()
                if head:
                    out.append(" " * base + head + ":")
                pad = " " * base
                out.extend(["", pad + FENCE])
                block_indent = _indent(lines[j])
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
                    k += 1
                while k > j and not lines[k - 1].strip():
                    k -= 1
                for src in lines[j:k]:
                    out.append(pad + src[block_indent:] if src.strip() else "")
                out.extend([pad + FENCE, ""])
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


ARG_SECTIONS = {
    "args",
    "arguments",
    "params",
    "parameters",
    "keyword args",
    "other parameters",
    "attributes",
}
SECTION = re.compile(r"^(\s*)([A-Za-z][A-Za-z ]*):\s*$")
GROUPED = re.compile(r"^(\s+)(\**\w+(?:\s*,\s*\**\w+)+)(\s*\([^)]*\))?:(\s.*)?$")


def split_grouped_args(text: str) -> str:
    """``a, b: description`` in an ``Args:`` section as one entry per name.

    Google style has one parameter per entry; each name gets the shared
    description, so every documented name is checked against the signature.
    """
    lines = text.split("\n")
    out: list[str] = []
    section_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        head = SECTION.match(line)
        if head:
            section_indent = _indent(line) if head.group(2).lower() in ARG_SECTIONS else None
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip() and _indent(line) <= section_indent:
            section_indent = None
        m = GROUPED.match(line) if section_indent is not None else None
        if not m:
            out.append(line)
            i += 1
            continue
        item_indent = _indent(line)
        j = i + 1
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) > item_indent:
            j += 1
        names = [n.strip() for n in m.group(2).split(",")]
        for name in names:
            out.append(f"{m.group(1)}{name}{m.group(3) or ''}:{m.group(4) or ''}")
            out.extend(lines[i + 1 : j])
        i = j
    return "\n".join(out)


def _lookup(collection, path: str):
    try:
        return collection.get_member(path)
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError):
        return None


def _canonical(obj) -> str:
    try:
        return obj.final_target.path if obj.is_alias else obj.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return obj.path


def _scopes(obj) -> list[str]:
    """Where a relative name is looked up: the object (a class or module), then
    each class and module above it, innermost first."""
    scopes = []
    node = obj
    while node is not None:
        if node.is_module or node.is_class:
            scopes.append(node.path)
        node = node.parent
    return scopes


def resolve(obj, name: str) -> str | None:
    """The canonical path of ``name`` seen from ``obj``, or None when it names nothing."""
    collection = obj.modules_collection
    candidates = [f"{scope}.{name}" for scope in _scopes(obj)] + [name]
    for path in candidates:
        found = _lookup(collection, path)
        if found is not None:
            return _canonical(found)
    module = obj.module
    try:
        target = module.resolve(name.split(".")[0])
    except (griffe.NameResolutionError, AttributeError, KeyError):
        return None
    rest = name.split(".")[1:]
    found = _lookup(collection, ".".join([target, *rest]))
    return _canonical(found) if found is not None else None


def link_roles(text: str, obj) -> str:
    """Cross-reference roles as (optional) autorefs links, unknown ones as plain refs."""

    def sub(m: re.Match) -> str:
        _, short, name, call = m.groups()
        title = (name.rsplit(".", 1)[-1] if short else name) + (call or "")
        if name.split(".")[0] in OUTSIDE or hasattr(builtins, name):
            return f"`{title}`"
        if name.startswith("js."):
            name = "jaxseq." + name[3:]
        target = resolve(obj, name)
        if target is None:
            return f"[`{title}`][{name}]"
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

    return ROLE.sub(sub, text)


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


class JaxseqDocstrings(griffe.Extension):
    """Rewrites the package's docstrings once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg, **kwargs) -> None:
        if pkg.name != "jaxseq":
            return
        for obj in _walk(pkg):
            doc = obj.docstring
            if doc is not None and doc.value:
                doc.value = link_roles(fence_blocks(split_grouped_args(doc.value)), obj)
