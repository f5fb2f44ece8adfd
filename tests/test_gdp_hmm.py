"""`addiff data import-gdp-hmm` (issue #30) on generated data in exactly the challenge's layout
(tests/helpers/gdp_hmm.py), and the challenge's MAE against a transcription of its evaluation code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from addiff_core.case_io import load_case, read_plan
from addiff_core.checks import check_dataset
from addiff_core.cli import main
from addiff_core.config import load_site_config
from addiff_core.gdp_hmm.importer import import_gdp_hmm
from addiff_core.gdp_hmm.metric import METRIC_KEY, case_challenge_metrics, challenge_mae
from addiff_core.gdp_hmm.safe_npz import load_plan_dict
from helpers.gdp_hmm import DOSE_SCALE, IMRT_ANGLES, PLANS, PTV_DICT, replace_plan, write_dataset

HNC_IMRT, HNC_VMAT, LUNG_VALID = PLANS[0][0], PLANS[1][0], PLANS[2][0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    base = tmp_path_factory.mktemp("gdp")
    src = write_dataset(base / "src")
    summary = import_gdp_hmm(src, base / "out", progress=False)
    return src, base / "out", summary


def leaderboard_mae(data_dict: dict, ptv_dict: dict, plan_file_name: str, PTVHighname: str, prediction) -> float:
    """The challenge's evaluation.ipynb, "MAE for a batch of data (Metric 1 on challenge
    leaderboard)" cell, body of its loop, transcribed (names kept) for one plan."""
    patient_id = plan_file_name.split('+')[0]
    scale_dose_Dict = ptv_dict
    ref_dose = data_dict['dose'] * data_dict['dose_scale']
    ptv_highdose = scale_dose_Dict[patient_id]['PTV_High']['PDose']
    norm_scale = ptv_highdose / (np.percentile(ref_dose[data_dict[PTVHighname].astype('bool')], 3) + 1e-5)
    ref_dose = ref_dose * norm_scale
    isodose_5Gy_mask = ((ref_dose > 5) | (prediction > 5)) & (data_dict['Body'] > 0)
    isodose_ref_5Gy_mask = (ref_dose > 5) & (data_dict['Body'] > 0)
    diff = ref_dose - prediction
    error = np.sum(np.abs(diff)[isodose_5Gy_mask > 0]) / np.sum(isodose_ref_5Gy_mask)
    return error


# ------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------
def test_one_site_file_per_cohort_that_loads_and_checks(imported):
    src, out, summary = imported
    assert not summary.skipped
    assert sorted(p.name for p in summary.site_files) == ["cohort1.yaml", "cohort2.yaml"]
    for f in summary.site_files:
        site = load_site_config(f)
        cases = sorted(p.name for p in site.data_dir.iterdir())
        want = sorted(p[0] for p in PLANS if f"cohort{p[3]}" == site.name)
        assert cases == want
        # held-out: meta_data.csv's valid plans
        assert list(site.heldout.case_ids) == [p[0] for p in PLANS if f"cohort{p[3]}" == site.name and p[5] == "valid"]
        n, problems = check_dataset(site.data_dir)
        assert n == 3 and problems == []


def test_a_case_keeps_geometry_masks_plan_and_isocenter(imported):
    src, out, _ = imported
    case = load_case(out / "cohort1" / "cases" / HNC_IMRT, require_dose=True)
    raw = load_plan_dict(src / "data" / f"{HNC_IMRT}.npz")
    assert case.ct.GetSpacing() == pytest.approx((2.5, 2.5, 2.0))  # DICOM2NPZ.py img_spac
    assert case.ct.GetOrigin() == pytest.approx(raw["origin"])
    assert np.array_equal(sitk.GetArrayFromImage(case.ct), raw["img"])
    # OAR channels by the project's names; PRVs, combined organs and cut-outs kept by their own
    assert {"Brainstem", "SpinalCord", "Larynx", "Esophagus", "Body"} <= set(case.masks)
    assert {"BrainStem_03", "SpinalCord_05", "Parotids", "Larynx-PTV", "PTV70", "PTV56OPT"} <= set(case.masks)
    assert np.array_equal(case.array("Brainstem"), raw["BrainStem"] > 0)
    plan = case.plan
    assert plan.tumour_site == "head_neck" and plan.technique == "IMRT"
    assert plan.prescriptions == {"PTV70OPT": 70.0, "PTV56": 56.0}  # PDose; High on its OPTName (data_loader.py)
    assert [b.gantry for b in plan.beams] == pytest.approx(IMRT_ANGLES.tolist())
    info = yaml.safe_load((case.path / "gdp_hmm.yaml").read_text())
    assert info["isocenter_voxel_zyx"] == pytest.approx([float(v) for v in raw["isocenter"]])
    iso = case.ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in raw["isocenter"][::-1]])
    assert info["isocenter_mm_xyz"] == pytest.approx(list(iso))
    assert info["normalisation"]["structure"] == "PTV70OPT" and info["dose_scale"] == DOSE_SCALE


