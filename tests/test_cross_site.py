"""Cross-site evaluation and personalization (issue #25).

Fast: the matrix arithmetic and files, the heat map, the site-file keys, what the commands put
into the run config, and a lying site's adapt reply (every number bounded where it is used).
Slow: one real run of the server loop with the real ClientApp in-process (FakeGrid): three
tiny sites, hospital_a shares its models, hospital_b refuses personalization, hospital_c trains
with DP; the matrix entries equal ``addiff evaluate`` of the same checkpoints, no weights of a
non-sharing site ever leave it, personalization overwrites neither ``final_model.pt`` nor the
site's cached global VAE, and ``addiff predict`` runs on ``personalized.pt``.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from addiff_core.config import ConfigError, load_site_config
from addiff_core.cross_site import BOUNDS, Matrix, ModelRow, bounded, cell_of, heatmap, read_matrix, verdicts
from addiff_core.round_plan import site_epochs, stages_of
from helpers.cli import run_cli
from helpers.federation import TINY, FakeGrid, site_file_variant, synthetic_sites


# ------------------------------------------------------------------------------------------
# fast
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,want", [
    ("mae_gy", 2.5, 2.5), ("mae_gy", -1.0, None), ("mae_gy", 1e9, None), ("mae_gy", math.nan, None),
    ("mae_gy", True, None), ("mae_gy", "3", None), ("mean_isodose_dice", 1.5, None), ("mean_isodose_dice", 0.7, 0.7)])
def test_a_matrix_number_is_bounded(key, value, want):
    assert bounded(key, value) == want
    assert set(BOUNDS) == {"mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "mean_isodose_dice"}


def _matrix() -> Matrix:
    m = Matrix(sites=["a", "b"])
    m.add_row(ModelRow("global", "global", None, True))
    m.add_row(ModelRow("a personalized", "personalized", "a", True))
    m.add_row(ModelRow("b local", "local", "b", False))
    m.put("global", "a", cell_of({"mae_gy": 3.0, "mean_isodose_dice": 0.5}, 2))
    m.put("global", "b", cell_of({"mae_gy": 4.0}, 1))
    m.put("a personalized", "a", cell_of({"mae_gy": 2.0}, 2))
    m.put("a personalized", "b", cell_of({"mae_gy": 5.0}, 1))
    m.put("b local", "b", cell_of({"mae_gy": 6.0, "openkbp_dvh_score": -3}, 1))
    return m


def test_matrix_files_say_what_was_evaluated_where(tmp_path):
    _matrix().write(tmp_path)
    doc = read_matrix(tmp_path)
    assert [c["at"] for c in doc["cells"]] == ["home", "home", "home", "elsewhere", "home"]
    assert {m["model"]: m["evaluated"] for m in doc["models"]}["b local"] == "at home only (not shared)"
    cell = next(c for c in doc["cells"] if c["model"] == "b local")
    assert cell["openkbp_dvh_score"] is None and cell["mae_gy"] == 6.0  # a negative score is no number
    csv = (tmp_path / "cross_site.csv").read_text().splitlines()
    assert csv[0].startswith("model,kind,owner,site,at,cases,mae_gy") and len(csv) == 6
    md = (tmp_path / "cross_site.md").read_text()
    assert "| b local | - | 6 | at home only (not shared) |" in md
    v = {x["site"]: x for x in verdicts(doc)}
    assert v["a"]["personalized_beats_global"] is True and v["a"]["global_beats_local"] is None
    assert v["b"]["global_beats_local"] is True and v["b"]["personalized_beats_global"] is None
    png = heatmap(tmp_path / "h.png", doc)
    assert png.stat().st_size > 5000


def test_site_file_keys_share_personalize_local(tmp_path):
    [src] = synthetic_sites(tmp_path / "s", n_sites=1, cases_per_site=2)
    site = load_site_config(src)
    assert (site.share_models_for_evaluation, site.personalize_max_epochs, site.train_local_model) == (False, None, True)
    assert site_epochs(site, 5) == 5
    capped = load_site_config(site_file_variant(src, tmp_path / "c.yaml", personalize=2, share_models_for_evaluation=True))
    assert site_epochs(capped, 5) == 2 and capped.share_models_for_evaluation
    assert site_epochs(load_site_config(site_file_variant(src, tmp_path / "o.yaml", personalize=False)), 5) == 0
    with pytest.raises(ConfigError, match="personalize"):
        load_site_config(site_file_variant(src, tmp_path / "x.yaml", personalize="lots"))
    assert stages_of("unet", "both") == ["unet"] and stages_of("diffusion", "diffusion") == ["diffusion"]


def test_commands_put_cross_site_and_personalize_epochs_into_the_run_config(tmp_path, monkeypatch, capsys):
    import server.simulate as simulate

    seen = {}
    monkeypatch.setattr(simulate, "run_inprocess", lambda rc, *a, **k: seen.update(rc) or {"status": "failed"})
    files = synthetic_sites(tmp_path / "s", n_sites=2, cases_per_site=2)
    run_cli(capsys, "simulate", "--site-files", ",".join(map(str, files)), "--config", str(TINY), "--cross-site",
            "--set", "personalize-epochs=2", "--run-dir", str(tmp_path / "run"))
    assert seen["cross-site"] is True and seen["personalize-epochs"] == 2
    from server.settings import from_run_config

    with pytest.raises(ConfigError, match="personalize-stages"):
        from_run_config({"personalize-stages": "vae"})


def _adapt_reply(metrics: dict, site: dict, arrays=None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord(site)})
    if arrays is not None:
        content["local-arrays"] = arrays
    return Message(content=content, dst_node_id=0, message_type="train.adapt")


def test_a_lying_adapt_reply_gives_no_number_and_no_model(tmp_path):
    """Implausible metrics are empty cells, a bad case count rejects the row, an unknown status is
    said so, weights that do not fit the model are not evaluated elsewhere."""
    from client.records import to_record
    from server.cross_site import CrossSiteFederation, SiteModels
    from server.replies import Who
    from server.settings import from_run_config

    files = synthetic_sites(tmp_path / "s", n_sites=1, cases_per_site=2)
    fed = CrossSiteFederation(FakeGrid(1), from_run_config({
        "run-dir": str(tmp_path / "run"), "site-files": str(files[0]), "model-config": str(TINY), "cross-site": True,
        "personalize-epochs": 1}), send_site_files=True)
    sm = SiteModels(fed)
    m = Matrix(sites=["liar"])
    bad = {"personalized.num-cases": 3.0, "personalized.mae_gy": -5.0, "personalized.mean_isodose_dice": 7.0,
           "personalized.openkbp_dose_score": math.inf, "local.num-cases": -1.0, "epsilon": math.nan, "dp_enabled": 1.0}
    shared = sm._read_reply(Who(_adapt_reply(bad, {"name": "liar", "personalized": "done", "local": "done",
                                                   "shared": True}, to_record({"x": np.zeros(3, np.float32)})), 5,
                                "liar"), m, max_cases=100)
    assert shared == {}  # the "local-arrays" fit no model, and the local row was rejected anyway
    assert m.cells[("liar personalized", "liar")] == {"cases": 3, "mae_gy": None, "openkbp_dose_score": None,
                                                      "openkbp_dvh_score": None, "mean_isodose_dice": None}
    rows = {r.model: r for r in m.rows}
    assert rows["liar local"].status.startswith("rejected: local.num-cases") and not rows["liar local"].shared
    assert "liar" not in sm.epsilon
    m2 = Matrix(sites=["x"])
    sm._read_reply(Who(_adapt_reply({}, {"name": "x", "personalized": "=cmd()", "local": "off"}), 6, "x"), m2, 100)
    assert {r.model: r.status for r in m2.rows}["x personalized"] == "invalid status"


# ------------------------------------------------------------------------------------------
# slow: one run of the loop
# ------------------------------------------------------------------------------------------
class RecordingGrid(FakeGrid):
    """FakeGrid that keeps every reply (what each site's ClientApp sent)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.replies: list[tuple[str, int, Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = super().send_and_receive(messages, timeout=timeout)
        for m, r in zip(messages, out):
            self.replies.append((m.metadata.message_type, m.metadata.dst_node_id, r))
        return out


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory):
    from server.cross_site import CrossSiteFederation
    from server.settings import from_run_config

    base = tmp_path_factory.mktemp("cross_site")
    src = synthetic_sites(base / "sites")
    files = [site_file_variant(src[0], base / "v" / "a.yaml", share_models_for_evaluation=True, state_dir=str(base / "st_a")),
             site_file_variant(src[1], base / "v" / "b.yaml", personalize=False, state_dir=str(base / "st_b")),
             site_file_variant(src[2], base / "v" / "c.yaml", state_dir=str(base / "st_c"),
                               privacy={"enabled": True, "target_epsilon": 50.0})]
    run_dir = base / "run"
    grid = RecordingGrid(3)
    settings = from_run_config({
        "run-dir": str(run_dir), "site-files": ",".join(map(str, files)), "model-config": str(TINY), "vae-rounds": 1,
        "diffusion-rounds": 1, "local-epochs": 1, "eval-steps": 2, "eval-gamma": False, "report-figures": False,
        "cross-site": True, "personalize-epochs": 1})
    out = CrossSiteFederation(grid, settings, send_site_files=True).run()
    return run_dir, files, grid, out, base


