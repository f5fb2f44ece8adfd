"""addiff_core.regions: the one rule for the evaluation region (possible-dose mask > body > CT >
-500 HU), and that every prediction written or scored is zero outside it (issue #11)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers.metrics import readme_dose_score  # noqa: E402  (tests/ is on sys.path under pytest)

from addiff_core.case_io import Beam, Case, Plan, load_case
from addiff_core.config import GridConfig, ModelConfig
from addiff_core.regions import BODY_HU_THRESHOLD, body_structure, evaluation_region, region_array, zero_outside

SHAPE = (4, 5, 6)  # (z, y, x)
SPACING = (2.0, 2.5, 3.0)
ORIGIN = (-7.0, 1.0, 4.5)
GRID = GridConfig(size=16)


def _img(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def _block(z: slice, y: slice, x: slice) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[z, y, x] = 1
    return m


PDM = _block(slice(1, 3), slice(1, 4), slice(1, 5))
BODY = _block(slice(0, 4), slice(0, 5), slice(1, 6))
EXTERNAL = _block(slice(0, 2), slice(0, 5), slice(0, 6))


def _ct() -> np.ndarray:
    ct = np.full(SHAPE, -1000, np.int16)
    ct[:, 2:, :3] = 40           # soft tissue
    ct[0, 0, 0] = -400           # above the threshold: inside
    ct[0, 0, 1] = -500           # exactly at the threshold: outside (CT > -500)
    ct[0, 0, 2] = -600           # below: outside
    return ct


def _case(pdm: np.ndarray | None = None, **masks: np.ndarray) -> Case:
    plan = Plan("head_neck", {"PTV70": 70.0}, 35, "IMRT", (Beam(0.0),), {})
    return Case(case_id="c", path=Path("c"), ct=_img(_ct()), plan=plan,
                masks={k: _img(v) for k, v in masks.items()},
                possible_dose_mask=None if pdm is None else _img(pdm * 255))  # any non-zero value counts


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


@pytest.mark.parametrize("pdm,masks,expected", [
    (PDM, {"Body": BODY, "External": EXTERNAL}, PDM),          # 1. possible-dose mask first
    (None, {"Body": BODY, "External": EXTERNAL}, BODY),        # 2. else Body (case_io.BODY_NAME) ...
    (None, {"External": EXTERNAL, "PTV70": PDM}, EXTERNAL),    #    ... or another body name
    (None, {"PTV70": PDM}, None),                               # 3. else CT > -500 HU
], ids=["possible_dose_mask", "Body", "External", "ct"])
def test_fallback_order(pdm, masks, expected):
    case = _case(pdm, **masks)
    region = evaluation_region(case)
    if expected is None:
        expected = (_ct() > BODY_HU_THRESHOLD).astype(np.uint8)
        assert expected[0, 0, 0] == 1 and expected[0, 0, 1] == 0 and expected[0, 0, 2] == 0
    np.testing.assert_array_equal(_arr(region), expected)
    assert region.GetPixelID() == sitk.sitkUInt8
    assert region.GetSize() == case.ct.GetSize() and region.GetSpacing() == case.ct.GetSpacing()
    assert region.GetOrigin() == case.ct.GetOrigin() and region.GetDirection() == case.ct.GetDirection()
    np.testing.assert_array_equal(region_array(case), expected.astype(bool))


def test_body_structure_name():
    assert body_structure(_case(None, Body=BODY, External=EXTERNAL)) == "Body"
    assert body_structure(_case(None, EXTERNAL=EXTERNAL)) == "EXTERNAL"
    assert body_structure(_case(None, PTV70=PDM)) is None


def test_zero_outside_images_and_arrays():
    dose = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1.0
    out = zero_outside(_img(dose), _img(PDM))
    assert out.GetPixelID() == sitk.sitkFloat32 and out.GetOrigin() == ORIGIN and out.GetSpacing() == SPACING
    np.testing.assert_array_equal(_arr(out), dose * PDM)
    np.testing.assert_array_equal(zero_outside(dose, PDM.astype(bool)), dose * PDM)
    np.testing.assert_array_equal(zero_outside(dose, _img(PDM)), dose * PDM)      # array dose, image region
    np.testing.assert_array_equal(_arr(zero_outside(_img(dose), PDM)), dose * PDM)  # image dose, array region
    with pytest.raises(ValueError, match="does not match"):
        zero_outside(dose, PDM[:2])


# --------------------------------------------------------------------------------------------
# every user of the rule: the model's body tensor, predict, evaluate
# --------------------------------------------------------------------------------------------
def _half_body_pdm(make_case) -> np.ndarray:
    """A possible-dose mask different from the body: the body's upper half (z >= 8)."""
    body = make_case.arrays()["masks"]["Body"].astype(bool)
    pdm = body.copy()
    pdm[:8] = False
    return pdm


