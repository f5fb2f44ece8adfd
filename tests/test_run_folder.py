"""addiff_core.run_folder and addiff_core.site_table: the run folder's one owner and the one
all-sites row (fast, no training)."""
from __future__ import annotations

import json
import math

import pytest

from addiff_core.config import ConfigError
from addiff_core.project import resolve_path, split_list
from addiff_core.run_folder import RunFolder
from addiff_core.site_table import csv_text, markdown_table, overall_row, with_overall


def test_run_json_round_trip_and_a_garbage_one_is_one_line(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.read_run_json() == {} and folder.kind() == "unknown"
    with pytest.raises(ConfigError, match="not a run folder \\(no run.json\\)"):
        folder.require_run_json()
    folder.write_run_json({"status": "running", "loss": float("nan"), "run_config": {"site-files": "a.yaml"}})
    assert folder.read_run_json()["loss"] is None  # JSON-safe: NaN -> null
    assert folder.update_run_json(status="complete")["status"] == "complete"
    assert folder.stored_run_config(require=("site-files",)) == {"site-files": "a.yaml"}
    with pytest.raises(ConfigError, match="holds no run config"):
        folder.stored_run_config(require=("seed",))
    assert folder.kind() == "federated"
    folder.run_json.write_text("{ not json")
    with pytest.raises(ConfigError) as e:
        folder.read_run_json()
    assert "not a readable run description" in str(e.value) and "\n" not in str(e.value)


def test_metrics_append_read_and_truncate(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append_metrics([{"kind": "train", "round": r, "loss": float("inf")} for r in (1, 2, 3)])
    folder.append_metrics([{"kind": "final", "round": 3}])
    with folder.metrics.open("a") as fh:
        fh.write('[1, 2]\n{"kind": "tr')  # not an object, and a half-written last line
    rows, bad = folder.read_metrics_counted()
    assert [r["round"] for r in rows] == [1, 2, 3, 3] and bad == 2 and rows[0]["loss"] is None
    folder.truncate_metrics(2)
    assert [(r["kind"], r["round"]) for r in folder.read_metrics()] == [("train", 1), ("train", 2)]
    folder.clear_metrics()
    assert folder.read_metrics() == []


def test_checkpoints_listing_and_one_refusal(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.rounds_on_disk() == [] and not folder.has_checkpoints()
    folder.refuse_if_started()  # nothing there: fine
    for rnd in (2, 10):
        folder.checkpoint_path(rnd).parent.mkdir(parents=True, exist_ok=True)
        folder.checkpoint_path(rnd).write_bytes(b"x")
    (folder.checkpoints / "round_x.pt").write_bytes(b"x")  # not a round
    assert folder.checkpoint_path(2).name == "round_0002.pt" and folder.rounds_on_disk() == [2, 10]
    with pytest.raises(ConfigError, match="already holds checkpoints: resume it \\(--resume .*\\) or choose another"):
        folder.refuse_if_started()
    assert folder.latest_valid(warn=lambda *a: None) is None  # unreadable ones are skipped
    folder.final_model.write_bytes(b"x")
    assert folder.model_files()[0] == folder.final_model  # then the round checkpoints, newest first


def test_paths_in_a_run_config(tmp_path):
    assert split_list("a.yaml, b.yaml\nc.yaml,") == ["a.yaml", "b.yaml", "c.yaml"]
    assert split_list(["a", " ", "b "]) == ["a", "b"]
    assert resolve_path("x/y.yaml", tmp_path) == (tmp_path / "x" / "y.yaml").resolve()
    assert resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_one_all_sites_row_for_the_server_and_the_report(tmp_path):
    rows = [{"site": "a", "cases": 2, "mae_gy": 1.0, "gamma_pass_rate": float("nan"), "status": "ok"},
            {"site": "b", "cases": 1, "mae_gy": 4.0, "gamma_pass_rate": float("nan"), "status": "ok; left out in round 2"},
            {"site": "c", "cases": 0, "status": "no reply"}]
    server = with_overall(rows, planned=3)[-1]
    report = overall_row(rows, ["mae_gy", "gamma_pass_rate"])
    assert server["site"] == "all sites (case-weighted, 2 of 3 sites)" and report["site"] == "all sites (case-weighted)"
    for row in (server, report):
        assert row["cases"] == 3 and row["mae_gy"] == pytest.approx(2.0) and row["gamma_pass_rate"] is None
    # CSV strings count as numbers; a missing value is an empty CSV cell and "n/a" in Markdown
    as_csv = [{k: (str(v) if k in ("cases", "mae_gy") else v) for k, v in r.items()} for r in rows]
    assert overall_row(as_csv, ["mae_gy"])["mae_gy"] == pytest.approx(2.0)
    assert csv_text(rows, 3).splitlines()[-1].startswith('"all sites (case-weighted, 2 of 3 sites)",3,2.0,,')
    assert "| all sites (case-weighted, 2 of 3 sites) | 3 | 2 | n/a |" in markdown_table(rows, 3)
    # one planned site that answered: no all-sites row
    assert with_overall(rows[:1], planned=1) == rows[:1]
    folder = RunFolder(tmp_path)
    folder.write_final_tables(csv_text(rows, 3), "# t\n", rows)
    assert math.isnan(rows[0]["gamma_pass_rate"]) and json.loads(folder.final_json.read_text())[0]["gamma_pass_rate"] is None