def test_vmat_plan_is_one_arc_over_its_control_points(imported):
    _, out, _ = imported
    plan = read_plan(out / "cohort1" / "cases" / HNC_VMAT)
    assert plan.technique == "VMAT" and len(plan.beams) == 1
    arc = plan.beams[0]
    assert (arc.gantry, arc.gantry_stop) == (181.0, 173.0)  # 181, 185, ..., 173: the gap is 173 -> 181


def test_dose_in_gy_normalised_as_the_challenge_or_raw(imported, tmp_path):
    src, out, _ = imported
    raw = load_plan_dict(src / "data" / f"{LUNG_VALID}.npz")
    case = load_case(out / "cohort1" / "cases" / LUNG_VALID, require_dose=True)
    gy = raw["dose"] * raw["dose_scale"]
    scale = 50 / (np.percentile(gy[raw["PTV"].astype(bool)], 3) + 1e-5)  # lung: the leaderboard's 'PTV'
    np.testing.assert_allclose(case.array("dose"), gy * scale, rtol=1e-6, atol=1e-4)
    assert case.plan.prescriptions == {"PTV": 50.0} and case.plan.tumour_site == "lung"
    summary = import_gdp_hmm(src, tmp_path / "raw", normalise_d97=False, progress=False)
    assert not summary.skipped
    raw_case = load_case(tmp_path / "raw" / "cohort1" / "cases" / LUNG_VALID, require_dose=True)
    np.testing.assert_allclose(raw_case.array("dose"), gy, rtol=1e-6, atol=1e-4)


def test_sites_by_tumour_site_and_cli(imported, tmp_path, capsys):
    src, _, _ = imported
    assert main(["data", "import-gdp-hmm", str(src), str(tmp_path / "o"), "--sites-by", "site"]) == 0
    printed = capsys.readouterr().out
    assert "imported 6 GDP-HMM plan(s) into 2 site(s)" in printed
    assert sorted(p.name for p in (tmp_path / "o").glob("*.yaml")) == ["head_neck.yaml", "lung.yaml"]
    lung = load_site_config(tmp_path / "o" / "lung.yaml")
    assert all(read_plan(c).tumour_site == "lung" for c in lung.data_dir.iterdir())