def test_sample_body_is_the_region_on_the_model_grid(make_case, tmp_path):
    from addiff_core.preprocessing import case_to_sample

    pdm = _half_body_pdm(make_case)
    case = load_case(make_case(tmp_path, possible_dose_mask=pdm.astype(np.uint8)))
    sample, spec = case_to_sample(case, GRID)
    # the 16^3 box at the CT's spacing sits on the 16^3 CT: the region comes through unchanged
    assert spec.size == (16, 16, 16)
    np.testing.assert_array_equal(sample["body"][0].numpy() > 0, pdm)
    no_pdm = load_case(make_case(tmp_path, name="nopdm", possible_dose_mask=None))
    np.testing.assert_array_equal(case_to_sample(no_pdm, GRID)[0]["body"][0].numpy() > 0,
                                  make_case.arrays()["masks"]["Body"] > 0)


def _ones_prediction(model, batch, cfg, *, steps=None, seed=0, num_samples=1):
    """Stand-in for the network: the prescription everywhere on the model grid (and a std)."""
    shape = batch["ct"].shape
    return torch.ones(shape), (0.1 * torch.ones(shape) if num_samples > 1 else None)


def test_predicted_nifti_is_zero_outside_the_region(make_case, tmp_path, monkeypatch):
    import addiff_core.predict as predict

    pdm = _half_body_pdm(make_case)
    case_dir = make_case(tmp_path / "cases", possible_dose_mask=pdm.astype(np.uint8))  # pred/ is beside the data folder
    monkeypatch.setattr(predict, "load_model", lambda ckpt, dev: (torch.nn.Identity(), ModelConfig(grid=GRID), {}))
    monkeypatch.setattr(predict, "predict_normalised", _ones_prediction)
    written = predict.predict_case(tmp_path / "unused.pt", case_dir, tmp_path / "pred", samples=2, device="cpu")
    dose = _arr(sitk.ReadImage(written["dose"]))
    std = _arr(sitk.ReadImage(written["uncertainty"]))
    assert dose.shape == pdm.shape
    assert not dose[~pdm].any() and not std[~pdm].any()         # nothing outside the region
    assert dose[pdm].min() > 0 and np.allclose(dose[pdm], 70.0)  # the prediction inside it


def test_evaluate_scores_the_masked_prediction(make_case, tmp_path, monkeypatch):
    import addiff_core.training as training
    from addiff_core.data import SampleDataset
    from addiff_core.preprocessing import case_to_sample, dose_to_ct_grid

    pdm = _half_body_pdm(make_case)
    dirs = [make_case(tmp_path, name=n, possible_dose_mask=pdm.astype(np.uint8)) for n in ("a", "b")]
    cases = [load_case(d) for d in dirs]
    pairs = [case_to_sample(c, GRID) for c in cases]
    data = SampleDataset([s for s, _ in pairs], [g for _, g in pairs], ["a", "b"], dirs)
    monkeypatch.setattr(training, "predict_normalised", _ones_prediction)
    res = training.evaluate(torch.nn.Identity(), data, ModelConfig(grid=GRID), torch.device("cpu"), gamma=False,
                            progress=False)
    for case, (sample, spec), row in zip(cases, pairs, res["cases"]):
        raw = _arr(dose_to_ct_grid(torch.ones(spec.size), 70.0, spec, case.ct))  # unmasked: dose outside too
        ref = case.array("dose")
        assert raw[~pdm].max() > 0
        assert row["openkbp_dose_score"] == pytest.approx(readme_dose_score(raw, ref, pdm), rel=1e-6)
        assert row["mae_gy"] == pytest.approx(np.abs(raw - ref)[pdm].mean(), rel=1e-6)
    assert res["mean"]["dvh_cells"] == sum(r["dvh_cells"] for r in res["cases"]) == 2 * (3 + 2)


def test_predict_over_a_folder_of_cases_loads_the_model_once(make_case, tmp_path, monkeypatch, capsys):
    """``addiff predict --case FOLDER`` predicts every case under it into OUT/<case>/ with one
    model load; a broken case is reported by name and the others are still written."""
    import addiff_core.predict as predict
    from addiff_core.cli import main

    loads = []

    def fake_load(ckpt, dev):
        loads.append(ckpt)
        return torch.nn.Identity(), ModelConfig(grid=GRID), {}

    monkeypatch.setattr(predict, "load_model", fake_load)
    monkeypatch.setattr(predict, "predict_normalised", _ones_prediction)
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        make_case(cases, name=name)
    broken = make_case(cases, name="c")
    (broken / "plan.yaml").write_text("tumour_site: [")
    code = main(["predict", "--checkpoint", str(tmp_path / "m.pt"), "--case", str(cases), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1 and len(loads) == 1
    assert all((tmp_path / "out" / n / "dose.nii.gz").is_file() for n in ("a", "b"))
    assert not (tmp_path / "out" / "c").exists() and "c: FAILED" in out and "predicted 2 case(s)" in out
