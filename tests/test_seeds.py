"""Seeds from structure files, ase.build.bulk and the Materials Project. The mp-api path runs
the real MPRester against a local HTTP server replaying recorded API responses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write

from pestle.config import ConfigError, SeedSpec
from pestle.stages.seed import build_seeds, mp_query
from pestle.structures import fingerprint

RECORDED = Path(__file__).parent / "data" / "materials_project"


@pytest.mark.parametrize(
    ("filename", "fmt"), [("LiF.cif", "cif"), ("POSCAR", "vasp"), ("LiF.extxyz", "extxyz")]
)
def test_structure_files(tmp_path: Path, filename: str, fmt: str) -> None:
    atoms = bulk("LiF", "rocksalt", a=4.03, cubic=True)
    path = tmp_path / filename
    write(path, atoms, format=fmt)
    [seed] = build_seeds(SeedSpec(file=path, supercell=(1, 1, 2)))
    assert fingerprint(seed.atoms) == fingerprint(atoms.repeat((1, 1, 2)))
    assert seed.source == {"file": str(path), "supercell": [1, 1, 2]}


def test_unreadable_file_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "broken.cif"
    path.write_text("data_nothing\n")
    with pytest.raises(ConfigError, match=r"seeds\.3: cannot read structure file .*broken.cif"):
        build_seeds(SeedSpec(file=path), "seeds.3")


def test_query_kinds() -> None:
    assert mp_query("mp-149") == {"material_ids": "mp-149"}
    assert mp_query("Li-F") == {"chemsys": "F-Li"}
    assert mp_query("LiF") == {"formula": "LiF"}


class _Replay(BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        _Replay.requests.append(self.path)
        if url.path.rstrip("/") == "/heartbeat":
            name = "heartbeat.json"
        else:
            query = parse_qs(url.query)
            key = next((k for k in ("material_ids", "chemsys", "formula") if k in query), None)
            candidate = RECORDED / f"summary-{key}-{query[key][0]}.json" if key else None
            name = candidate.name if candidate and candidate.is_file() else "summary-empty.json"
        body = (RECORDED / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def materials_project(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Replay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Replay.requests = []
    monkeypatch.setenv("MP_API_KEY", "a" * 32)
    monkeypatch.setenv("MP_API_ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
    yield _Replay.requests
    server.shutdown()


def test_material_id(materials_project) -> None:
    [seed] = build_seeds(SeedSpec(mp="mp-149"))
    assert seed.atoms.get_chemical_formula() == "Si2" and seed.name == "Si-mp-149"
    source = seed.source["materials_project"]
    assert source["material_id"] == "mp-149" and source["database_version"] == "2025.09.25"
    assert any("material_ids=mp-149" in r for r in materials_project)


def test_chemical_system_takes_the_most_stable_first(materials_project) -> None:
    seeds = build_seeds(SeedSpec(mp="Li-F", mp_limit=2))
    assert [s.source["materials_project"]["material_id"] for s in seeds] == [
        "mp-1138",
        "mp-1009009",
    ]
    [best] = build_seeds(SeedSpec(mp="Li-F"))
    assert len(best.atoms) == 2 and best.source["materials_project"]["energy_above_hull"] == 0.0


def test_nothing_found_is_a_clear_error(materials_project) -> None:
    with pytest.raises(ConfigError, match=r"seeds\.0: the Materials Project has no structure"):
        build_seeds(SeedSpec(mp="Xe-Kr"), "seeds.0")


def test_missing_key_and_no_network(monkeypatch) -> None:
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"seeds\.1: .*MP_API_KEY"):
        build_seeds(SeedSpec(mp="mp-149"), "seeds.1")
    monkeypatch.setenv("MP_API_KEY", "a" * 32)
    monkeypatch.setenv("MP_API_ENDPOINT", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(ConfigError, match=r"seeds\.1: the Materials Project query .* failed"):
        build_seeds(SeedSpec(mp="mp-149"), "seeds.1")


def test_fetched_seeds_are_reused_from_the_store(materials_project, store, monkeypatch) -> None:
    spec = SeedSpec(mp="Li-F", mp_limit=2)
    fetched = build_seeds(spec, store=store)
    for seed in fetched:  # as the campaign stores them
        store.structures.add(
            seed.atoms, kind="seed", name=seed.name, provenance={"source": seed.source}
        )
    # No key, no server: the second time comes from the store alone.
    monkeypatch.delenv("MP_API_KEY")
    monkeypatch.setenv("MP_API_ENDPOINT", "http://127.0.0.1:9/")
    again = build_seeds(spec, store=store)
    assert [s.name for s in again] == [s.name for s in fetched]
    for a, b in zip(again, fetched, strict=True):
        np.testing.assert_allclose(a.atoms.positions, b.atoms.positions)
        assert a.source == json.loads(json.dumps(b.source))


def test_python_objects_as_seeds(store, mongo_uri, tmp_path, raw_db) -> None:
    from pymatgen.core import Lattice, Structure

    from pestle.config import CampaignConfig
    from pestle.stages import RunContext, SeedStage

    config = CampaignConfig.model_validate(
        {"name": "objects", "work_dir": str(tmp_path), "samplers": [{"name": "rattle"}],
         "seeds": [{"bulk": "Si", "crystalstructure": "diamond", "a": 5.43}]}
    )  # fmt: skip
    atoms = bulk("Cu", "fcc", a=3.61)
    structure = Structure(Lattice.cubic(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    campaign = RunContext(config, store, mongo_uri, seeds=[atoms, structure])
    campaign.start()
    seeds = SeedStage().run(campaign)["seeds"]
    assert [s.atoms.get_chemical_formula() for s in seeds] == ["Si8", "Cu", "FLi"]
    stored = raw_db["structures"].find_one({"_id": seeds[2].id})
    assert stored["provenance"]["source"] == {"python": "pymatgen.Structure"}
    assert campaign.run_id != RunContext(config, store, mongo_uri).run_id
    with pytest.raises(TypeError, match="ase.Atoms or pymatgen Structure"):
        RunContext(config, store, mongo_uri, seeds=["Si"])
