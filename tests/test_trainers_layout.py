"""The layering of the trainers and the formats, checked on the source (``ast``), so it holds
without importing torch or any training library:

* no module in pestle/trainers imports a trainer family (chgnet, mace, matgl) other than
  itself; the shared modules (base, modes, linear, references) import none;
* a family imports only the trainers' package and shared modules, the potentials' package and
  its own potential family, the formats, and pestle's foundation modules (plugins, structures),
  which import no stage, engine or store;
* pestle/formats imports nothing else of pestle (the exporters and the trainers both use it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pestle

ROOT = Path(pestle.__file__).parent
FAMILIES = ("chgnet", "mace", "matgl")
SHARED = ("base", "modes", "linear", "references", "replay")


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(source: str, package: str) -> dict[str, set[str]]:
    """pestle modules ``source`` (a module of ``package``) imports -> the names taken from
    each (empty for ``import x``). ``from package import module`` imports that module."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{module}" if module else base
            for alias in node.names:
                if is_module(f"{module}.{alias.name}"):
                    found.setdefault(f"{module}.{alias.name}", set())
                else:
                    found.setdefault(module, set()).add(alias.name)
    return {name: names for name, names in found.items() if name.split(".")[0] == "pestle"}


def imports(path: Path) -> dict[str, set[str]]:
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    return imports_of(path.read_text(), package)


def trainer_modules() -> list[Path]:
    return sorted((ROOT / "trainers").glob("*.py"))


def test_the_layout_is_what_the_tests_expect() -> None:
    stems = {path.stem for path in trainer_modules()}
    assert {"__init__", *FAMILIES, *SHARED} <= stems
    assert (ROOT / "formats" / "__init__.py").is_file()


@pytest.mark.parametrize("path", trainer_modules(), ids=lambda path: path.stem)
def test_no_trainer_module_imports_another_family(path: Path) -> None:
    others = {f"pestle.trainers.{family}" for family in FAMILIES if family != path.stem}
    wrong = sorted(name for name in imports(path) if name in others)
    assert not wrong, f"{path.name} imports {wrong}"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_shared_modules_and_its_own_potential(family: str) -> None:
    allowed = {
        "pestle.trainers",
        *(f"pestle.trainers.{module}" for module in SHARED),
        "pestle.potentials",
        f"pestle.potentials.{family}",
        "pestle.potentials.checkpoints",
        "pestle.plugins",
        "pestle.structures",
    }
    found = imports(ROOT / "trainers" / f"{family}.py")
    wrong = sorted(
        name for name in found if name not in allowed and not name.startswith("pestle.formats")
    )
    assert not wrong, f"trainers/{family}.py imports {wrong}"


@pytest.mark.parametrize("module", ["__init__", *SHARED])
def test_shared_modules_import_no_potential_family(module: str) -> None:
    found = imports(ROOT / "trainers" / f"{module}.py")
    for name in found:
        family = name.removeprefix("pestle.potentials.").removeprefix("pestle.trainers.")
        assert family not in FAMILIES, f"trainers/{module}.py imports {name}"


@pytest.mark.parametrize("path", sorted((ROOT / "formats").glob("*.py")), ids=lambda p: p.stem)
def test_formats_import_nothing_else_of_pestle(path: Path) -> None:
    wrong = sorted(name for name in imports(path) if not name.startswith("pestle.formats"))
    assert not wrong, f"formats/{path.name} imports {wrong}"


@pytest.mark.parametrize(
    "line",
    [
        "from pestle.trainers.mace import least_squares_shift",
        "from pestle.trainers import mace",
        "import pestle.trainers.mace",
        "from . import mace",
        "from .mace import reference_labels",
        "def f():\n    from pestle.trainers.mace import MACETrainer",
    ],
)
def test_the_check_sees_every_form_of_import(line: str) -> None:
    assert "pestle.trainers.mace" in imports_of(line, "pestle.trainers")
