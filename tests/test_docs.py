"""docs/architecture.md names only what exists: every file and folder, every `module.name`, every bare function or
class name in backticks is looked up in the package (by its source, with ast: nothing is imported or run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lowmem_paligemma

ROOT = Path(lowmem_paligemma.__file__).parent.parent
PACKAGE = ROOT / "lowmem_paligemma"
DOC = ROOT / "docs" / "architecture.md"


def _definitions(path: Path) -> dict[str, set[str]]:
    """{"": names defined at module level, ClassName: its attributes and methods} of one source file."""
    out: dict[str, set[str]] = {"": set()}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            out[""].add(node.name)
        if isinstance(node, ast.ClassDef):
            members = out.setdefault(node.name, set())
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Assign):
            out[""] |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[""].add(node.target.id)
    return out


MODULES = {p: _definitions(p) for p in PACKAGE.rglob("*.py")}
# torch's and transformers' names the page mentions (what `to_empty` leaves behind, what is rebuilt)
EXTERNAL = {"to_empty", "position_ids", "inv_freq", "embed_scale", "DecodeStream"}
BY_STEM: dict[str, list[Path]] = {}
for _path in MODULES:
    BY_STEM.setdefault(_path.stem if _path.stem != "__init__" else _path.parent.name, []).append(_path)
TOP = set().union(*(d[""] for d in MODULES.values()))
CLASSES = {name: members for d in MODULES.values() for name, members in d.items() if name}


def _path_exists(span: str) -> bool:
    """A file or folder: under the package, from the repository root (tests/..., docs/...), or a module's file
    name in a row about its package (`loader.py` beside checkpoint/)."""
    if any((base / span).exists() for base in (PACKAGE, ROOT, PACKAGE / "runtime", ROOT / "bench")):
        return True
    return "/" not in span and span.endswith(".py") and span.removesuffix(".py") in BY_STEM


def _module_path(parts: list[str]) -> Path | None:
    """The source file of a dotted package path (model.config -> model/config.py), or None."""
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _check(span: str) -> str | None:
    """None if `span` names something that exists, else why not; spans that are not names are not checked."""
    if span.endswith((".py", "/", ".md", ".html")):
        return None if _path_exists(span) else "no such file or folder"
    if span.endswith(".json"):
        return None  # a file of a checkpoint (config.json), not ours
    m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?", span)
    if m:
        parts = m[1].split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a package path: pretrained.model_dir...
            path = _module_path(parts[:cut])
            if path is not None and (cut > 1 or path.parent != PACKAGE or len(parts) > 1):
                rest = parts[cut:]
                if not rest:
                    return None
                if rest[0] not in MODULES[path][""] and rest[0] not in MODULES[path]:
                    return f"{'.'.join(parts[:cut])} has no {rest[0]}"
                return None if len(rest) == 1 or rest[1] in CLASSES.get(rest[0], ()) else f"no {'.'.join(rest)}"
        left, right = parts[0], parts[1]
        if left in BY_STEM:  # module.name, the module by its file name
            return None if any(right in MODULES[p][""] for p in BY_STEM[left]) else f"{left} has no {right}"
        if left in CLASSES:  # Class.member
            return None if right in CLASSES[left] else f"class {left} has no {right}"
        return f"{left} is neither a module nor a class of the package"
    if re.fullmatch(r"[A-Za-z_]\w*(?:\(\))?", span) and ("_" in span or span[0].isupper() or span.endswith("()")):
        name = span.removesuffix("()")
        members = set().union(*CLASSES.values())
        known = name in TOP or name in CLASSES or name in members or name in EXTERNAL
        return None if known else "defined nowhere in the package"
    return None


def _spans(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # the diagrams: checked below, by their dotted names
    return re.findall(r"`([^`\n]+)`", text)


def test_every_backticked_name_exists():
    bad = {s: why for s in _spans(DOC.read_text()) if (why := _check(s))}
    assert not bad, bad


def test_every_dotted_name_in_the_diagrams_exists():
    diagrams = "\n".join(re.findall(r"```(.*?)```", DOC.read_text(), flags=re.S))
    names = set(re.findall(r"\b([a-z_]+\.[A-Za-z_]+)\b", diagrams))
    bad = {n: why for n in names if not n.endswith((".py", ".md")) and (why := _check(n))}
    assert not bad, bad


def test_the_checker_can_fail():
    assert _check("loader.stream_checkpoint") is None and _check("registry.get") is None
    assert _check("loader.check_memory")  # the drift this test exists for: the function lives in preflight.py
    assert _check("formats/nope.py") and _check("NoSuchClass") and _check("LoadedModel.nothing")
