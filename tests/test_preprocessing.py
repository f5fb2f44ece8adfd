"""Case -> model-grid tensors -> dose back on the CT grid in Gy (synthetic and real OpenKBP)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from addiff_core.case_io import Beam, Plan, load_case, save_case
from addiff_core.contract import OAR_NAMES
from addiff_core.config import GridConfig
from addiff_core.contract import B_MAX, C_MAX
from addiff_core.preprocessing import case_to_sample, dose_to_ct_grid


def smooth_case(tmp_path, shape=(20, 24, 22), spacing=(2.0, 2.5, 3.0), direction=None, origin=(-20.0, 13.0, 7.0)):
    """A small case with a smooth dose (so two linear resamplings are nearly lossless)."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    c = np.array(shape) / 2.0
    r2 = ((z - c[0]) * spacing[2]) ** 2 + ((y - c[1]) * spacing[1]) ** 2 + ((x - c[2]) * spacing[0]) ** 2
    ptv = r2 < 8.0 ** 2
    cord = (np.abs(x - c[2]) < 2) & (np.abs(y - (c[1] + 7)) < 2)
    dose = (60.0 * np.exp(-r2 / (2 * 14.0 ** 2))).astype(np.float32)
    ct = np.where(r2 < 30 ** 2, 40, -1000).astype(np.int16)
    plan = Plan("head_neck", {"PTV60": 60.0}, 30, "VMAT", (Beam(181, 0, 6, 359),), {})
    d = save_case(tmp_path / "case1", ct, plan, {"PTV60": ptv, "SpinalCord": cord}, dose=dose,
                  spacing=spacing, origin=origin, direction=direction)
    return d, dose


@pytest.mark.parametrize("direction", [None, (1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_round_trip_keeps_geometry_and_gy(tmp_path, direction):
    d, dose = smooth_case(tmp_path, direction=direction)
    case = load_case(d)
    sample, spec = case_to_sample(case, GridConfig(size=32))
    # tensors as documented
    assert sample["ct"].shape == (1, 32, 32, 32)
    assert sample["oars"].shape == (len(OAR_NAMES), 32, 32, 32)
    assert sample["beams"].shape == (B_MAX, 6) and sample["beam_mask"].sum() == 19  # 178 deg arc, 10 deg steps
    assert sample["constraints"].shape == (C_MAX, 6)
    assert float(sample["rx"]) == 60.0
    assert float(sample["dose"].max()) == pytest.approx(1.0, abs=0.05)  # Gy / Rx (half-voxel offset)
    assert -1.0 <= float(sample["ct"].min()) and float(sample["ct"].max()) <= 1.0
    assert sample["oar_present"][OAR_NAMES.index("SpinalCord")]
    assert float(sample["beam_plate"].max()) == pytest.approx(1.0)
    # back to the CT grid, in Gy
    back = dose_to_ct_grid(sample["dose"][0], float(sample["rx"]), spec, case.ct)
    assert back.GetSize() == case.ct.GetSize()
    assert np.allclose(back.GetSpacing(), case.ct.GetSpacing())
    assert np.allclose(back.GetOrigin(), case.ct.GetOrigin())
    assert np.allclose(back.GetDirection(), case.ct.GetDirection())
    arr = sitk.GetArrayFromImage(back)
    # native spacing: the model grid sits on the CT lattice, so the round trip is exact
    assert np.abs(arr - dose).max() < 1e-4


def test_resampled_grid_spacing(tmp_path):
    d, dose = smooth_case(tmp_path)
    case = load_case(d)
    sample, spec = case_to_sample(case, GridConfig(size=16, spacing=(4.0, 4.0, 4.0)))
    assert spec.spacing == (4.0, 4.0, 4.0)
    assert sample["dose"].shape == (1, 16, 16, 16)
    back = sitk.GetArrayFromImage(dose_to_ct_grid(sample["dose"][0], 60.0, spec, case.ct))
    assert np.abs(back - dose).mean() < 1.0  # coarser grid: small loss only


def test_model_grid_is_centred_on_target(tmp_path):
    d, _ = smooth_case(tmp_path)
    case = load_case(d)
    sample, _ = case_to_sample(case, GridConfig(size=32))
    t = sample["target_primary"][0].numpy()
    centroid = np.array([ix.mean() for ix in np.nonzero(t)])
    assert np.all(np.abs(centroid - 15.5) <= 1.0)


def test_openkbp_round_trip(tmp_path, openkbp_dir):
    from addiff_core.openkbp import import_openkbp_patient

    d = import_openkbp_patient(openkbp_dir / "pt_7", tmp_path / "pt_7")
    case = load_case(d)
    sample, spec = case_to_sample(case, GridConfig(size=128))  # native grid: lossless up to interpolation
    ref = case.array("dose")
    back = sitk.GetArrayFromImage(dose_to_ct_grid(sample["dose"][0], float(sample["rx"]), spec, case.ct))
    pdm = case.array("possible_dose_mask")
    # the box is centred on the PTVs, so part of the image falls outside it: compare where covered
    covered = sitk.GetArrayFromImage(dose_to_ct_grid(np.ones((128,) * 3, np.float32), 1.0, spec, case.ct)) > 0.999
    m = pdm & covered
    assert m.sum() > 0.8 * pdm.sum()
    assert np.abs(back[m] - ref[m]).max() < 1e-3
    assert sample["oar_present"][OAR_NAMES.index("SpinalCord")]
    assert int(sample["beam_mask"].sum()) == 9
