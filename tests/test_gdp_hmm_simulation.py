"""A tiny federation over GDP-HMM plans imported by cohort (issue #30): `addiff data import-gdp-hmm`
then `addiff simulate --site-files OUT/*.yaml`; the final table carries the challenge's MAE."""
from __future__ import annotations

import csv
import math

import pytest

from addiff_core.gdp_hmm.metric import METRIC_KEY
from helpers.federation import ROOT, TINY, Processes, cli, flower_test_env
from helpers.gdp_hmm import write_dataset

pytestmark = [pytest.mark.slow]


def test_simulate_federates_the_cohorts_and_scores_with_the_challenge_mae(tmp_path):
    src = write_dataset(tmp_path / "src")
    procs = Processes()
    log = tmp_path / "run.log"
    try:
        p = procs.start(cli("data", "import-gdp-hmm", src, tmp_path / "sites"), env=flower_test_env(tmp_path),
                        log_file=tmp_path / "import.log", cwd=ROOT)
        assert p.wait(timeout=120) == 0, (tmp_path / "import.log").read_text()
        sites = sorted((tmp_path / "sites").glob("*.yaml"))
        assert [s.name for s in sites] == ["cohort1.yaml", "cohort2.yaml"]
        run_dir = tmp_path / "run"
        p = procs.start(cli("simulate", "--site-files", ",".join(map(str, sites)), "--config", TINY,
                            "--rounds", "1,1", "--local-epochs", 1, "--eval-steps", 1, "--no-gamma",
                            "--backend", "serial", "--run-dir", run_dir),
                        env=flower_test_env(tmp_path), log_file=log, cwd=ROOT)
        rc = p.wait(timeout=300)
    finally:
        leftover = procs.stop_all()
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    assert not leftover
    rows = list(csv.DictReader((run_dir / "final_metrics.csv").read_text().splitlines()))
    by_site = {r["site"]: r for r in rows}
    assert {"cohort1", "cohort2"} <= set(by_site)
    for name in ("cohort1", "cohort2"):
        assert by_site[name]["cases"] == "1" and by_site[name]["status"].startswith("ok")
        assert math.isfinite(float(by_site[name][METRIC_KEY])) and float(by_site[name][METRIC_KEY]) > 0
    assert METRIC_KEY in (run_dir / "final_metrics.md").read_text()
