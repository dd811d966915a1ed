"""The package layout stays as designed: imports go one way (plugins and the store below the
stages, the stages below the engine, the engine below the command line), and nothing outside
pestle/store touches MongoDB itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pestle"

# package -> pestle packages it must never import
FORBIDDEN = {
    "store": {"stages", "engine", "cli", "dispatch", "reports", "samplers", "potentials",
              "selectors", "labellers", "trainers", "scoring", "evaluation"},
    "samplers": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "potentials": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "selectors": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "labellers": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "trainers": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "formats": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "scoring": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "evaluation": {"store", "stages", "engine", "cli", "dispatch", "reports"},
    "dispatch": {"stages", "engine", "cli", "reports"},
    "stages": {"engine", "cli"},
    "reports": {"engine", "cli"},
    "engine": {"cli"},
}  # fmt: skip
MONGO_MODULES = ("pymongo", "gridfs")


def modules(package: str) -> list[Path]:
    folder = ROOT / package
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    for path in modules(package):
        for name in imported(path):
            parts = name.split(".")
            if parts[0] == "pestle" and len(parts) > 1:
                assert parts[1] not in FORBIDDEN[package], (
                    f"{path.relative_to(ROOT.parent)} imports {name}"
                )


def test_only_the_store_speaks_to_mongodb() -> None:
    for path in ROOT.rglob("*.py"):
        if path.is_relative_to(ROOT / "store"):
            continue
        for name in imported(path):
            assert name.split(".")[0] not in MONGO_MODULES, (
                f"{path.relative_to(ROOT.parent)} imports {name}: only pestle/store may"
            )
        tree = ast.parse(path.read_text())
        private = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("_db", "_c", "_client")
        }
        assert not private, f"{path.relative_to(ROOT.parent)} reaches into the store: {private}"


def test_every_package_is_covered() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages - set(FORBIDDEN) <= {"cli"}, sorted(packages - set(FORBIDDEN))
