"""Nothing about a site's patients reaches the server when the site fails (issue #12.1), and the
final table names every planned site (issue #12.7).

A hospital whose only cases are broken and named like patients (``PATIENT_DOE_JOHN_19700101``)
takes part in a federation with two good ones (``min-sites 2``). Its ClientApp must not let an
exception out (Flower would copy ``str(exception)``, which names the data folder and the first
skipped cases, into the reply the server stores): it answers with a fixed status and a code from
a closed list and keeps the details in its own log. Everything the server side writes (run
folder, report, logs) is searched for the case names and the site's data path.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from helpers.federation import TINY, FakeGrid, synthetic_sites
from server.federation import Federation
from server.settings import from_run_config

PATIENTS = ("PATIENT_DOE_JOHN_19700101", "PATIENT_ROE_JANE_19811224", "PATIENT_POE_EDGAR_19090119")
SECRET_DIR = "ward7_secret_export_4411"


def broken_site(base: Path, template_case: Path) -> Path:
    """A site file whose data folder holds only broken cases named like patients."""
    data = base / SECRET_DIR
    breakers = [
        lambda p: p.update(constraints={f"{PATIENTS[0]} Dmax": 40}),  # an unparseable constraint key
        lambda p: p["beams"][0].update(energy_mv=1e308),  # an infinite beam energy
        lambda p: p.update(fractions="many"),
    ]
    for name, breaker in zip(PATIENTS, breakers):
        case = data / name
        shutil.copytree(template_case, case)
        plan = yaml.safe_load((case / "plan.yaml").read_text())
        breaker(plan)
        (case / "plan.yaml").write_text(yaml.safe_dump(plan))
    site = base / "site_files" / "hospital_x.yaml"
    site.parent.mkdir(parents=True, exist_ok=True)
    site.write_text(yaml.safe_dump({"name": "hospital_x", "data_dir": str(data), "heldout": {"fraction": 0.0},
                                    "device": "cpu"}))
    return site


def settings(run_dir, sites, **kw):
    cfg = {"run-dir": str(run_dir), "site-files": ",".join(map(str, sites)), "model-config": str(TINY),
           "model-kind": "unet", "unet-rounds": 1, "local-epochs": 1, "eval-steps": 2, "eval-gamma": False,
           "min-sites": 2}
    cfg.update(kw)
    return from_run_config(cfg)


def leaks(folder: Path, needles) -> list[str]:
    """'file: needle' for every file under ``folder`` whose bytes hold one of ``needles``."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out += [f"{p}: {n}" for n in needles if n.encode() in data]
    return out


@pytest.fixture(scope="module")
def good_sites(tmp_path_factory):
    return synthetic_sites(tmp_path_factory.mktemp("privacy_sites"), n_sites=2)


@pytest.mark.slow
def test_a_failing_site_sends_no_case_ids_or_paths_and_has_a_row(good_sites, tmp_path, caplog):
    template = next(p for p in sorted((good_sites[0].parent / "hospital_a" / "cases").iterdir()) if p.is_dir())
    bad = broken_site(tmp_path, template)
    data_dir = str(tmp_path / SECRET_DIR)
    run_dir = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    out = Federation(FakeGrid(3), settings(run_dir, [*good_sites, bad]), send_site_files=True).run()
    assert out["status"] == "complete"

    needles = [*PATIENTS, "PATIENT_", SECRET_DIR, data_dir]
    assert leaks(run_dir, needles) == []
    assert not [n for n in needles if n in caplog.text], "the process log (the coordinator's, in a simulation)"
    # the failure is recorded with a code from the closed list
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    err = [r for r in rows if r["kind"] == "error" and r["site"] == "hospital_x"]
    assert err and all(r["reason"].startswith("site failed: no-usable-data (") for r in err), err
    # ... and the details stay in the site's own log
    site_log = (bad.parent / "state" / "hospital_x" / "site.log").read_text()
    assert PATIENTS[0] in site_log and "no usable training case" in site_log

    # every planned site has a row in the final table; the overall row says how many it covers
    table = list(csv.DictReader((run_dir / "final_metrics.csv").open()))
    by_site = {r["site"]: r for r in table}
    assert set(by_site) == {"hospital_a", "hospital_b", "hospital_x", "all sites (case-weighted, 2 of 3 sites)"}
    assert by_site["hospital_a"]["status"] == "ok"
    assert by_site["hospital_x"]["status"].startswith("final evaluation failed: no-usable-data")
    assert "trained in no round" in by_site["hospital_x"]["status"]
    assert "| hospital_x | 0 |" in (run_dir / "final_metrics.md").read_text()


