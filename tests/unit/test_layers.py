"""Imports go downward only (DESIGN.md), and ctypes lives in ``_abi/`` only.

Layers, lowest first: ``_abi`` < ``sys`` < ``snapshot`` < ``serve`` < (``guest``) < ``vmm`` <
``lab`` < ``cli`` (< ``pagein/__main__.py``). ``errors.py`` is importable by every layer
and imports no other pagein module.
Every import statement counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pagein

ROOT = Path(pagein.__file__).parent
# ``guest`` holds the C workloads (and at most a helper to locate them) below the VMM.
# ``demo`` is the README's main job: it drives serve (and later vmm) like the lab does.
RANK = {"errors": 0, "_abi": 1, "sys": 2, "snapshot": 3, "serve": 4, "guest": 5, "vmm": 6,
        "lab": 7, "demo": 7, "report": 7, "cli": 8, "__main__": 9, "__init__": 9}


def _layer(module: str) -> str:
    """Return the layer of a dotted pagein module name (``pagein.sys.uffd`` -> ``sys``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every pagein module ``path`` imports, with line numbers (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else _module_name(path)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # ``from pagein import sys`` imports the subpackage itself.
            if mod == "pagein":
                out += [(node.lineno, f"pagein.{a.name}") for a in node.names]
    return out


def _sources() -> list[Path]:
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 10, f"found only {len(files)} modules under {ROOT}"
    return files


def _layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_imports_only_go_downward() -> None:
    bad = []
    for path in _sources():
        mine = _layer_of_file(path)
        if mine not in RANK:
            bad.append(f"{path}: unknown layer {mine!r}: add it to RANK and DESIGN.md")
            continue
        for line, mod in _imports(path):
            if mod != "pagein" and not mod.startswith("pagein."):
                continue
            theirs = _layer(mod)
            if mod == "pagein" or theirs == mine:
                continue
            if theirs not in RANK or RANK[theirs] >= RANK[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {mod} ({theirs})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_errors_imports_no_pagein_module() -> None:
    mods = [m for _, m in _imports(ROOT / "errors.py") if m.startswith("pagein")]
    assert not mods


def test_ctypes_only_in_abi() -> None:
    bad = []
    for path in _sources():
        if _layer_of_file(path) == "_abi":
            continue
        for line, mod in _imports(path):
            if mod == "ctypes" or mod.startswith("ctypes."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "ctypes belongs in pagein/_abi only:\n" + "\n".join(bad)


def test_no_select_select_anywhere() -> None:
    """``select.select`` fails on fds >= 1024 ("filedescriptor out of range"): a server
    holding a thousand VMs has such fds. Wait with poll (``pagein.sys.poll``)."""
    bad = [f"{path.relative_to(ROOT)}:{n}" for path in _sources()
           for n, line in enumerate(path.read_text().splitlines(), 1)
           if "select.select(" in line and not line.lstrip().startswith("#")]
    assert not bad, "use pagein.sys.poll.wait_readable, not select.select:\n" + "\n".join(bad)


def test_the_checker_resolves_imports() -> None:
    # The walker must resolve relative imports, or a violation could hide behind one.
    f = ROOT / "sys" / "uffd.py"
    assert any(m == "pagein._abi" for _, m in _imports(f))
    assert _layer("pagein.serve.loop") == "serve"
    assert RANK[_layer("pagein.serve.loop")] > RANK[_layer_of_file(f)]


def _rich_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of every ``import rich...`` / ``from rich... import`` in path."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n == "rich" or n.startswith("rich.") for n in names):
            out.append((node.lineno, id(node) in top))
    return out


def test_rich_is_imported_only_where_something_is_drawn() -> None:
    """``rich`` lives in ``cli/_console.py`` only, imported inside the functions that draw
    on a terminal: ``pagein serve`` (which imports the CLI) and its workers never load it."""
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT)
        for line, top in _rich_imports(path):
            if str(rel) != "cli/_console.py":
                bad.append(f"{rel}:{line} imports rich (only cli/_console.py may)")
            elif top:
                bad.append(f"{rel}:{line} imports rich at module level (import it in the "
                           "function that draws)")
    assert not bad, "\n".join(bad)
    assert _rich_imports(ROOT / "cli" / "_console.py"), "the checker found no rich import"
