"""The layering holds: the import-linter contracts of pyproject.toml, and no import cycle at all.

Both count lazy imports (an ``import`` inside a function) as imports: a
cycle or a wrong-way arrow hidden in a function is still one.
"""
from __future__ import annotations

import os
import subprocess
import tomllib

import grimp

from conftest import ROOT, VENV_BIN

#: The arrows that must never come back (issue 14): importer -> what it may not import.
FORBIDDEN = {
    "registryd.storage": {"registryd.web", "registryd.mirror", "registryd.auth", "registryd.upkeep",
                          "registryd.admin"},
    "registryd.upkeep": {"registryd.admin", "registryd.web"},
    "registryd.web": {"registryd.admin"},
}


def test_the_contracts_forbid_the_wrong_way_arrows() -> None:
    """The contracts lint-imports checks still say what the issue asks (none was dropped or narrowed)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    forbidden = [c for c in contracts if c["type"] == "forbidden" and not c.get("allow_indirect_imports")
                 and not c.get("ignore_imports")]
    for source, targets in FORBIDDEN.items():
        covered = set().union(*(set(c["forbidden_modules"]) for c in forbidden if source in c["source_modules"]))
        assert targets <= covered, (source, targets - covered)
    assert any(c["type"] == "acyclic_siblings" and c["ancestors"] == ["registryd"] for c in contracts)


def test_import_linter_contracts_are_kept() -> None:
    result = subprocess.run([os.path.join(VENV_BIN, "lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_among_registryd_modules_counting_lazy_imports() -> None:
    graph = grimp.build_graph("registryd", cache_dir=None)
    # The graph has the imports made inside functions (registryd.cli's htpasswd command imports its module lazily).
    assert "registryd.auth.htpasswd_file" in graph.find_modules_directly_imported_by("registryd.cli")
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)
