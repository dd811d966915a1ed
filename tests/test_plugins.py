"""Plugins: what a registry demands of a class, implementations from other packages found
through entry points (imported on first use, named with their distribution when broken), the
declarations of the built-ins, and end to end the README's example sampler as a package of
its own: installed, listed by `pestle samplers`, validated in a config and run by `pestle run`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pestle.labellers import LABELLERS
from pestle.plugins import Contract, PluginLoadError, PluginSpec, Registry, RegistryError, Resources
from pestle.potentials import POTENTIALS, checkpoint_spec, from_checkpoint
from pestle.potentials.checkpoints import sha256_file
from pestle.potentials.matgl import MODEL_FILES, folder_sha256
from pestle.samplers import SAMPLERS, with_potential
from pestle.stages.models import stored_potential_spec
from pestle.store import Store, StoreError
from pestle.trainers import TRAINERS

PESTLE = str(Path(sys.executable).with_name("pestle"))
README = Path(__file__).resolve().parents[1] / "README.md"


def test_a_registry_checks_what_a_class_declares() -> None:
    things = Registry(
        "thing",
        "pestle.test-things",
        Contract(methods=("run",), defaults={"fast": False}, promises={"fast": ("hurry",)}),
    )

    @things.register("plain")
    class Plain:
        class Params(BaseModel):
            pass

        def __init__(self, params: Params) -> None:
            self.params = params

        def run(self) -> None: ...

    assert Plain.name == "plain" and Plain.fast is False  # the protocol's default, declared
    assert isinstance(things.build("plain"), Plain)

    with pytest.raises(TypeError, match=r"thing 'quick' \(.*Quick\) lacks hurry\(\)"):

        @things.register("quick")
        class Quick(Plain):
            fast = True

    with pytest.raises(TypeError, match=r"lacks run\(\)"):

        @things.register("idle")
        class Idle:
            Params = Plain.Params

    with pytest.raises(TypeError, match="needs a nested pydantic Params"):

        @things.register("bare")
        class Bare:
            def run(self) -> None: ...

    assert things.names() == ["plain"]


def test_the_built_ins_declare_their_protocols() -> None:
    driving = {n for n in SAMPLERS.names() if SAMPLERS.get(n).drives_with_potential}
    assert driving == {"md", "migration", "rattle"}
    embedding = {n for n in POTENTIALS.names() if POTENTIALS.get(n).supports_embeddings}
    assert embedding == {"chgnet", "chgnet_scaled", "mace", "matgl"}  # chgnet_scaled is a CHGNet
    assert POTENTIALS.get("emt").checkpoint_params is None
    assert LABELLERS.build("gpaw", {"parallel_ranks": 3}).resources() == Resources(cpus=3)
    for name in ("emt", "vasp"):
        assert LABELLERS.build(name).resources() == Resources(cpus=1, gpus=0)
    labeller = LABELLERS.build("potential", {"potential": {"params": {"device": "cpu"}}})
    assert labeller.params.potential == PluginSpec(name="chgnet", params={"device": "cpu"})
    assert labeller.resources() == Resources()
    for name in (n for n in TRAINERS.names() if TRAINERS.origin(n) == "pestle"):  # not tests'
        cls = TRAINERS.get(name)
        assert cls(cls.Params.model_construct()).resources() == Resources(cpus=1, gpus=1)
    assert all(SAMPLERS.origin(n) == "pestle" for n in SAMPLERS.names())


def test_a_checkpoint_loads_as_its_class_declares(tmp_path: Path) -> None:
    file = tmp_path / "tuned.pt"
    file.write_bytes(b"weights")
    folder = tmp_path / "matgl"
    folder.mkdir()
    for name in MODEL_FILES:
        (folder / name).write_text(name)

    chgnet = from_checkpoint("chgnet", {"device": "cpu"}, file)  # lazy: nothing loaded yet
    assert chgnet.params.checkpoint == file
    assert chgnet.params.checkpoint_sha256 == sha256_file(file)
    assert checkpoint_spec("mace", {"head": "x"}, file).params == {
        "head": "x",
        "model_path": str(file),
        "model_sha256": sha256_file(file),
    }
    assert checkpoint_spec("matgl", {}, folder).params["model_sha256"] == folder_sha256(folder)
    with pytest.raises(ValueError, match="'emt' declares no checkpoint_params"):
        checkpoint_spec("emt", {}, file)


def test_the_promoted_model_drives_every_sampler_that_drives_with_a_potential(
    store: Store, tmp_path: Path, raw_db
) -> None:
    checkpoint = tmp_path / "tuned.pt"
    checkpoint.write_bytes(b"weights")
    store.models.put(
        "model-x", checkpoint, {"potential": "chgnet", "potential_params": {"device": "cpu"}}
    )
    promoted = stored_potential_spec(store, "model-x", tmp_path / "models")
    assert promoted.name == "chgnet" and promoted.params["device"] == "cpu"
    stored_sha = raw_db["models"].find_one({"_id": "model-x"})["checkpoint"]["sha256"]
    assert promoted.params["checkpoint_sha256"] == stored_sha
    assert Path(promoted.params["checkpoint"]).parent == tmp_path / "models"

    specs = [
        PluginSpec(name="rattle", params={"amplitudes": [0.1]}),  # gaussian: no potential
        PluginSpec(name="md", params={"temperatures": [300]}),
        PluginSpec(name="migration", params={"species": "Cu"}),
        PluginSpec(
            name="rattle",
            params={"mode": "boltzmann", "temperature": 500, "potential": {"name": "emt"}},
        ),
        PluginSpec(name="strain"),
    ]
    swapped = with_potential(specs, promoted)
    assert [swapped[0], swapped[4]] == [specs[0], specs[4]]
    for before, after in zip(specs[1:4], swapped[1:4], strict=True):
        assert after.params == {**before.params, "potential": promoted.model_dump(mode="json")}
        assert SAMPLERS.build_spec(after).params.potential == promoted
    assert specs[1].params == {"temperatures": [300]}  # the specs given are left as they were

    store.models.put("model-emt", checkpoint, {"potential": "emt"})
    with pytest.raises(StoreError, match="potential 'emt' loads no checkpoints"):
        stored_potential_spec(store, "model-emt", tmp_path / "models")
    store.models.put("model-nope", checkpoint, {"potential": "nope"})
    with pytest.raises(StoreError, match="no loader for potential 'nope'"):
        stored_potential_spec(store, "model-nope", tmp_path / "models")


# ---- entry points ---------------------------------------------------------------------------

THING_REGISTRY = """
from pestle.plugins import Contract, Registry

