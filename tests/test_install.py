"""The core install (``pip install .``, no extra) imports, lists its plugins and plans a run;
using what an extra brings without it installed says which extra to install.

Each test runs pestle in a subprocess in which every optional package is unimportable: a
``sitecustomize.py`` (found first on PYTHONPATH) puts a meta-path finder in front that
refuses them, as Python does for a package that is not installed. A throw-away venv with
``pip install .`` would show the same for real, but costs a network and minutes of CPU per
run; it is how the blocked list below was checked (see README: Installing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pestle.extras import EXTRAS

REPO = Path(__file__).resolve().parents[1]
BLOCKED = sorted({module for _, modules in EXTRAS.values() for module in modules})

SITECUSTOMIZE = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}


    class NotInstalled:
        # A meta-path finder that answers for the blocked top-level packages as if they
        # were not installed.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None


    sys.meta_path.insert(0, NotInstalled())
    """
)


@pytest.fixture(scope="module")
def core_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("core-only")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=BLOCKED))
    path = os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)}


def run(env: dict[str, str], *args: str, cwd: Path | None = None):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip


def pestle(env: dict[str, str], *args: str, cwd: Path | None = None):
    return run(env, "-m", "pestle", *args, cwd=cwd)


def test_the_blocker_blocks(core_env) -> None:
    done = run(core_env, "-c", "import gpaw")
    assert done.returncode == 1 and "No module named 'gpaw'" in done.stderr


def test_every_module_of_pestle_imports_without_the_extras(core_env) -> None:
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import pestle

        for module in pkgutil.walk_packages(pestle.__path__, "pestle."):
            if module.name != "pestle.__main__":  # that one runs the command line
                importlib.import_module(module.name)
        optional = {blocked!r}
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in optional)
        assert not leaked, leaked
        print("imported")
        """
    ).format(blocked=BLOCKED)
    done = run(core_env, "-c", script)
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout


def test_plugins_name_the_extra_they_need(core_env) -> None:
    done = pestle(core_env, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    listed = {(d["kind"], d["name"]): d for d in map(json.loads, done.stdout.splitlines())}
    needs = {key: d["missing_extra"] for key, d in listed.items() if d["missing_extra"]}
    assert needs == {
        ("samplers", "phonon"): "phonon",
        ("potentials", "mace"): "mace",
        ("potentials", "matgl"): "matgl",
        ("labellers", "gpaw"): "gpaw",
        ("trainers", "mace"): "mace",
        ("trainers", "matgl"): "matgl",
    }
    assert all(d["params"] for d in listed.values() if d["name"] != "emt")  # still described
    table = pestle({**core_env, "COLUMNS": "300"}, "plugins", cwd=REPO)  # no wrapping
    assert "not installed: pip install 'pestle[gpaw]'" in " ".join(table.stdout.split())


def write_config(folder: Path, **sections) -> Path:
    config = {
        "name": "core",
        "seeds": [{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.6}],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05], "per_amplitude": 2}}],
        "labeller": {"name": "emt"},
        "work_dir": "work",
        **sections,
    }
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_config_needing_missing_extras_names_each(core_env, tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        name="extras",
        seeds=[{"mp": "mp-149"}],
        samplers=[{"name": "phonon"}],
        potential={"name": "mace"},
        labeller={"name": "gpaw"},
        finetune={"trainer": {"name": "matgl"}},
    )
    done = pestle(core_env, "config", "validate", str(path))
    assert done.returncode == 3, done.stdout + done.stderr
    text = " ".join(done.stderr.split())
    assert "Traceback" not in text
    for field, extra in [
        ("seeds.0.mp", "mp"),
        ("samplers.0.name", "phonon"),
        ("potential.name", "mace"),
        ("labeller.name", "gpaw"),
        ("finetune.trainer.name", "matgl"),
    ]:
        assert f"{field}: " in text and f"pip install 'pestle[{extra}]'" in text, (field, text)
    assert "labeller 'gpaw' needs GPAW, which is not installed" in text
    # The same config is fine for a VASP user who runs it without custodian.
    vasp = write_config(tmp_path, name="vasp", labeller={"name": "vasp"})
    refused = pestle(core_env, "config", "validate", str(vasp))
    assert refused.returncode == 3 and "pip install 'pestle[vasp]'" in refused.stderr
    plain = write_config(
        tmp_path, name="vasp2", labeller={"name": "vasp", "params": {"custodian": False}}
    )
    assert pestle(core_env, "config", "validate", str(plain)).returncode == 0


def test_a_core_campaign_plans_without_the_extras(core_env, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    done = pestle(core_env, "run", "--dry-run", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Cu" in done.stdout