# ------------------------------------------------------------------------------------------
# bad inputs: one line each
# ------------------------------------------------------------------------------------------
BAD = {
    "missing key": (dict(Body=None), r"missing key 'Body' in arr_0"),
    "PTV in the dict, absent": (dict(PTV56OPT=None), r"PTV_DICT.json names PTV56OPT \(PTV_Low of patient HNC_001\) "
                                                     r"but the npz has no such mask"),
    "dose without dose_scale": (dict(dose_scale=None), r"dose without dose_scale"),
    "not a dict": (None, r"arr_0 is a uint8 array"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_a_bad_plan_is_skipped_with_one_line_and_the_others_imported(tmp_path, capsys, what):
    changes, pattern = BAD[what]
    src = write_dataset(tmp_path / "src")
    if changes is None:
        np.savez_compressed(src / "data" / f"{HNC_IMRT}.npz", np.zeros((2, 2), np.uint8))
    else:
        replace_plan(src, HNC_IMRT, **changes)
    code = main(["data", "import-gdp-hmm", str(src), str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 1
    line = next(ln for ln in printed.splitlines() if ln.strip().startswith(HNC_IMRT))
    assert __import__("re").search(pattern, line), printed
    assert "skipped 1" in printed and "imported 5" in printed
    assert not (tmp_path / "out" / "cohort1" / "cases" / HNC_IMRT).exists()


def test_plans_not_in_meta_or_twice_are_skipped_with_their_reason(tmp_path):
    src = write_dataset(tmp_path / "src")
    (src / "data" / "extra").mkdir()
    (src / "data" / "extra" / f"{HNC_IMRT}.npz").write_bytes((src / "data" / f"{HNC_IMRT}.npz").read_bytes())
    (src / "data" / "unlisted+x+y.npz").write_bytes((src / "data" / f"{HNC_IMRT}.npz").read_bytes())
    summary = import_gdp_hmm(src, tmp_path / "out", progress=False)
    assert sorted(summary.skipped) == [(HNC_IMRT, "a second file of this plan (extra/); the first kept"),
                                       ("unlisted+x+y", "not listed in meta_data.csv")]
    assert sum(len(v) for v in summary.imported.values()) == len(PLANS)


def test_bad_side_files_are_one_line(tmp_path, capsys):
    src = write_dataset(tmp_path / "src")
    (src / "meta_files" / "PTV_DICT.json").write_text("{not json")
    assert main(["data", "import-gdp-hmm", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PTV_DICT.json: not JSON" in err
    (src / "meta_files" / "PTV_DICT.json").unlink()
    assert main(["data", "import-gdp-hmm", str(src), str(tmp_path / "out")]) == 2
    assert "no PTV_DICT.json beside the plans" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cohort1.yaml").write_text("name: mine\n")
    (src / "meta_files" / "PTV_DICT.json").write_text(json.dumps(PTV_DICT))
    assert main(["data", "import-gdp-hmm", str(src), str(tmp_path / "out")]) == 2
    assert "was not written by data import-gdp-hmm; kept" in capsys.readouterr().err
    assert (tmp_path / "out" / "cohort1.yaml").read_text() == "name: mine\n"


# ------------------------------------------------------------------------------------------
# the challenge's MAE
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_equals_the_transcribed_leaderboard_code(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 14, 16)
    body = (rng.random(shape) > 0.2).astype(np.uint8)
    ptv = np.zeros(shape, np.uint8)
    ptv[4:8, 5:9, 6:10] = 1
    data = {"dose": rng.integers(0, 300_000, shape).astype(np.uint32), "dose_scale": 2.3e-4, "Body": body,
            "PTVHighOPT": ptv}
    pred = rng.random(shape) * 80
    ptv_dict = {"P1": {"PTV_High": {"OPTName": "PTVHighOPT", "PDose": 70}}}
    want = leaderboard_mae(data, ptv_dict, "P1+x+y", "PTVHighOPT", pred)
    got = challenge_mae(pred, data["dose"] * data["dose_scale"], body, ptv, 70)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert challenge_mae(pred, data["dose"] * 0.0, body) != challenge_mae(pred, data["dose"] * 0.0, body)  # nan


def test_metric_of_an_imported_case_is_the_leaderboard_value_of_its_npz(imported):
    src, out, _ = imported
    for plan, _, site, cohort, _, _ in PLANS[:3]:
        case = load_case(out / f"cohort{cohort}" / "cases" / plan, require_dose=True)
        raw = load_plan_dict(src / "data" / f"{plan}.npz")
        name = "PTV" if site == 2 else ("PTVHighOPT" if "PTVHighOPT" in raw else "PTV70OPT")
        pred = np.random.default_rng(3).random(case.array("dose").shape) * 60
        got = case_challenge_metrics(case, pred.astype(np.float32))
        want = leaderboard_mae(raw, PTV_DICT, plan, name, pred.astype(np.float32))
        assert got[METRIC_KEY] == pytest.approx(want, rel=1e-5)
        assert case_challenge_metrics(case, case.array("dose"))[METRIC_KEY] == pytest.approx(0.0, abs=1e-3)


def test_other_cases_get_no_challenge_metric(make_case, tmp_path):
    case = load_case(make_case(tmp_path), require_dose=True)
    assert case_challenge_metrics(case, case.array("dose")) == {}