THINGS = Registry("thing", "pestle.test-things", Contract(methods=("run",)))
"""

GOOD_THINGS = """
from pydantic import BaseModel

from thing_registry import THINGS


class Base:
    class Params(BaseModel):
        pass

    def __init__(self, params):
        self.params = params

    def run(self):
        return self.name


@THINGS.register("good")
class Good(Base):
    pass


@THINGS.register("other-name")
class Other(Base):
    pass


class Plain(Base):
    pass
"""


def write_distribution(
    root: Path, name: str, group: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """An installed distribution as pip leaves it: modules and a .dist-info with metadata."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def things(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    entry_points = {
        "good": "good_things:Good",
        "broken": "no_such_module:Thing",
        "unregistered": "good_things:Plain",
        "misnamed": "good_things:Other",
    }
    modules = {"thing_registry": THING_REGISTRY, "good_things": GOOD_THINGS}
    write_distribution(tmp_path, "fake-things", "pestle.test-things", entry_points, modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    import thing_registry

    yield thing_registry.THINGS
    for module in modules:
        sys.modules.pop(module, None)


def test_entry_points_load_on_first_use_and_name_their_distribution(things: Registry) -> None:
    assert things.names() == ["broken", "good", "misnamed", "unregistered"]
    assert "good_things" not in sys.modules  # listed without importing anything
    assert things.origin("good") == "fake-things 1.0"

    assert things.build("good", {}).run() == "good"
    assert things.origin("good") == "fake-things 1.0"
    assert things.origin("other-name") == "module good_things"  # registered on the side
    assert things.names() == ["broken", "good", "misnamed", "other-name", "unregistered"]

    with pytest.raises(PluginLoadError) as broken:
        things.get("broken")
    message = str(broken.value)
    assert "thing 'broken': entry point 'broken = no_such_module:Thing'" in message
    assert "(distribution fake-things 1.0) failed to load: ModuleNotFoundError" in message
    with pytest.raises(PluginLoadError, match=r"Plain'> is not registered as thing 'unregist"):
        things.get("unregistered")
    with pytest.raises(PluginLoadError, match=r"it registers .*Other'> as 'other-name'"):
        things.get("misnamed")
    with pytest.raises(RegistryError, match=r"unknown thing 'nothing' \(known: broken, good"):
        things.get("nothing")


# ---- a sampler from a package of its own, through the CLI ------------------------------------


def pip_install(source: Path, target: Path) -> Path:
    """``pip install`` a source tree into a folder of its own, offline."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
               "--target", str(target), str(source)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def write_package(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "0.1.0"\ndependencies = ["pestle"]\n\n'
        + entry_points
    )
    for path, source in modules.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(source)
    return root


def with_path(target: Path) -> dict[str, str]:
    """The environment of a process that sees the packages installed in ``target``."""
    paths = [str(target), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "250"}


def pestle(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([PESTLE, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def readme_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The README's "Adding one" example, as written there, in a package of its own."""
    section = README.read_text().split("Adding one", 1)[1]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    entry_points = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    module = python.splitlines()[0].removeprefix("# ")  # the example names its file
    assert module == "my_pkg/sampler.py"
    root = tmp_path_factory.mktemp("my-plugin")
    source = write_package(
        root / "src", "my-pestle-plugins", entry_points, {module: python, "my_pkg/__init__.py": ""}
    )
    return with_path(pip_install(source, root / "target"))


def campaign_config(path: Path, sampler: dict, uri: str, database: str) -> Path:
    config = {
        "name": "plugin",
        "seed": 1,
        "work_dir": str(path.parent / "work"),
        "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}],
        "samplers": [sampler],
        "potential": {"name": "emt"},
        "labeller": {"name": "emt"},
        "finetune": {"enabled": False},
        "store": {"uri": uri, "database": database},
        "dask": {"n_workers": 2},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_pestle_samplers_lists_the_package_sampler(readme_plugin: dict[str, str]) -> None:
    listed = pestle("samplers", env=readme_plugin)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"│ my-sampler +│ my-pestle-plugins 0\.1\.0 +│ count ", listed.stdout)
    assert re.search(r"│ rattle +│ pestle +│", listed.stdout)
    everything = pestle("plugins", env=readme_plugin)
    assert everything.returncode == 0 and "my-pestle-plugins 0.1.0" in everything.stdout


def test_a_config_naming_the_package_sampler_validates(
    readme_plugin: dict[str, str], tmp_path: Path
) -> None:
    good = campaign_config(tmp_path / "good.yaml", {"name": "my-sampler", "params": {"count": 2}},
                           "mongodb://unused", "unused")  # fmt: skip
    check = "import sys; from pestle.config import load_config as l; print(l(sys.argv[1]).samplers)"
    done = subprocess.run([sys.executable, "-c", check, str(good)], env=readme_plugin,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "name='my-sampler'" in done.stdout
    # The package's own Params validate the params, field named.
    bad = campaign_config(tmp_path / "bad.yaml", {"name": "my-sampler", "params": {"count": 0}},
                          "mongodb://unused", "unused")  # fmt: skip
    refused = pestle("run", str(bad), env=readme_plugin)
    assert refused.returncode == 3
    assert "samplers.0.params.count: Input should be greater than or equal to 1" in refused.stderr


def test_a_campaign_runs_with_the_package_sampler(
    readme_plugin: dict[str, str], mongo_uri: str, tmp_path: Path, raw_db, database_name: str
) -> None:
    database = database_name  # raw_db looks at this database
    sampler = {"name": "my-sampler", "params": {"count": 4, "amplitude": 0.1}}
    config = campaign_config(tmp_path / "plugin.yaml", sampler, mongo_uri, database)
    store = Store(mongo_uri, database)
    try:
        done = pestle("run", str(config), env=readme_plugin)
        assert done.returncode == 0, done.stdout + done.stderr
        assert raw_db["runs"].find_one()["state"] == "finished"
        candidates = list(raw_db["structures"].find({"kind": "candidate"}))
        assert len(candidates) == 4
        assert {doc["provenance"]["sampler"] for doc in candidates} == {"my-sampler"}
        # EMT labels, from the Dask workers: one per candidate, and the equation-of-state
        # scan's seven volumes (role "check", never trained on).
        assert raw_db["labels"].count_documents({"role": {"$ne": "check"}}) == 4
        assert raw_db["labels"].count_documents({"role": "check"}) == 7
    finally:
        store.drop()
        store.close()


def test_a_broken_entry_point_is_named_without_a_traceback(tmp_path: Path) -> None:
    source = write_package(
        tmp_path / "src",
        "broken-plugins",
        '[project.entry-points."pestle.samplers"]\nbroken = "broken_pkg.missing:Nope"\n',
        {"broken_pkg/__init__.py": ""},
    )
    env = with_path(pip_install(source, tmp_path / "target"))
    config = campaign_config(tmp_path / "broken.yaml", {"name": "broken"}, "mongodb://unused", "x")
    refused = pestle("run", str(config), env=env)
    assert refused.returncode == 3
    output = refused.stdout + refused.stderr
    assert "Traceback" not in output
    assert "samplers.0.name: sampler 'broken': entry point 'broken = broken_pkg.missing:Nope'" in (
        " ".join(output.split())
    )
    assert "(distribution broken-plugins 0.1.0) failed to load: ModuleNotFoundError" in (
        " ".join(output.split())
    )
    # The listing names it and why, and still lists everything else.
    listed = pestle("samplers", env=env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(
        r"│ broken +│ broken-plugins 0\.1\.0 +│ +│ +│ +│ cannot be used", listed.stdout
    )
    assert re.search(r"│ rattle +│ pestle +│", listed.stdout)