@pytest.mark.slow
def test_matrix_entries_equal_addiff_evaluate_of_the_same_checkpoint(cross_run):
    from addiff_core.local import evaluate_checkpoint

    run_dir, files, _, out, base = cross_run
    assert out["status"] == "complete"
    doc = read_matrix(run_dir)
    cells = {(c["model"], c["site"]): c for c in doc["cells"]}
    checks = [("global", run_dir / "final_model.pt", 0, "hospital_a"),
              ("global", run_dir / "final_model.pt", 2, "hospital_c"),
              ("hospital_a personalized", base / "st_a" / "personalized.pt", 0, "hospital_a"),
              ("hospital_a local", base / "st_a" / "cross_site_local.pt", 1, "hospital_b"),  # shared: evaluated at b
              ("hospital_b local", base / "st_b" / "cross_site_local.pt", 1, "hospital_b")]
    for model, ckpt, i, site in checks:
        want = evaluate_checkpoint(ckpt, files[i], steps=2, seed=0)["mean"]
        for k in ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "mean_isodose_dice"):
            assert cells[(model, site)][k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (model, site, k)
    # b's own models are evaluated at home only; its personalization was refused by its site file
    assert ("hospital_b local", "hospital_a") not in cells
    rows = {m["model"]: m for m in doc["models"]}
    assert rows["hospital_b local"]["evaluated"] == "at home only (not shared)"
    assert rows["hospital_b personalized"]["status"].startswith("not trained")
    assert not (base / "st_b" / "personalized.pt").exists()
    assert {(c["model"], c["site"]) for c in doc["cells"] if c["model"] == "hospital_a local"} == {
        ("hospital_a local", s) for s in ("hospital_a", "hospital_b", "hospital_c")}
    assert (run_dir / "cross_site.csv").is_file() and (run_dir / "cross_site.md").is_file()


@pytest.mark.slow
def test_a_site_without_sharing_never_sends_its_own_weights(cross_run):
    """Every reply of hospital_b and hospital_c: weights only in a train reply (the round's stage);
    the adapt and evaluate replies hold numbers only. hospital_a (sharing) sends both models."""
    from addiff_core.wire import PACKED

    _, _, grid, _, _ = cross_run
    kinds = set()
    for mtype, node, reply in grid.replies:
        arrays = list(reply.content.array_records)
        if node == 1000:
            if mtype == "train.adapt":
                assert sorted(arrays) == ["local-arrays", "personalized-arrays"]
            continue
        kinds.add(mtype)
        if mtype == "train":
            assert arrays == ["arrays"]
            stages = {k[len(PACKED):].split(":")[0] if k.startswith(PACKED) else k.split(".")[0]
                      for k in reply.content["arrays"].keys()}
            assert len(stages) == 1, stages
        else:
            assert arrays == [], (mtype, node, arrays)
    assert kinds == {"train", "evaluate", "train.adapt", "evaluate.cross"}


@pytest.mark.slow
def test_personalization_overwrites_neither_the_global_model_nor_the_cached_vae(cross_run):
    from addiff_core.checkpoint import load_checkpoint

    run_dir, _, _, _, base = cross_run
    final, _, _ = load_checkpoint(run_dir / "final_model.pt")
    last, _, _ = load_checkpoint(sorted((run_dir / "checkpoints").glob("round_*.pt"))[-1])
    assert all(torch.equal(final[k], last[k]) for k in final)
    personal, _, meta = load_checkpoint(base / "st_a" / "personalized.pt")  # hashed: verified on load
    assert meta["what"] == "personalized" and (base / "st_a" / "personalized.pt.sha256").is_file()
    assert any(not torch.equal(personal[k], final[k]) for k in final)
    for st in ("st_a", "st_b", "st_c"):  # the local model's initial VAE never replaced the global one
        vae, _, _ = load_checkpoint(base / st / "global_vae.pt")
        assert all(torch.equal(vae[k], final[k]) for k in vae), st


@pytest.mark.slow
def test_final_table_global_vs_personalized_and_dp_spends_the_same_budget(cross_run):
    run_dir, _, _, _, base = cross_run
    rows = {r["site"]: r for r in json.loads((run_dir / "final_metrics.json").read_text())}
    assert rows["hospital_a"]["personalized_mae_gy"] > 0 and rows["hospital_a"]["mae_gy"] > 0
    assert rows["hospital_b"]["personalized_mae_gy"] is None
    c = rows["hospital_c"]
    assert c["personalized_mae_gy"] > 0
    assert c["epsilon_after_personalization"] > c["epsilon"] > 0  # the same accountant, charged again
    ledger = json.loads((base / "st_c" / "privacy_accountant.json").read_text())
    assert ledger["history"] and c["epsilon_after_personalization"] <= ledger["target_epsilon"]
    # the noise was calibrated from round 1 for the rounds (1 + 1 epochs) and the fine-tuning (1 epoch x 2 stages)
    assert ledger["planned_steps"] == round(4 / ledger["sample_rate"])
    # the local model is not in the plan: the accountant refuses it, and the matrix says so
    status = {m["model"]: m["status"] for m in read_matrix(run_dir)["models"]}
    assert status["hospital_c local"] == "refused (privacy budget)" and status["hospital_c personalized"] == "ok"
    md = (run_dir / "final_metrics.md").read_text()
    assert "personalized_mae_gy" in md and "same privacy budget" in md


@pytest.mark.slow
def test_addiff_predict_uses_the_personalized_model(cross_run, tmp_path, capsys):
    from addiff_core.case_io import list_cases

    _, files, _, _, base = cross_run
    case = list_cases(load_site_config(files[0]).data_dir)[0]
    code, err = run_cli(capsys, "predict", "--checkpoint", str(base / "st_a" / "personalized.pt"), "--case", str(case),
                      "--out", str(tmp_path / "pred"), "--steps", "2", "--force")  # a 2-round model: implausible
    assert code == 0 and any((tmp_path / "pred").iterdir()), err


def test_the_report_shows_the_matrix_and_its_heat_map(tmp_path):
    from addiff_core.report import write_report

    _matrix().write(tmp_path)
    md = write_report(tmp_path, figures=True).read_text()
    assert "## Cross-site evaluation" in md and "figures/cross_site_heatmap.png" in md
    assert "| a | 3 | 2 | - | yes | n/a |" in md and "| b | 4 | - | 6 | n/a | yes |" in md  # the verdicts
    assert (tmp_path / "report" / "figures" / "cross_site_heatmap.png").stat().st_size > 5000


def test_the_cross_site_bench_adds_pooled_and_other_personalizations_and_says_who_wins():
    import sys

    sys.path.insert(0, str(TINY.parents[1] / "bench"))
    import cross_site_bench as cb

    doc = _matrix().to_json()
    out = cb.assemble(doc, {"diffusion": {"a": cell_of({"openkbp_dose_score": 2.5}, 2)}},
                      {"a": {"cases": 2, "openkbp_dose_score": 1.0}, "b": {"cases": 1, "openkbp_dose_score": 9.0}})
    doc["models"][0]["model"] = "changed"  # assemble copies
    names = [m["model"] for m in out["models"]]
    assert names[-2:] == ["a personalized (diffusion)", "pooled"] and names[0] == "global"
    for v in out["cells"]:  # the verdicts read the dose score; _matrix() gives MAEs
        v["openkbp_dose_score"] = v["openkbp_dose_score"] if v["openkbp_dose_score"] is not None else v["mae_gy"]
    verdict = {v["site"]: v for v in cb.verdict_rows(out)}
    assert verdict["a"]["pooled_beats_global"] is True and verdict["b"]["pooled_beats_global"] is False
    assert cb.split_by_key({"p1": 3.0, "p2": 1.0, "p3": 2.0}) == [["p2"], ["p3"], ["p1"]]


def test_a_resumed_run_may_ask_for_the_matrix(tmp_path):
    from addiff_core.run_folder import RunFolder
    from server import global_model
    from server.settings import from_run_config, settings_for_resume

    files = synthetic_sites(tmp_path / "s", n_sites=1, cases_per_site=2)
    cfg = {"run-dir": str(tmp_path / "run"), "site-files": str(files[0]), "model-config": str(TINY)}
    first = from_run_config(cfg)
    global_model.start(RunFolder(first.run_dir), first)
    again = settings_for_resume(from_run_config({**cfg, "resume": True, "cross-site": True, "personalize-epochs": 3}))
    assert again.raw["cross-site"] is True
    assert again.raw["personalize-epochs"] == 0  # the DP sites' noise was planned without it: the stored value
