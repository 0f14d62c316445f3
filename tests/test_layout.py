"""The package's boundaries: no module reaches into another package's private (``_underscore``) names.

A package here is a folder of ``fieldreid/`` (``gallery``, ``watch``, ``sync`` ...) or a top-level module
(``crop``, ``config`` ...). Inside a package, modules share their private names freely; across packages only
public names are used. Checked statically with :mod:`ast`:

* ``from fieldreid.X import _name`` / ``import fieldreid.X._mod`` from outside ``X``;
* ``obj._name`` where ``obj`` is not ``self``/``cls`` and ``_name`` is defined in another package only
  (a function, class, assignment or ``self._name`` attribute there, none in this package).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).parents[1] / "fieldreid"


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PKG.rglob("*.py"))}


def _defined(trees: dict[Path, ast.Module]) -> dict[str, set[str]]:
    """Private name -> the packages that define it."""
    where: dict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        unit = _unit(path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names = [node.id]
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names = [node.attr]
            elif isinstance(node, ast.arg):
                names = [node.arg]
            elif isinstance(node, ast.alias):
                names = [node.asname or node.name.split(".")[0]]
            elif isinstance(node, ast.keyword) and node.arg:
                names = [node.arg]
            where.update({n: where[n] | {unit} for n in names if _private(n)})
    return where


def violations() -> list[str]:
    trees = _modules()
    defined = _defined(trees)
    found = []
    for path, tree in trees.items():
        unit, rel = _unit(path), path.relative_to(PKG.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fieldreid"):
                parts = node.module.split(".")
                other = parts[1] if len(parts) > 1 else None
                for alias in node.names:
                    target = other or alias.name
                    hidden = any(_private(p) for p in parts[1:]) or _private(alias.name)
                    if hidden and target != unit:
                        found.append(f"{rel}:{node.lineno} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "fieldreid" and len(parts) > 1 and parts[1] != unit \
                            and any(_private(p) for p in parts[1:]):
                        found.append(f"{rel}:{node.lineno} imports {alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                owners = defined.get(node.attr, set())
                if owners and unit not in owners:
                    found.append(f"{rel}:{node.lineno} uses {ast.unparse(node)} (private to "
                                 f"{', '.join(sorted(owners))})")
    return found


def test_no_module_uses_another_packages_private_names():
    assert violations() == []


def test_the_check_sees_a_reach_into_a_private_name(tmp_path, monkeypatch):
    """The scanner itself: a planted reach across packages is reported, one inside a package is not."""
    pkg = tmp_path / "fieldreid"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "a" / "store.py").write_text("class S:\n    def _write(self):\n        self._con = 1\n")
    (pkg / "a" / "other.py").write_text("def f(s):\n    return s._con\n")
    (pkg / "b" / "user.py").write_text("from fieldreid.a.store import _helper\n\ndef g(s):\n    s._write()\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    found = violations()
    assert len(found) == 2
    assert any("imports fieldreid.a.store._helper" in f for f in found)
    assert any("s._write" in f and "private to a" in f for f in found)
