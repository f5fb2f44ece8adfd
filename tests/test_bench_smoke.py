"""The bench scripts run end to end in --smoke mode and write measured, finite numbers.

Not a timing test: the numbers are only checked to be real measurements (finite, positive,
not all equal), never against a threshold.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _timing(summary: dict) -> None:
    assert summary["n"] >= 1 and len(summary["values"]) == summary["n"]
    assert all(_positive(v) for v in summary["values"])
    assert summary["min"] <= summary["median"] <= summary["max"]


def _check_machine(m: dict, device: str) -> None:
    for key in ("cpu_model", "logical_cpus", "torch", "device", "loadavg_start", "memory_method"):
        assert key in m
    assert m["device"] == device and isinstance(m["torch"], str) and m["torch"]


def test_model_bench_smoke(tmp_path):
    mod = _load("model_bench")
    res = mod.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    data = json.loads((tmp_path / "model_bench.json").read_text())
    assert (tmp_path / "model_bench.md").read_text().startswith("# Model bench")
    assert data["smoke"] is True and data["bench"] == "model_bench"
    _check_machine(data["machine"], "cpu")
    assert data["wall_seconds"] == pytest.approx(res["wall_seconds"])

    (pred,) = data["prediction"]
    assert pred["grid"] == 16 and pred["device"] == "cpu" and pred["sample_steps"] >= 1
    for key in ("predict", "sample", "preprocess", "condition", "decode", "map_back", "load_model"):
        _timing(pred["seconds"][key])
    _timing(pred["cpu_seconds"]["predict"])
    # the whole predict path contains the sampling: measured, so not the same number
    assert pred["seconds"]["predict"]["median"] != pred["seconds"]["sample"]["median"]
    assert _positive(pred["peak_rss_predict_mib"]) and _positive(pred["peak_rss_sample_mib"])
    assert pred["peak_rss_predict_mib"] >= pred["rss_after_imports_mib"] * 0.5
    params = pred["parameters"]
    for key in ("vae", "condition_encoder", "denoiser", "unet_baseline"):
        assert isinstance(params[key], int) and params[key] > 0
    assert params["diffusion_stage"] == params["condition_encoder"] + params["denoiser"]
    assert pred["model_config"]["grid"]["size"] == 16

    mae = data["mae"]
    assert mae["budget"]["diffusion"]["optimizer_steps"] == mae["budget"]["unet"]["optimizer_steps"] > 0
    assert _positive(mae["training_seconds"]["diffusion"]) and _positive(mae["training_seconds"]["unet"])
    assert set(mae["per_site"]) == set(mae["heldout_cases"])
    for row in mae["per_site"].values():
        for label in ("diffusion", "unet", "constant"):
            assert _positive(row[label]["mae_gy"]) and _finite(row[label]["mae_pct_rx"])
    overall = mae["overall_mean_over_cases"]
    assert len({overall[k]["mae_gy"] for k in ("diffusion", "unet", "constant")}) == 3


def test_dp_bench_smoke(tmp_path):
    mod = _load("dp_bench")
    mod.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    data = json.loads((tmp_path / "dp_bench.json").read_text())
    assert (tmp_path / "dp_bench.md").read_text().startswith("# DP bench")
    assert data["smoke"] is True and data["bench"] == "dp_bench"
    _check_machine(data["machine"], "cpu")

    stages = data["step_time"]["stages"]
    assert set(stages) == {"vae", "diffusion"}
    for s in stages.values():
        for arm in ("dp", "no_dp"):
            _timing(s[arm]["wall_s_per_step"])
            _timing(s[arm]["cpu_s_per_step"])
            assert all(e["steps"] >= 1 for e in s[arm]["epochs"])
        assert _positive(s["ratio"]["wall_per_step"]["median"]) and _positive(s["ratio_headline"])
        assert isinstance(s["meets_3x_aim"], bool)

    mem = data["memory"]
    assert {(r["dp"], r["batch"]) for r in mem["runs"]} == {(False, 1), (True, 1)}
    for r in mem["runs"]:
        assert r["samples"] == r["batch"] and r["steps"] == 1  # exactly one step of `batch` samples
        assert _positive(r["peak_rss_mib"]) and _positive(r["rss_before_step_mib"])
        assert r["peak_rss_mib"] >= r["rss_before_step_mib"] * 0.9
        assert _positive(r["step_seconds_first"]) and r["trainable_parameters"] > 0

    rows = data["utility"]["kinds"]["diffusion"]["rows"]
    assert [r["epsilon_label"] for r in rows] == ["inf", "8"]
    assert rows[0]["dp_enabled"] is False and rows[0]["noise_multiplier"] is None
    assert rows[1]["dp_enabled"] is True and _positive(rows[1]["noise_multiplier"])
    for r in rows:
        assert _positive(r["overall_mean_over_cases"]["mae_gy"]) and _positive(r["train_seconds"])
        for site in r["per_site"].values():
            assert _positive(site["mae_gy"]) and site["optimizer_steps"] >= 1
    spent = [s["epsilon_spent"] for s in rows[1]["per_site"].values()]
    assert all(_positive(e) and e <= 8.0 * 1.001 for e in spent)


@pytest.mark.slow
def test_ablation_smoke_and_merge(tmp_path):
    """Three variants at a tiny CPU budget: every row has finite held-out numbers, the budget was
    spent, the ADDiff rows carry the latent probe (issue #24), and --merge combines result files
    of parallel runs."""
    mod = _load("ablation")
    data = tmp_path / "data"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--budgets", "1", "--seeds", "0", "--cases", "8", "--samples", "2", "--data", str(data)]
    assert mod.main(["--variants", "new,d24-new", *common, "--out", str(a)]) == 0
    assert mod.main(["--variants", "unet", *common, "--out", str(b)]) == 0
    merged = tmp_path / "m.json"
    assert mod.main(["--merge", str(a), str(b), "--out", str(merged)]) == 0
    rows = {r["variant"]: r for r in json.loads(merged.read_text())["rows"]}
    assert sorted(rows) == ["d24-new", "new", "unet"]
    for r in rows.values():
        assert _positive(r["heldout"]["mae_gy"]) and r["num_heldout"] == 2
        spent = r["unet"]["cpu_s"] if r["variant"] == "unet" else r["vae"]["cpu_s"] + r["diffusion"]["cpu_s"]
        assert spent >= 1.0 * 0.99
    for name in ("new", "d24-new"):
        assert -1.0 <= rows[name]["uncertainty_spearman"] <= 1.0
        probe = rows[name]["probe"]
        assert all(_positive(probe[k]) for k in ("sampled", "zero", "oracle", "shuffled", "oracle_over_sampled",
                                                  "bypass_over_sampled"))
        assert _finite(probe["spread"]) and probe["spread"] >= 0 and len(probe["cases"]) == 2
    assert "probe" not in rows["unet"]
    # issue #11's rows keep the demo config they were measured on (before #24)
    assert rows["new"]["config"]["decoder_anatomy"] == "planning" and rows["new"]["config"]["latent_dropout"] == 0.5
    assert rows["new"]["config"]["residual_latent"] is False and rows["new"]["config"]["vae_channels"] == [8, 16, 32]
    text = merged.with_suffix(".md").read_text()
    assert "| new |" in text and "Latent probe" in text and "| d24-new |" in text.split("Latent probe")[1]
    # --replay re-trains a recorded row for its steps: the same model, so the same numbers
    replayed = tmp_path / "r.json"
    assert mod.main(["--replay", str(b), "--cases", "8", "--samples", "2", "--data", str(data),
                     "--out", str(replayed)]) == 0
    (row,) = json.loads(replayed.read_text())["rows"]
    assert row["unet"]["steps"] == rows["unet"]["unet"]["steps"]
    assert row["heldout"] == rows["unet"]["heldout"] == row["replayed_from"]["heldout"]


def test_ablation_variants_name_the_configs_they_claim():
    """d24-new is configs/demo.yaml as shipped, d24-before and issue #11's 'new' the demo before
    #24 (99ac9f2), and every variant passes the checkpoint loader's config check."""
    from addiff_core.config import load_model_config, model_config_from_dict

    mod = _load("ablation")
    demo = load_model_config(mod.common.DEMO_CONFIG)
    assert mod.variant_config("d24-new") == demo
    before = model_config_from_dict({**demo.to_dict(), "decoder_anatomy": "planning", "residual_latent": False,
                                     "latent_dropout": 0.5, "timestep_bias": 1.0, "dose_l1_weight": 0.0,
                                     "vae_channels": [8, 16, 32], "unet_channels": [16, 32],
                                     "attention_levels": [False, True]})
    assert mod.variant_config("d24-before") == mod.variant_config("new") == before
    for name in mod.VARIANTS:
        assert mod.variant_config(name).kind in ("diffusion", "unet")


def test_predict_bench_smoke(tmp_path):
    """bench/predict_bench.py: every setting times every phase of the predict path, scores its
    predictions, and the cold runs go through the command line (one case and a folder)."""
    mod = _load("predict_bench")
    mod.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    data = json.loads((tmp_path / "predict_bench.json").read_text())
    assert (tmp_path / "predict_bench.md").read_text().startswith("# Predict bench (smoke)")
    assert data["smoke"] is True and data["bench"] == "predict_bench"
    _check_machine(data["machine"], "cpu")
    kinds = [s["kind"] for s in data["settings"]]
    assert kinds == ["diffusion", "diffusion", "unet"] and [s["steps"] for s in data["settings"]] == [1, 2, None]
    for s in data["settings"]:
        assert len(s["cases"]) == 2 and all(_positive(c["total"]) for c in s["cases"])
        for c in s["cases"]:  # the phases add up to the whole path
            assert c["total"] == pytest.approx(sum(c[p] for p in mod.PHASES))
            assert all(_positive(c[p]) for p in ("check", "read", "preprocess", "model", "write"))
        assert _finite(s["dose_score"]) and _finite(s["dvh_score"])
    assert all(_positive(s["cases"][0]["decode"]) for s in data["settings"] if s["kind"] == "diffusion")
    assert list(data["cold"]) == ["diffusion"]  # the smoke run times one model's cold start
    for cold in data["cold"].values():
        assert all(_positive(cold[k]) for k in ("predict_case_with_load", "cli_one_case", "cli_folder"))
    assert _positive(data["summary"]["ratio_addiff_to_unet"])


def test_uncertainty_seeds_summary_and_table():
    """bench/uncertainty_seeds.py: the summary per model and seed (a deterministic model has no
    uncertainty columns, only its target level) and the per-patient table."""
    mod = _load("uncertainty_seeds")
    row = lambda rho, cal, pred: {"spearman": rho, "calibration_2std": cal,  # noqa: E731
                                  "primary_level_pred": pred, "primary_level_ref": 1.0}
    doc = {"patients": ["p1", "p2"],
           "results": {"adiff": {"0": [row(0.2, 0.5, 0.9), row(0.6, 0.1, 1.2)]},
                       "unet": {"0": [row(None, None, 1.0), row(None, None, 0.7)]}}}
    (adiff, unet) = mod.summary_rows(doc["results"])
    assert adiff[:3] == ["adiff", "0", 2] and adiff[3] == pytest.approx(0.4) and adiff[4:6] == [0.2, 0.6]
    assert adiff[6] == pytest.approx(30.0) and adiff[7] == pytest.approx(0.15)
    assert unet[3:7] == ["-"] * 4 and unet[7] == pytest.approx(0.15)
    text = mod.render(doc)
    assert "adiff rho" in text and "unet rho" not in text and "unet target mean / Rx" in text


def test_target_falloff_bins_by_distance_from_the_central_slice():
    import numpy as np

    tf = _load("target_falloff")
    targets = np.zeros((11, 2, 2))
    targets[1:10, 0, 0] = 1  # slices 1..9: central slice 5; at 5 mm, distances 0, 5, ..., 20 mm
    bins = tf.distance_bins(targets, slice_mm=5.0, edges_mm=(0.0, 10.0, 20.0, float("inf")))
    assert bins[5, 0, 0] == 0 and bins[4, 0, 0] == 0 and bins[6, 0, 0] == 0  # 0 and 5 mm: [0, 10)
    assert bins[3, 0, 0] == 1 and bins[2, 0, 0] == 1 and bins[8, 0, 0] == 1  # 10 and 15 mm: [10, 20)
    assert bins[1, 0, 0] == 2 and bins[9, 0, 0] == 2  # 20 mm
    assert (bins[:, 1, :] == -1).all() and bins[0, 0, 0] == -1 and bins[10, 0, 0] == -1  # outside the targets
    assert (tf.distance_bins(np.zeros((3, 2, 2)), 5.0) == -1).all()  # no target: nothing binned

    pred = np.where(targets > 0, np.arange(11.0)[:, None, None], 0.0)  # error = the slice index inside
    err, n = tf.binned_sum(bins, 3, pred - np.zeros_like(targets)), tf.binned_sum(bins, 3)
    assert n.tolist() == [3, 4, 2] and err.tolist() == [4 + 5 + 6, 2 + 3 + 7 + 8, 1 + 9]
