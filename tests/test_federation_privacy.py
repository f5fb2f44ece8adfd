"""Differential privacy end to end: `addiff simulate` (real Flower simulation) with three sites,
one without DP, one with DP and a comfortable budget, and one whose budget runs out after the
first round. The last one must refuse (no weights, a reason), the server must carry on with the
others and record it, and the per-site table, round metrics and report must show epsilon/delta.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.federation import ROOT, TINY, Processes, cli, flower_test_env, site_file_variant, synthetic_sites
from addiff_core.privacy import default_delta, epsilon_of

pytestmark = pytest.mark.slow

SIGMA = 2.0  # the tight site's fixed noise multiplier
TRAIN_CASES = 2  # synthetic_sites: 3 cases per site, 1 held out
STEPS_PER_ROUND = 1  # batch 2, 2 training cases, 1 local epoch


def _with_privacy(src: Path, dst_dir: Path, privacy: dict) -> Path:
    return site_file_variant(src, dst_dir / src.name, privacy=privacy,
                             state_dir=str(dst_dir / "state" / src.stem))  # a fresh accountant for this test


def test_mixed_dp_and_non_dp_sites_with_a_budget_that_runs_out(tmp_path):
    base = synthetic_sites(tmp_path / "sites")
    delta = default_delta(TRAIN_CASES)
    q = 1.0  # one step per epoch: Poisson rate 1
    eps1 = epsilon_of([(SIGMA, q, STEPS_PER_ROUND)], delta)
    eps2 = epsilon_of([(SIGMA, q, 2 * STEPS_PER_ROUND)], delta)
    tight = (eps1 + eps2) / 2  # enough for round 1, not for round 2
    sites = [
        _with_privacy(base[0], tmp_path, {"enabled": True, "noise_multiplier": SIGMA, "target_epsilon": tight}),
        _with_privacy(base[1], tmp_path, {"enabled": True, "target_epsilon": 200.0}),
        _with_privacy(base[2], tmp_path, {"enabled": False}),
    ]
    names = [s.stem for s in sites]
    run_dir = tmp_path / "run"
    procs = Processes()
    log = tmp_path / "simulate.log"
    try:
        p = procs.start(cli("simulate", "--site-files", ",".join(map(str, sites)), "--config", TINY, "--rounds", "1,2",
                            "--local-epochs", 1, "--eval-steps", 2, "--no-gamma", "--set", "report-figures=false",
                            "--run-dir", run_dir,
                            "--backend", "serial"),  # sites in turn in this process: no Ray start-up, no import per site
                        env=flower_test_env(tmp_path), log_file=log, cwd=ROOT)
        rc = p.wait(timeout=480)
    finally:
        leftover = procs.stop_all()
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    assert not leftover

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {(r["round"], r["site"]): r for r in rows if r["kind"] == "train"}
    refused = [r for r in rows if r["kind"] == "refused"]
    rounds = {r["round"]: r for r in rows if r["kind"] == "round"}
    # round 1: everyone trained; the DP sites report epsilon and delta, the other does not
    assert {s for (rnd, s) in train if rnd == 1} == set(names)
    assert train[(1, names[0])]["dp_enabled"] == 1.0 and train[(1, names[0])]["epsilon"] == pytest.approx(eps1, rel=1e-6)
    assert train[(1, names[0])]["delta"] == pytest.approx(delta)
    assert train[(1, names[1])]["dp_enabled"] == 1.0 and 0 < train[(1, names[1])]["epsilon"] <= 200.0 * 1.01
    assert train[(1, names[2])]["dp_enabled"] == 0.0 and "epsilon" not in train[(1, names[2])]
    # rounds 2 and 3: the tight site refuses (a reason, its epsilon, no weights); the others go on
    assert [(r["round"], r["site"]) for r in refused] == [(2, names[0]), (3, names[0])]
    assert all("privacy budget" in r["reason"] and r["epsilon"] == pytest.approx(eps1, rel=1e-6) for r in refused)
    assert all("bytes_up" not in r for r in refused)
    for rnd in (2, 3):
        assert rounds[rnd]["sites"] == sorted(names[1:]) and rounds[rnd]["left_out"] == {names[0]: "refused"}
        assert set(rounds[rnd]["epsilon"]) == {names[0], names[1]}
    # the DP site with a budget: epsilon grows every round, within its target
    eps_b = [train[(rnd, names[1])]["epsilon"] for rnd in (1, 2, 3)]
    assert eps_b == sorted(eps_b) and eps_b[0] < eps_b[-1] <= 200.0 * 1.01
    # per-site table: epsilon and delta per site (what each site's accountant has spent)
    final = {r["site"]: r for r in json.loads((run_dir / "final_metrics.json").read_text())}
    assert final[names[0]]["dp_enabled"] == 1.0 and final[names[0]]["epsilon"] == pytest.approx(eps1, rel=1e-6)
    assert final[names[1]]["epsilon"] == pytest.approx(eps_b[-1], rel=1e-6)
    assert final[names[2]]["dp_enabled"] == 0.0
    # the table's header row (the lines above it say what ran: strategy, central and per-site DP)
    header = next(ln for ln in (run_dir / "final_metrics.md").read_text().split("\n") if ln.startswith("| site"))
    assert "epsilon" in header and "delta" in header
    # the report (written at the end of the run) says which sites trained with DP
    md = (run_dir / "report" / "report.md").read_text()
    for name, dp in zip(names, ("on", "on", "off")):
        assert f"| {name} |" in md and any(line.startswith(f"| {name} |") and f"| {dp} |" in line
                                           for line in md.splitlines()), name
    assert "refused" in md and "privacy budget" in md