def _server_side_leaks(paths, needles) -> list[str]:
    out = []
    for p in paths:
        p = Path(p)
        out += leaks(p, needles) if p.is_dir() else [f"{p}: {n}" for n in needles if p.is_file()
                                                       and n.encode() in p.read_bytes()]
    return out


@pytest.mark.slow
def test_simulation_with_a_broken_patient_named_site_finishes_and_leaks_nothing(good_sites, tmp_path):
    """`addiff simulate` (Ray, Flower's own error path) with --min-sites 2."""
    from helpers.federation import ROOT, Processes, cli, flower_test_env

    template = next(p for p in sorted((good_sites[0].parent / "hospital_a" / "cases").iterdir()) if p.is_dir())
    bad = broken_site(tmp_path, template)
    run_dir = tmp_path / "run"
    procs = Processes()
    log = tmp_path / "simulate.log"
    try:
        p = procs.start(cli("simulate", "--site-files", ",".join(map(str, [*good_sites, bad])), "--config", TINY,
                            "--model", "unet", "--rounds", "1", "--local-epochs", 1, "--eval-steps", 2, "--no-gamma",
                            "--min-sites", 2, "--run-dir", run_dir, "--cpus-per-site", 1),
                        env=flower_test_env(tmp_path), log_file=log, cwd=ROOT)
        rc = p.wait(timeout=300)
    finally:
        procs.stop_all()
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    needles = [*PATIENTS, "PATIENT_", SECRET_DIR]
    assert _server_side_leaks([run_dir, log], needles) == []
    table = {r["site"]: r for r in csv.DictReader((run_dir / "final_metrics.csv").open())}
    assert table["hospital_x"]["status"].startswith("final evaluation failed: no-usable-data")
    assert "all sites (case-weighted, 2 of 3 sites)" in table
    assert PATIENTS[0] in (bad.parent / "state" / "hospital_x" / "site.log").read_text()


@pytest.mark.slow
def test_deployment_with_a_broken_patient_named_site_leaks_nothing(good_sites, tmp_path, procs):
    """A real TLS deployment: one good and one broken hospital; the SuperLink's log and state
    database, the server's log and the run folder hold neither the case names nor the path."""
    from helpers.federation import ROOT, cli, exit_code, flower_test_env
    from server.certs import create_certificates
    from client.launch import free_port

    template = next(p for p in sorted((good_sites[0].parent / "hospital_a" / "cases").iterdir()) if p.is_dir())
    bad = broken_site(tmp_path, template)
    certs = tmp_path / "certs"
    create_certificates(certs, ["localhost"])
    env = flower_test_env(tmp_path)
    port = free_port()
    run_dir = tmp_path / "run"
    (tmp_path / "sites").mkdir()  # the hospitals' own logs (not server side)
    server = procs.start(cli("server", "start", "--certs", certs, "--host", "127.0.0.1", "--port", port,
                             "--min-sites", 1, "--wait-sites", 2, "--config", TINY, "--model", "unet", "--rounds", 1,
                             "--local-epochs", 1, "--eval-steps", 2, "--no-gamma", "--run-dir", run_dir,
                             "--round-timeout", 240), env=env, log_file=tmp_path / "server.log", cwd=ROOT)
    for f in (good_sites[0], bad):
        procs.start(cli("client", "start", "--site", f, "--superlink", f"127.0.0.1:{port}", "--ca", certs / "ca.crt",
                        "--port", free_port(), "--threads", 1, "--flwr-home", tmp_path / f"flwr-home-{f.stem}"),
                    env=env, log_file=tmp_path / "sites" / f"client_{f.stem}.log", cwd=ROOT)
    rc = exit_code(server, 400)
    assert rc == 0, (tmp_path / "server.log").read_text(errors="replace")[-4000:]
    needles = [*PATIENTS, "PATIENT_", SECRET_DIR]
    # server side: the run folder (superlink.log, superlink-state.db, metrics, report, ...), its log, its FLWR_HOME
    assert _server_side_leaks([run_dir, tmp_path / "server.log", tmp_path / "flwr-home"], needles) == []
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "error" and r["site"] == "hospital_x" and "no-usable-data" in r["reason"] for r in rows)
    table = {r["site"]: r for r in csv.DictReader((run_dir / "final_metrics.csv").open())}
    assert set(table) == {"hospital_a", "hospital_x", "all sites (case-weighted, 1 of 2 sites)"}
