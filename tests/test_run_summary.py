"""Issue #16, points 2-5 without training: what ran is said (strategy parameters, central DP,
per-site DP) in the final table and the report; a trimmed mean that trims nothing is flagged; a
final model worse than predicting 0 Gy is flagged; the zero-dose MAE is what it says; relative
paths resolve against the app's own folder; a simulation with too few SuperNodes stops at once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from addiff_core import run_summary as rs
from addiff_core.report import write_report

from addiff_core import project
from server.federation import FederationError
from server.final_table import write_tables

CENTRAL = {"strategy": "fedavg", "central-dp-noise": 1.0, "central-dp-clip": 0.5, "central-dp-delta": 1e-3}


# ------------------------------------------------------------------------------------------
# robust strategies (point 4)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta,n,warns", [(0.2, 3, True), (0.2, 4, True), (0.2, 5, False), (0.34, 3, False),
                                          (0.25, 4, False), (0.0, 10, True), (0.45, 2, True)])
def test_trimmed_mean_that_trims_no_site_is_flagged(beta, n, warns):
    w = rs.robustness_warning({"strategy": "fedtrimmedavg", "trim-beta": beta}, n)
    assert (w is not None) == warns, w
    assert (rs.trimmed_per_end(beta, n) == 0) == warns  # Flower's own cut: int(beta * n) per end
    if warns:
        assert "trims no site" in w and f"{n} site(s)" in w
    assert rs.robustness_warning({"strategy": "fedavg", "trim-beta": beta}, n) is None


def test_trimmed_mean_advice_and_median():
    w = rs.robustness_warning({"strategy": "fedtrimmedavg", "trim-beta": 0.2}, 3)
    assert "from 5 sites on" in w and "trim-beta 0.34" in w
    assert rs.trimmed_per_end(0.34, 3) == 1 and rs.smallest_trimming_federation(0.2) == 5
    assert rs.trim_beta_for(2) is None  # no allowed beta (< 0.5) cuts one of two sites
    assert "no robustness" in rs.robustness_warning({"strategy": "fedmedian"}, 2)
    assert rs.robustness_warning({"strategy": "fedmedian"}, 3) is None


# ------------------------------------------------------------------------------------------
# what ran (point 3)
# ------------------------------------------------------------------------------------------
def test_strategy_and_privacy_lines_carry_the_parameters():
    assert rs.strategy_text({"strategy": "fedprox", "proximal-mu": 0.05}) == \
        "fedprox (proximal-mu 0.05; weighted by training cases)"
    assert rs.strategy_text({"strategy": "fedadam", "fedadam-eta": 0.01, "fedadam-beta-1": 0.8,
                             "fedadam-beta-2": 0.95, "fedadam-tau": 1e-4}) == \
        "fedadam (eta 0.01, beta-1 0.8, beta-2 0.95, tau 0.0001)"
    assert rs.strategy_text({"strategy": "fedtrimmedavg", "trim-beta": 0.2}, 3) == \
        "fedtrimmedavg (trim-beta 0.2: cuts 0 of 3 site(s) per end)"
    lines = rs.run_lines(CENTRAL, n_sites=3, central_epsilon=7.5, rounds=10,
                         privacy={"a": {"dp_enabled": 1.0, "epsilon": 2.0, "delta": 1e-4}, "b": {"dp_enabled": 0.0}})
    assert lines == ["Aggregation: fedavg (uniform weights, as central DP needs)",
                     "Central DP: on (client level): noise multiplier 1, clip 0.5, delta 0.001, epsilon 7.5 after 10 "
                     "round(s)",
                     "Per-site DP (DP-SGD): on at a epsilon 2 (delta 0.0001); off at b"]
    assert rs.run_lines({"strategy": "fedavg"}, privacy={"a": {"dp_enabled": 0.0}})[1:] == [
        "Central DP: off", "Per-site DP (DP-SGD): off at every site"]
    secure = {"strategy": "fedprox", "proximal-mu": 0.01, "secure-aggregation": True, "secagg-clip": 8.0,
              "secagg-quantization": 2 ** 26, "secagg-threshold": 0}
    assert rs.run_lines(secure)[2] == (
        "Secure aggregation: on (Flower SecAgg+: the server unmasks only the weighted sum of the sites' updates; "
        "clip 8, 67108864 quantization levels, threshold a majority of the sites)")
    assert not any(x.startswith("Secure") for x in rs.run_lines({**secure, "secure-aggregation": False}))


def rows(mae_a: float) -> list[dict]:
    return [{"site": "hospital_a", "cases": 2, "mae_gy": mae_a, "mae_pct_rx": mae_a / 0.7, rs.ZERO_DOSE_KEY: 40.0,
             "dp_enabled": 0.0},
            {"site": "hospital_b", "cases": 2, "mae_gy": 3.0, "mae_pct_rx": 4.3, rs.ZERO_DOSE_KEY: 30.0,
             "dp_enabled": 0.0}]


def test_worse_than_zero_dose_is_flagged_per_site():
    assert rs.worse_than_zero_dose(rows(39.0), CENTRAL) == []
    (w,) = rs.worse_than_zero_dose(rows(128.0), CENTRAL)
    assert w.startswith("WARNING: at hospital_a") and "128.00 Gy against 40.00 Gy" in w and "PRIVACY.md" in w
    assert "PRIVACY.md" not in rs.worse_than_zero_dose(rows(128.0), {"strategy": "fedavg"})[0]


def test_final_table_says_what_ran_and_flags(tmp_path):
    notes = rs.run_lines(CENTRAL, n_sites=2, central_epsilon=7.5, rounds=4, privacy=rs.privacy_of_rows(rows(128.0)))
    notes += rs.worse_than_zero_dose(rows(128.0), CENTRAL)
    write_tables(tmp_path, rows(128.0), notes=notes)
    md = (tmp_path / "final_metrics.md").read_text()
    assert "- Aggregation: fedavg (uniform weights, as central DP needs)" in md
    assert "noise multiplier 1, clip 0.5, delta 0.001, epsilon 7.5 after 4 round(s)" in md
    assert "- Per-site DP (DP-SGD): off at every site" in md
    assert "- WARNING: at hospital_a the final model is worse than predicting 0 Gy" in md
    assert md.index("WARNING") < md.index("| site |")  # above the table, not lost under it


def fake_run(root: Path, rc: dict, final: list[dict]) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_config": {"site-files": "", **rc}, "status": "complete",
                                              "schedule": [{"round": 1, "stage": "unet"}, {"round": 2, "stage": "unet"}]}))
    metrics = [{"kind": "train", "round": n, "stage": "unet", "site": r["site"], "num_examples": 6, "train_loss": 1.0,
                "dp_enabled": 0.0} for n in (1, 2) for r in final]
    metrics += [{"kind": "round", "round": n, "stage": "unet", "strategy": rc["strategy"], "train_loss": 1.0,
                 "central_dp_epsilon": 3.0 * n} for n in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    (run / "final_metrics.json").write_text(json.dumps(final))
    return run


def test_report_shows_central_dp_strategy_and_zero_dose_flag(tmp_path):
    md = write_report(fake_run(tmp_path, CENTRAL, rows(128.0)), figures=False).read_text()
    assert "**Strategy**: fedavg (uniform weights, as central DP needs)" in md
    assert "**Central DP**: on (client level): noise multiplier 1, clip 0.5, delta 0.001, epsilon 6 after 2" in md
    assert "**Per-site DP (DP-SGD)**: off at every site" in md
    assert "worse than predicting 0 Gy everywhere: held-out MAE 128.00 Gy against 40.00 Gy" in md
    assert "MAE of 0 Gy (Gy)" in md  # the column next to the model's MAE


def test_report_flags_a_trimmed_mean_that_trims_nothing(tmp_path):
    md = write_report(fake_run(tmp_path, {"strategy": "fedtrimmedavg", "trim-beta": 0.2}, rows(3.0)),
                      figures=False).read_text()
    assert "**Strategy**: fedtrimmedavg (trim-beta 0.2: cuts 0 of 2 site(s) per end)" in md
    assert "**Warning**: fedtrimmedavg with trim-beta 0.2 trims no site" in md
    assert "**Central DP**: off" in md and "worse than predicting" not in md


# ------------------------------------------------------------------------------------------
# zero-dose MAE (point 5)
# ------------------------------------------------------------------------------------------
def test_zero_dose_mae_is_the_mean_dose_in_the_evaluation_region(tmp_path, make_case):
    from addiff_core.site_task import zero_dose_mae

    a = make_case(tmp_path, name="a")
    arr = make_case.arrays()
    body = arr["possible_dose_mask"].astype(bool)
    want_a = float(np.abs(arr["dose"][body]).mean())
    b = make_case(tmp_path, name="b", dose=arr["dose"] * 0.5, possible_dose_mask=None)  # falls back to Body
    want_b = float(np.abs(0.5 * arr["dose"][arr["masks"]["Body"].astype(bool)]).mean())
    assert zero_dose_mae([a]) == pytest.approx(want_a, rel=1e-5)
    assert zero_dose_mae([a, b]) == pytest.approx((want_a + want_b) / 2, rel=1e-5)
    assert np.isnan(zero_dose_mae([]))


# ------------------------------------------------------------------------------------------
# paths resolve against the app's own folder (point 2)
# ------------------------------------------------------------------------------------------
def fake_checkout(d: Path, pyproject: str | None = None) -> Path:
    (d / "addiff_core").mkdir(parents=True)
    (d / "server").mkdir()
    (d / "configs").mkdir()
    root = Path(project.__file__).resolve().parents[1]
    (d / "pyproject.toml").write_text(pyproject or (root / "pyproject.toml").read_text())
    for sub in ("server", "client"):
        (d / sub).mkdir(exist_ok=True)
        for f in (root / sub).glob("*.py"):
            (d / sub / f.name).write_bytes(f.read_bytes())
    for f in (root / "configs").glob("*.yaml"):
        (d / "configs" / f.name).write_bytes(f.read_bytes())
    return d


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(project.PROJECT_ENV, raising=False)
    project._project_root.cache_clear()
    yield
    project._project_root.cache_clear()


def test_a_copy_of_the_project_resolves_against_itself(tmp_path, monkeypatch, no_env):
    copy = fake_checkout(tmp_path / "copy")
    (copy / "sites").mkdir()
    monkeypatch.chdir(copy / "sites")
    assert project.project_root() == copy.resolve()
    assert project.resolve_path("runs/x") == (copy / "runs" / "x").resolve()
    monkeypatch.chdir(tmp_path)  # outside any project: the installed checkout, as before
    assert project.project_root() == Path(project.__file__).resolve().parents[1]
    monkeypatch.setenv(project.PROJECT_ENV, str(tmp_path / "elsewhere"))
    assert project.project_root() == (tmp_path / "elsewhere").resolve()


def test_an_app_bundle_resolves_against_the_folder_it_was_built_from(tmp_path, monkeypatch, no_env):
    bundle = fake_checkout(tmp_path / "bundle")
    for d in ("addiff_core",):
        (bundle / d).rmdir()  # a FAB holds no addiff_core
    copy = fake_checkout(tmp_path / "copy")
    monkeypatch.setattr(project, "bundle_dir", lambda: bundle)
    monkeypatch.chdir(copy)  # the SuperLink was started in the copy
    assert project.project_root() == copy.resolve()
    # the copy was changed after the SuperLink started elsewhere: the bundle matches neither the
    # server's folder nor the installed checkout -> a clear error, never another checkout's files
    (bundle / "configs" / "demo.yaml").write_text("changed: true\n")
    project._project_root.cache_clear()
    with pytest.raises(project.ProjectRootError, match="cannot tell which folder"):
        project.project_root()


def test_same_app_ignores_the_federations_section_flower_strips(tmp_path):
    base = (Path(project.__file__).resolve().parents[1] / "pyproject.toml").read_text()
    a = fake_checkout(tmp_path / "a")
    b = fake_checkout(tmp_path / "b", base + '\n[tool.flwr.federations]\ndefault = "x"\n')
    assert project.same_app(a, b)
    (b / "server" / "extra.py").write_text("x = 1\n")
    assert not project.same_app(a, b)


# ------------------------------------------------------------------------------------------
# too few simulated SuperNodes: a clear stop (point 1)
# ------------------------------------------------------------------------------------------
def test_simulation_with_too_few_supernodes_stops_at_once(tmp_path, monkeypatch):
    import server.federation as fed
    from server.settings import from_run_config
    from helpers.federation import TINY, FakeGrid

    sites = [tmp_path / f"s{i}.yaml" for i in range(3)]  # never read: the run stops before round 1
    settings = from_run_config({"run-dir": str(tmp_path / "run"), "site-files": ",".join(map(str, sites)),
                                "model-config": str(TINY), "strategy": "fedtrimmedavg"})
    monkeypatch.setattr(fed, "is_simulation", lambda grid: True)
    f = fed.Federation(FakeGrid(2), settings)
    assert f.send_site_files  # a simulation sends the site files resolved by the server
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    fed.log.addHandler(handler)
    try:
        with pytest.raises(FederationError, match=r'2 SuperNode\(s\) but the run needs 3.*num-supernodes=3'):
            f.run()
        f._log_what_runs()
    finally:
        fed.log.removeHandler(handler)
    msgs = [r.getMessage() for r in records]
    assert any("trims no site with 3 site(s)" in m for m in msgs), msgs
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
