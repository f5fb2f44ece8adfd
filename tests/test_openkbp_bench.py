"""bench/openkbp_bench.py: the spacing split, the held-out draw, the skip message, --methods / --scale, the
uncertainty numbers, the latent probe table and --render-only (fast; no training)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_openkbp_bench", BENCH / "openkbp_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


def _spacings():
    # 24 patients, in-plane spacing (row, col, slice); several ties at 3.906 mm
    sp = {f"pt_{i}": (3.0 + 0.1 * (i % 12), 3.0 + 0.1 * (i % 12), 2.5) for i in range(1, 25)}
    for pid in ("pt_3", "pt_30", "pt_100", "pt_20"):
        sp[pid] = (3.906, 3.906, 3.0)
    return sp


def test_split_sorted_by_spacing_in_thirds(bench):
    sp = _spacings()
    groups = bench.split_by_spacing(sp, 3)
    sizes = [len(g) for g in groups]
    assert sum(sizes) == len(sp) == 26 and max(sizes) - min(sizes) <= 1
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(sp)  # every patient exactly once
    key = [bench.in_plane_spacing(sp[p]) for p in flat]
    assert key == sorted(key)  # finest spacing first, contiguous cuts
    assert max(bench.in_plane_spacing(sp[p]) for p in groups[0]) <= min(bench.in_plane_spacing(sp[p]) for p in groups[1])
    ties = [p for p in flat if bench.in_plane_spacing(sp[p]) == 3.906]
    assert ties == ["pt_3", "pt_20", "pt_30", "pt_100"]  # ties broken by patient number, not text


def test_split_24_gives_three_sites_of_8(bench):
    sp = {f"pt_{i}": (2.5 + 0.1 * i, 2.5 + 0.1 * i, 2.5) for i in range(24)}
    groups = bench.split_by_spacing(sp, 3)
    assert [len(g) for g in groups] == [8, 8, 8]
    assert groups[0] == [f"pt_{i}" for i in range(8)]
    with pytest.raises(ValueError):
        bench.split_by_spacing({"pt_1": (1, 1, 1)}, 3)


def test_heldout_deterministic_and_disjoint(bench):
    sp = {f"pt_{i}": (2.5 + 0.1 * i, 2.5 + 0.1 * i, 2.5) for i in range(24)}
    split = bench.make_split(sp)
    again = bench.make_split(dict(reversed(list(sp.items()))))  # order of the input does not matter
    assert split == again
    assert [s["site"] for s in split] == list(bench.SITE_NAMES)
    for s in split:
        assert len(s["patients"]) == 8 and len(s["heldout"]) == bench.N_HELDOUT == 2
        assert set(s["heldout"]) <= set(s["patients"])
        assert set(s["train"]) == set(s["patients"]) - set(s["heldout"]) and len(s["train"]) == 6
    held = [p for s in split for p in s["heldout"]]
    assert len(set(held)) == 6
    assert bench.choose_heldout(split[0]["patients"], 2, seed=0, site_index=0) == split[0]["heldout"]
    with pytest.raises(ValueError):
        bench.choose_heldout(["pt_1", "pt_2"], 2)  # nothing left to train on


def test_split_of_the_real_sample(bench, openkbp_dir):
    patients = bench.find_patients(openkbp_dir)
    split = bench.make_split(bench.read_spacings(patients))
    assert [len(s["patients"]) for s in split] == [8, 8, 8]
    maxes = [max(s["in_plane_spacing_mm"].values()) for s in split]
    mins = [min(s["in_plane_spacing_mm"].values()) for s in split]
    assert maxes[0] <= mins[1] and maxes[1] <= mins[2]


def test_missing_sample_skips_with_a_clear_message(bench, tmp_path, capsys):
    missing = tmp_path / "no-such-openkbp-sample"
    rc = bench.main(["--sample", str(missing), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"OpenKBP sample not found at {missing}; skipping" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # nothing written


def test_split_84_gives_three_sites_of_28_with_5_held_out(bench):
    # 84 patients as with the extra pool: ids and spacings shaped like the real ones (many ties)
    sp = {f"pt_{i}": (3.5 + 0.1 * (i % 7), 3.5 + 0.1 * (i % 7), 2.5 if i % 3 else 3.0) for i in range(1, 200, 2)}
    sp = dict(list(sp.items())[:84])
    split = bench.make_split(sp, n_heldout=bench.HELDOUT_WITH_EXTRA)
    assert split == bench.make_split(dict(reversed(list(sp.items()))), n_heldout=5)  # deterministic
    assert [len(s["patients"]) for s in split] == [28, 28, 28]
    assert [len(s["heldout"]) for s in split] == [5, 5, 5] and [len(s["train"]) for s in split] == [23, 23, 23]
    held = [p for s in split for p in s["heldout"]]
    assert len(set(held)) == 15
    for a, b in zip(split, split[1:]):
        assert max(a["in_plane_spacing_mm"].values()) <= min(b["in_plane_spacing_mm"].values())
    for k, s in enumerate(split):
        assert s["heldout"] == bench.choose_heldout(s["patients"], 5, seed=bench.SPLIT_SEED, site_index=k)


def test_extra_archive_is_unpacked_once_and_its_patients_found(bench, tmp_path):
    import tarfile

    src = tmp_path / "src" / "okbp-train"
    for pid in ("pt_5", "pt_16"):
        (src / pid).mkdir(parents=True)
        (src / pid / "ct.csv").write_text(",data\n")
    (src / "README.md").write_text("not a patient")
    archive = tmp_path / "pool.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(src, arcname="okbp-train")
    work = tmp_path / "work"
    folder = bench.resolve_extra(archive, work)
    assert folder == work / "extra"
    found = bench.find_extra_patients(folder)
    assert list(found) == ["pt_5", "pt_16"] and found["pt_5"] == folder / "okbp-train" / "pt_5"
    (folder / "okbp-train" / "pt_5" / "marker").write_text("kept")  # a second call reuses the unpacked folder
    assert bench.resolve_extra(archive, work) == folder and (folder / "okbp-train" / "pt_5" / "marker").exists()
    assert bench.resolve_extra(src.parent, work) == src.parent  # an unpacked folder is read as it is
    assert bench.resolve_extra("none", work) is None
    with pytest.raises(FileNotFoundError):
        bench.resolve_extra(tmp_path / "missing.tar.xz", work)


# --------------------------------------------------------------------------------------------
# issue #24: --methods, --scale, the +-2 std calibration, the latent probe table, --render-only
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(bench):  # noqa: ARG001 - bench puts bench/ on sys.path
    import openkbp_report

    return openkbp_report


def test_scale_epochs_rounds_half_up_and_keeps_one(bench):
    assert [bench.scale_epochs(3, k) for k in (1, 3, 0.5, 0.1, 1.5)] == [3, 9, 2, 1, 5]
    assert bench.scale_epochs(2, 1.25) == 3  # 2.5 -> 3 (half up, not to even)
    assert bench.scale_epochs(1, 0.49) == 1  # never below one epoch
    b = bench.scaled_budget("default", 3)
    base = bench.DEFAULT_EPOCHS
    assert (b["vae_epochs"], b["diffusion_epochs"], b["unet_epochs"]) == (3 * base["vae"], 3 * base["diffusion"],
                                                                        3 * base["unet"])
    assert b["base_epochs"] == base and b["scale"] == 3.0 and b["name"] == "default"
    one = bench.scaled_budget("default", 1)
    assert "base_epochs" not in one and one["vae_epochs"] == base["vae"]
    assert bench.BUDGETS["default"]["vae_epochs"] == base["vae"]  # the table is not changed by scaling
    assert one["uncertainty_samples"] == 8 and one["set_from_step_cpu_seconds"] == bench.DEFAULT_SET_FROM_STEP_CPU_SECONDS


def test_results_file_and_run_folder_names(bench):
    assert bench.results_stem(1) == "openkbp_bench" and bench.results_stem(1.0) == "openkbp_bench"
    assert bench.results_stem(3) == "openkbp_bench_x3" and bench.results_stem(0.5) == "openkbp_bench_x0.5"
    assert bench.scale_suffix(1) == "" and bench.scale_suffix(2.5) == "_x2.5"
    # a second training seed never overwrites the first's files
    assert bench.results_stem(3, 1) == "openkbp_bench_x3_seed1" and bench.results_stem(1, 2) == "openkbp_bench_seed2"
    assert bench.results_stem(3, 0) == "openkbp_bench_x3"


def test_methods_option(bench):
    assert bench.parse_methods(None) == list(bench.METHODS) == ["federated_addiff", "federated_unet", "local_addiff",
                                                                 "pooled_addiff"]
    assert bench.parse_methods(" pooled_addiff,federated_unet ") == ["federated_unet", "pooled_addiff"]  # bench order
    for bad in ("federated", "federated_unet,nope", ","):
        with pytest.raises(ValueError, match="--methods"):
            bench.parse_methods(bad)


@pytest.mark.parametrize("opts, message", [(["--scale", "0"], "--scale must be > 0"),
                                           (["--scale", "nan"], "--scale must be > 0"),
                                           (["--scale", "1000"], "--scale must be > 0"),
                                           (["--methods", "unet"], "--methods: unknown unet")])
def test_bad_options_are_one_line_before_any_work(bench, tmp_path, capsys, opts, message):
    rc = bench.main(["--sample", str(tmp_path / "none"), "--work", str(tmp_path / "w"), *opts])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"openkbp_bench: {message}") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_uncertainty_in_mask_spearman_and_calibration(bench):
    import numpy as np

    from openkbp_tasks import uncertainty_in_mask

    rng = np.random.default_rng(0)
    ref = rng.random((4, 5, 6)) * 60
    err = rng.random(ref.shape) + 0.1
    mean = ref + err
    mask = np.zeros(ref.shape, bool)
    mask[1:3] = True
    u = uncertainty_in_mask(mean, err, ref, mask)  # std = |error|: ranks agree, every voxel within 2 std
    assert u["spearman"] == pytest.approx(1.0) and u["calibration_2std"] == 1.0
    assert u["mean_std_gy"] == pytest.approx(err[mask].mean())
    std = np.where(np.arange(err.size).reshape(err.shape) % 4 == 0, err, err / 4)  # 1 voxel in 4 within 2 std
    assert uncertainty_in_mask(mean, std, ref, mask)["calibration_2std"] == pytest.approx(
        np.mean((np.abs(mean - ref) <= 2 * std)[mask]))
    assert uncertainty_in_mask(mean, std, ref, mask)["calibration_2std"] == pytest.approx(0.25, abs=0.05)
    flat = uncertainty_in_mask(mean, np.zeros_like(err), ref, mask)  # a constant std map
    assert flat["spearman"] is None and flat["calibration_2std"] == 0.0
    empty = uncertainty_in_mask(mean, err, ref, np.zeros(ref.shape, bool))
    assert empty == {"spearman": None, "calibration_2std": None, "mean_std_gy": None}


def test_summarize_uncertainty_per_site_and_overall(report):
    rows = [{"site": "a", "case_id": "p1", "spearman": 0.2, "calibration_2std": 0.5, "mean_std_gy": 1.0,
             "mean_prediction_dose_score": 4.0, "mean_prediction_dvh_errors": {"x": 1.0}},
            {"site": "a", "case_id": "p2", "spearman": None, "calibration_2std": 0.7, "mean_std_gy": 2.0,
             "mean_prediction_dose_score": 6.0, "mean_prediction_dvh_errors": {}},
            {"site": "b", "case_id": "p3", "spearman": 0.8, "calibration_2std": None, "mean_std_gy": 3.0,
             "mean_prediction_dose_score": 8.0, "mean_prediction_dvh_errors": {}}]
    u = report.summarize_uncertainty(rows)
    assert u["per_site"]["a"]["spearman_mean"] == pytest.approx(0.2)  # the undefined one left out
    assert u["per_site"]["a"]["calibration_mean"] == pytest.approx(0.6)
    assert u["per_site"]["b"]["calibration_mean"] is None and u["per_site"]["b"]["n"] == 1
    assert u["spearman_mean"] == pytest.approx(0.5) and u["calibration_mean"] == pytest.approx(0.6)
    assert (u["calibration_min"], u["calibration_max"]) == (0.5, 0.7) and (u["n"], u["n_defined"]) == (3, 2)
    assert all("mean_prediction_dvh_errors" not in c for c in u["cases"])


def _probe(sampled: float, zero: float, oracle: float, shuffled: float, n: int = 2, normalised: float | None = None
           ) -> dict:
    out = {"sampled": sampled, "zero": zero, "oracle": oracle, "shuffled": shuffled, "spread": 1.5e-5,
           "mean_of_samples": sampled, "oracle_over_sampled": oracle / sampled,
           "bypass_over_sampled": min(zero, shuffled) / sampled, "n": n}
    if normalised is not None:
        out["bypass_over_sampled_plan_normalised"] = normalised
    return out


def test_probe_table_from_a_fake_result(report):
    res = {"methods": {
        "federated_addiff": {"latent_probe": {"samples": 4, "steps": 2, "overall": _probe(0.04, 0.12, 0.01, 0.06, 4),
                                              "per_site": {"openkbp_a": _probe(0.05, 0.1, 0.01, 0.07),
                                                           "openkbp_b": _probe(0.03, 0.14, 0.01, 0.05,
                                                                               normalised=2.125)}}},
        "federated_unet": {"overall": {}},
        "pooled_addiff": {"latent_probe": {"error": "child task latent_probe exited with status 1"}}}}
    lines = report.probe_table(res)
    text = "\n".join(lines)
    assert lines[0] == "## Does the diffusion decide? (latent probe)"
    assert "| federated ADDiff-Dose | openkbp_a (2) | 0.0500 | 0.1000 | 0.0100 | 0.0700 | 1.5e-05 | 0.20 | 1.40 | n/a |" in text
    assert "| federated ADDiff-Dose | openkbp_b (2) | 0.0300 | 0.1400 | 0.0100 | 0.0500 | 1.5e-05 | 0.33 | 1.67 | 2.12 |" in text
    assert "| federated ADDiff-Dose | **all (4)** | 0.0400 | 0.1200 | 0.0100 | 0.0600 | 1.5e-05 | 0.25 | 1.50 | n/a |" in text
    assert "| pooled (ADDiff-Dose) | failed: child task latent_probe exited with status 1 |" in text
    assert "U-Net" not in text and "4 samples" in text and "2 DDIM steps" in text
    widths = {ln.count("|") - ln.count("\\|") for ln in lines if ln.startswith("|")}
    assert widths == {11}  # every row has the header's 10 cells
    assert report.probe_table({"methods": {"federated_unet": {"overall": {}}}}) == []


def _fake_result(scale: float, dose: float, work: Path) -> dict:
    split = [{"site": s, "patients": ["p1", "p2", "p3"], "heldout": ["p3"], "train": ["p1", "p2"],
              "in_plane_spacing_mm": {"p1": 3.0, "p2": 3.5, "p3": 4.0}, "slice_spacing_mm": {"p1": 2.5, "p2": 2.5,
                                                                                            "p3": 3.0}}
             for s in ("openkbp_a", "openkbp_b")]
    site = {"n_heldout": 1, "openkbp_dose_score": dose, "openkbp_dvh_score": dose + 1, "gamma_pass_rate": 50.0,
            "mean_isodose_dice": 0.5}
    unc = {"cases": [{}], "samples": 8, "spearman_mean": 0.41, "calibration_mean": 0.125, "n": 2, "n_defined": 2,
           "spearman_min": 0.3, "spearman_max": 0.5, "calibration_min": 0.1, "calibration_max": 0.15,
           "mean_std_gy": 0.5, "mean_prediction_dose_score": dose,
           "per_site": {s["site"]: {"spearman_mean": 0.41, "calibration_mean": 0.125} for s in split}}
    fed = {"per_site": {s["site"]: dict(site) for s in split}, "overall": dict(site), "uncertainty": unc,
           "cpu_seconds": {"simulate_total": 60.0}, "seconds": {"simulate_total": 90.0},
           "latent_probe": {"samples": 4, "steps": 2, "overall": _probe(0.04, 0.12, 0.01, 0.06),
                            "per_site": {"openkbp_a": _probe(0.04, 0.12, 0.01, 0.06, 1)}}}
    return {"bench": "openkbp_bench", "complete": True, "methods_run": ["federated_addiff"],
            "budget": {"name": "small", "scale": scale, "vae_epochs": max(1, round(scale)), "diffusion_epochs": 1,
                       "unet_epochs": 2, "local_epochs": 1, "batch_size": 1, "text": "a budget",
                       "uncertainty_samples": 8},
            "data": {"patients": 6, "sample": "S", "sample_patients": 6, "extra_patients": 0},
            "heldout_per_site": 1, "split": split, "model": {"kind": "diffusion", "grid": {"size": 32,
                                                                                          "spacing": [10, 10, 10]}},
            "methods": {"federated_addiff": fed}, "machine": {"cpu_model": "cpu"}, "wall_seconds": 60.0,
            "work": str(work)}


def test_render_only_rewrites_the_scaled_file_with_probe_calibration_and_curve(bench, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    out.mkdir()
    (out / "openkbp_bench.json").write_text(json.dumps(_fake_result(1.0, 9.0, tmp_path)))
    (out / "openkbp_bench_x3.json").write_text(json.dumps(_fake_result(3.0, 7.5, tmp_path)))
    rc = bench.main(["--budget", "small", "--render-only", "--scale", "3", "--out", str(out), "--work", str(tmp_path)])
    assert rc == 0 and "rewritten" in capsys.readouterr().out
    assert not (out / "openkbp_bench.md").exists()  # the bench budget's files are left alone
    md = (out / "openkbp_bench_x3.md").read_text()
    assert md.startswith("# OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget `small`, epochs x 3)")
    assert "| federated ADDiff-Dose | 7.50 | 8.50 | 50.0 | 0.50 | 0.41 | 12.5 | 1.0 | 1.5 |" in md
    assert "**Per site: uncertainty calibration, in-mask voxels within mean +- 2 std (%)**" in md
    assert "## Does the diffusion decide? (latent probe)" in md
    assert "| x1 | 1 + 1 | 2 | 9.00 / 10.00 |" in md and "| x3 | 3 + 1 | 2 | 7.50 / 8.50 |" in md  # learning curve
    assert json.loads((out / "openkbp_bench_x3.json").read_text())["rendered_again"]
    assert bench.main(["--budget", "small", "--render-only", "--scale", "2", "--out", str(out)]) == 2  # no such file


def test_a_run_with_other_methods_keeps_the_earlier_results(bench, report, tmp_path):
    import json

    path = tmp_path / "openkbp_bench.json"
    earlier = _fake_result(1.0, 9.0, tmp_path)
    now = {k: earlier[k] for k in ("budget", "split", "model")}
    assert bench.carried_over_methods(path, now, ["federated_unet"]) == {}  # no earlier file
    earlier["budget"]["planned_cpu"] = {"unet_s": 4.5}  # measured by each run: not part of the comparison
    path.write_text(json.dumps(earlier))
    kept = bench.carried_over_methods(path, now, ["federated_unet"])
    assert list(kept) == ["federated_addiff"]
    assert kept["federated_addiff"]["overall"] == earlier["methods"]["federated_addiff"]["overall"]
    assert kept["federated_addiff"]["carried_over_from"]["methods_run"] == ["federated_addiff"]
    assert bench.carried_over_methods(path, now, ["federated_addiff"]) == {}  # re-run: replaced
    other = {**now, "budget": _fake_result(3.0, 9.0, tmp_path)["budget"]}
    assert bench.carried_over_methods(path, other, ["federated_unet"]) == {}  # another budget: replaced
    path.write_text(json.dumps({**earlier, "failed": ["federated_addiff"]}))
    assert bench.carried_over_methods(path, now, ["federated_unet"]) == {}  # a failed method is not kept
    path.write_text("{not json")
    assert bench.carried_over_methods(path, now, ["federated_unet"]) == {}
    md = report.markdown({**earlier, "carried_over": ["federated_addiff"]}, [])
    assert "Kept from an earlier run with the same budget, split and model" in md


def test_results_written_before_issue_24_still_render(report):
    import json

    old = BENCH / "results" / "openkbp_bench.json"
    if not old.is_file():
        pytest.skip("no committed OpenKBP results")
    res = json.loads(old.read_text())
    md = report.markdown(res)
    assert "## Held-out results" in md and "## Caveats" in md
