"""An independent reader: dicompyler-core's DVH of an exported RTDOSE + RTSTRUCT agrees with the
project's DVH points (``dvh.dvh_points``) computed on the case's own arrays.

Tolerances (dicompyler-core bins dose in 1 cGy steps and rasterises the contours itself, on the
dose grid, from the files); measured on these 24^3 phantoms in brackets:
* cumulative DVH curve at every 1 cGy bin: within one voxel of volume (measured: identical, 0 voxels);
* structure volume within 1 % (measured <= 0.1 %, from dicompyler's slice-thickness estimate);
* Dmean within 0.05 Gy (measured <= 0.003 Gy), Dmax within 0.02 Gy (measured <= 0.01 Gy, one bin);
* D98/D95/D50/D2 and V20Gy of ``dvh_points`` lie on dicompyler-core's curve: at the project's D_x
  +- 1 cGy dicompyler's volume brackets x % within one voxel (dicompyler-core's own D_x picks the
  bin whose volume is nearest, so for a 20-voxel organ it may be several voxels off any
  interpolated value: its curve, not its D_x, is the independent reference).
"""
from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest

from addiff_core.case_io import load_case
from addiff_core.dicom.writer import export_case
from addiff_core.dvh import dvh_curve, dvh_points
from helpers.dicom import synth_case_dir


@pytest.fixture
def dicompyler(monkeypatch):
    """dicompyler-core 0.5.6 (its latest release) imports ``pydicom.dicomio.read_file``, which pydicom
    3 removed; its main branch has the fix (dicompyler-core#380) but no release yet. Give it the
    name for the test; the files are read by pydicom's ``dcmread`` either way."""
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):
        monkeypatch.setattr(pydicom.dicomio, "read_file", pydicom.dcmread, raising=False)
    with warnings.catch_warnings():  # it also imports pydicom.pixel_data_handlers (deprecated in pydicom 3)
        warnings.simplefilter("ignore", DeprecationWarning)
        from dicompylercore import dicomparser, dvhcalc

    return dicomparser, dvhcalc


def _volume_at(rel: np.ndarray, dose_gy: float) -> float:
    """dicompyler-core's cumulative relative volume (0..1) at ``dose_gy`` (1 cGy bins)."""
    i = int(np.floor(dose_gy * 100.0 + 1e-9))
    return 1.0 if i <= 0 else (0.0 if i >= rel.size else float(rel[i]))


@pytest.mark.parametrize("site,profile", [("head_neck", "hospital_a"), ("prostate", "hospital_c")])
def test_dicompyler_dvh_agrees_with_project_dvh_points(tmp_path, dicompyler, site, profile):
    dicomparser, dvhcalc = dicompyler
    case_dir = synth_case_dir(tmp_path, "p", site=site, profile=profile)
    written = export_case(case_dir, tmp_path / "dicom")
    case = load_case(case_dir)
    dose = case.array("dose")
    rs, rd = str(written["rtstruct"]), str(written["rtdose"])
    structures = dicomparser.DicomParser(rs).GetStructures()
    assert {s["name"] for s in structures.values()} == set(case.masks)
    worst = {"curve_voxels": 0.0, "volume_rel": 0.0, "Dmean": 0.0, "Dmax": 0.0}
    for number, s in structures.items():
        name = s["name"]
        mask = case.array(name)
        n = int(mask.sum())
        is_target = name in case.plan.prescriptions
        ours = dvh_points(dose, mask, case.voxel_volume_cc, is_target=is_target, v_x_gy=(20.0,))
        theirs = dvhcalc.get_dvh(rs, rd, number)
        rel = theirs.relative_volume.counts / 100.0
        _, frac = dvh_curve(dose, mask, theirs.bins[:-1])
        vol = n * case.voxel_volume_cc
        worst["curve_voxels"] = max(worst["curve_voxels"], float(np.abs(rel - frac).max()) * n)
        worst["volume_rel"] = max(worst["volume_rel"], abs(theirs.volume - vol) / vol)
        worst["Dmean"] = max(worst["Dmean"], abs(theirs.mean - ours["Dmean"]))
        worst["Dmax"] = max(worst["Dmax"], abs(theirs.max - ours["Dmax"]))
        assert np.abs(rel - frac).max() <= 1.0 / n + 1e-9, name
        assert theirs.volume == pytest.approx(vol, rel=0.01), name
        assert theirs.mean == pytest.approx(ours["Dmean"], abs=0.05), name
        assert theirs.max == pytest.approx(ours["Dmax"], abs=0.02), name
        for pct in (98, 95, 50, 2):
            d = ours[f"D{pct}"]
            assert _volume_at(rel, d + 0.01) - 1.0 / n <= pct / 100.0 <= _volume_at(rel, d - 0.01) + 1.0 / n, (name, pct)
        if not is_target:
            assert ours["V20Gy"] == pytest.approx(_volume_at(rel, 20.0), abs=1.0 / n + 1e-9), name
    print(f"{site}: worst differences dicompyler-core vs dvh.dvh_points: {worst}")


def test_dicompyler_reads_the_exported_dose_grid_in_gy(tmp_path, dicompyler):
    dicomparser, _ = dicompyler
    case_dir = synth_case_dir(tmp_path, "p")
    written = export_case(case_dir, tmp_path / "dicom")
    dd = dicomparser.DicomParser(str(written["rtdose"])).GetDoseData()
    case = load_case(case_dir)
    assert dd["dosemax"] * dd["dosegridscaling"] == pytest.approx(float(case.array("dose").max()), rel=1e-6)
    assert (dd["rows"], dd["columns"]) == case.ct.GetSize()[1::-1]
    assert np.allclose(dd["lut"][0][0], case.ct.GetOrigin()[0]) and np.allclose(dd["lut"][1][0], case.ct.GetOrigin()[1])
    assert pydicom.dcmread(str(written["rtdose"])).DoseUnits == "GY"
