"""Nothing about a site's patients reaches the server when the site fails (issue #12.1), and the
final table names every planned site (issue #12.7). (The same check in a real TLS deployment is
``test_federation_failures.py::test_deployment_sites_that_refuse_or_fail_leak_nothing``.)

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

import pytest

from helpers.federation import TINY, FakeGrid, synthetic_sites
from helpers.site_privacy import PATIENTS, SECRET_DIR, broken_site, leaks, server_side_leaks, template_case
from server.federation import Federation
from server.settings import from_run_config


def settings(run_dir, sites, **kw):
    cfg = {"run-dir": str(run_dir), "site-files": ",".join(map(str, sites)), "model-config": str(TINY),
           "model-kind": "unet", "unet-rounds": 1, "local-epochs": 1, "eval-steps": 2, "eval-gamma": False,
           "min-sites": 2}
    cfg.update(kw)
    return from_run_config(cfg)


@pytest.fixture(scope="module")
def good_sites(tmp_path_factory):
    return synthetic_sites(tmp_path_factory.mktemp("privacy_sites"), n_sites=2)


@pytest.mark.slow
def test_a_failing_site_sends_no_case_ids_or_paths_and_has_a_row(good_sites, tmp_path, caplog):
    bad = broken_site(tmp_path, template_case(good_sites[0]))
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


@pytest.mark.slow
def test_simulation_with_a_broken_patient_named_site_finishes_and_leaks_nothing(good_sites, tmp_path):
    """`addiff simulate` (Flower's Simulation Engine and error path) with --min-sites 2. The serial
    backend runs the sites in the coordinator's own process: their logs must not leak either."""
    from helpers.federation import ROOT, Processes, cli, flower_test_env

    bad = broken_site(tmp_path, template_case(good_sites[0]))
    run_dir = tmp_path / "run"
    procs = Processes()
    log = tmp_path / "simulate.log"
    try:
        p = procs.start(cli("simulate", "--site-files", ",".join(map(str, [*good_sites, bad])), "--config", TINY,
                            "--model", "unet", "--rounds", "1", "--local-epochs", 1, "--eval-steps", 2, "--no-gamma",
                            "--min-sites", 2, "--run-dir", run_dir, "--backend", "serial"),  # sites in turn in this process: no Ray start-up, no import per site
                        env=flower_test_env(tmp_path), log_file=log, cwd=ROOT)
        rc = p.wait(timeout=300)
    finally:
        procs.stop_all()
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    assert server_side_leaks([run_dir, log]) == []
    table = {r["site"]: r for r in csv.DictReader((run_dir / "final_metrics.csv").open())}
    assert table["hospital_x"]["status"].startswith("final evaluation failed: no-usable-data")
    assert "all sites (case-weighted, 2 of 3 sites)" in table
    assert PATIENTS[0] in (bad.parent / "state" / "hospital_x" / "site.log").read_text()
