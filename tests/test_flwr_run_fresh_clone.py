"""`flwr run .` on a fresh clone (issue #28, point 7), at the ServerApp's start.

The run config's default site files (``sites/hospital_*.yaml``) name demo data that nothing has
written yet: the ServerApp writes it before round 1 (once, when two runs start together), or
stops in one line saying which command writes it; a run that gives up is "failed" in run.json
and the stream's last line says so (``tests/test_flwr_run_readme.py`` runs it end to end).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict

from addiff_core.case_io import list_cases
from addiff_core.config import load_site_config
from addiff_core.run_folder import RunFolder
from helpers.federation import ROOT, TINY, FakeGrid
from server import server_app
from server.demo_data import DEMO_CASES, DEMO_STAMP
from server.federation import Federation, FederationError
from server.settings import DEFAULTS

DEMO_FILES = DEFAULTS["site-files"].split(",")


def fresh_clone(tmp_path: Path) -> list[Path]:
    """The demo site files of a fresh clone (no demo_data/ beside them)."""
    (tmp_path / "clone" / "sites").mkdir(parents=True)
    return [Path(shutil.copy2(ROOT / rel, tmp_path / "clone" / rel)) for rel in DEMO_FILES]


def run_config(tmp_path: Path, site_files: list[Path], **over) -> dict:
    return {**DEFAULTS, "site-files": ",".join(map(str, site_files)), "model-config": str(TINY),
            "run-dir": str(tmp_path / "run"), "vae-rounds": 1, "diffusion-rounds": 1, **over}


def flwr_main(grid, rc: dict) -> None:
    """The ServerApp's main as `flwr run` calls it."""
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


@pytest.fixture
def stream():
    """What the ServerApp logs on Flower's logger (the lines `flwr run --stream` prints)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda rec: lines.append(rec.getMessage())
    logger = logging.getLogger("flwr.addiff")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


class NoRounds:
    """Stands in for the federation: what the sites' data looked like when round 1 would start."""
    seen: list[int] = []

    def __init__(self, grid, settings, **kw):
        self.settings = settings

    def run(self) -> dict:
        NoRounds.seen = [len(list_cases(d)) if (d := load_site_config(f).data_dir).is_dir() else -1
                         for f in self.settings.site_files]
        return {"status": "complete", "run_dir": str(self.settings.run_dir)}


def test_the_serverapp_writes_the_demo_data_before_round_1(tmp_path, monkeypatch):
    monkeypatch.setattr(server_app, "CrossSiteFederation", NoRounds)
    files = fresh_clone(tmp_path)
    flwr_main(FakeGrid(3), run_config(tmp_path, files))
    assert NoRounds.seen == [DEMO_CASES] * 3  # every site's cases, before the first round
    stamp = tmp_path / "clone" / "demo_data" / DEMO_STAMP
    assert json.loads(stamp.read_text())["cases_per_site"] == DEMO_CASES
    before = stamp.stat().st_mtime_ns
    flwr_main(FakeGrid(3), run_config(tmp_path, files, **{"run-dir": str(tmp_path / "run2")}))
    assert stamp.stat().st_mtime_ns == before  # written once, then used as it is


@pytest.mark.slow
def test_two_runs_starting_together_write_the_demo_data_once(tmp_path):
    files = fresh_clone(tmp_path)
    code = ("import sys; from pathlib import Path; from server.demo_data import ensure_demo_data; "
            "ensure_demo_data([Path(p) for p in sys.argv[1:]], %r)" % (DEMO_FILES,))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, files)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count("writing 3 synthetic hospitals") for o in outs) == 1, outs
    assert [len(list_cases(load_site_config(f).data_dir)) for f in files] == [DEMO_CASES] * 3


def test_demo_data_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, monkeypatch, stream):
    monkeypatch.setattr(server_app, "CrossSiteFederation", NoRounds)
    NoRounds.seen = []
    files = fresh_clone(tmp_path)
    (tmp_path / "clone" / "demo_data").mkdir()
    (tmp_path / "clone" / "demo_data" / "notes.txt").write_text("not the generator's\n")
    flwr_main(FakeGrid(3), run_config(tmp_path, files))
    assert NoRounds.seen == [] and not (tmp_path / "run").exists()
    assert stream[-1].startswith("the run FAILED (no round was run): ") and "\n" not in stream[-1], stream
    assert "addiff simulate" in stream[-1] and "site-files" in stream[-1], stream[-1]
    assert (tmp_path / "clone" / "demo_data" / "notes.txt").is_file()


def test_a_run_that_gives_up_is_failed_in_run_json_and_says_so_last(tmp_path, stream):
    # site files (not the demo ones) whose data folder does not exist: every site fails round 1
    files = []
    for rel in DEMO_FILES:
        doc = yaml.safe_load((ROOT / rel).read_text())
        out = tmp_path / "elsewhere" / Path(rel).name
        out.parent.mkdir(exist_ok=True)
        out.write_text(yaml.safe_dump({**doc, "data_dir": "no_such_folder/cases"}))
        files.append(out)
    rc = run_config(tmp_path, files, **{"round-retries": 1})
    flwr_main(FakeGrid(3, run_config=rc), rc)
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["status"] == "failed" and "Gave up after 2 attempt(s)" in doc["error"], doc
    assert stream[-1].startswith(f'the run FAILED (status "failed" in {tmp_path / "run" / "run.json"}): '), stream
    assert "Gave up after 2 attempt(s)" in stream[-1]
    assert not (tmp_path / "elsewhere" / "demo_data").exists()  # not a demo site file: nothing written


def test_a_stop_outside_the_round_loop_is_failed_in_run_json_too(tmp_path, monkeypatch, stream):
    """Federation.run records a FederationError that did not come through Federation._fail."""
    def stops_mid_run(self) -> dict:
        self.settings.run_dir.mkdir(parents=True)
        RunFolder(self.settings.run_dir).write_run_json({"status": "running"})
        raise FederationError("round 1: aggregation failed")

    monkeypatch.setattr(Federation, "_run", stops_mid_run)
    flwr_main(FakeGrid(3), run_config(tmp_path, [tmp_path / "a.yaml"]))
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["status"] == "failed" and doc["error"] == "round 1: aggregation failed" and doc["finished"], doc
    assert stream[-1].endswith("): round 1: aggregation failed") and "the run FAILED" in stream[-1], stream
