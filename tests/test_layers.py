"""The folders are the layers (docs/architecture.md, "Module map"): every import goes down the table, and no module
imports itself back through others (no cycles). Read off the source with ast: no module is executed."""

from __future__ import annotations

import ast
from pathlib import Path

import lowmem_paligemma

PACKAGE = Path(lowmem_paligemma.__file__).parent
# Lower rank first; the modules of one rank may import each other (no cycle), never a higher rank.
RANKS = {"errors": 0, "units": 0, "defaults": 0, "machine": 0, "profiling": 1, "checkpoint": 2, "formats": 3,
         "model": 4, "budget": 5, "pretrained": 6, "runtime": 7, "cli": 8}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package's modules `path` imports (absolute names), wherever in the file the import stands."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("lowmem_paligemma"):
                continue
            for alias in node.names:  # `from . import registry` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lowmem_paligemma")}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _rank(module: str) -> int | None:
    parts = module.split(".")
    return RANKS.get(parts[1]) if len(parts) > 1 else None  # the front door (lowmem_paligemma) has no rank


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_package_has_a_rank():
    top = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert top - {"__init__"} == set(RANKS)


def test_imports_only_go_down():
    upward = [(m, i) for m, imports in GRAPH.items() for i in imports
              if _rank(m) is not None and _rank(i) is not None and _rank(i) > _rank(m)]  # fmt: skip
    assert not upward, upward


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(GRAPH.get(module, ())):
            if nxt == "lowmem_paligemma" or nxt == module:
                continue
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path, module, nxt]))
            if state.get(nxt) is None:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(GRAPH):
        if state.get(module) is None and module != "lowmem_paligemma":
            visit(module, [])
