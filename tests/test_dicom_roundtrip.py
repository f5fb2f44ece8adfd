"""DICOM-RT round trip: case -> export-dicom -> import-dicom gives the same case back."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from addiff_core.case_io import load_case
from addiff_core.checks import check_case
from addiff_core.cli import main
from addiff_core.dicom.reader import import_dicom
from addiff_core.dicom.writer import export_case
from helpers.dicom import dice, same_geometry_arrays, synth_case_dir


def _compare(orig_dir: Path, back_dir: Path) -> None:
    a, b = load_case(orig_dir), load_case(back_dir)
    same_geometry_arrays(a, b)
    assert np.abs(a.array("ct") - b.array("ct")).max() <= 1.0  # HU
    da, db = a.array("dose"), b.array("dose")
    assert np.abs(da - db).max() <= 0.01 * da.max()
    for name in a.masks:
        m = a.array(name)
        if m.sum() > 30:
            assert name in b.masks, f"{name} lost"
            assert dice(m, b.array(name)) >= 0.9, name
    assert set(b.masks) == set(a.masks)
    assert b.plan.prescriptions == pytest.approx(a.plan.prescriptions)
    assert (b.plan.fractions, b.plan.technique, b.plan.tumour_site) == (a.plan.fractions, a.plan.technique, a.plan.tumour_site)
    assert len(b.plan.beams) == len(a.plan.beams)
    for x, y in zip(a.plan.beams, b.plan.beams):
        assert (y.gantry, y.couch, y.energy_mv) == pytest.approx((x.gantry, x.couch, x.energy_mv), abs=1e-6)
        assert (x.gantry_stop is None) == (y.gantry_stop is None)
        if x.is_arc:
            assert y.gantry_stop == pytest.approx(x.gantry_stop, abs=1e-6)
    assert check_case(back_dir) == []


@pytest.mark.parametrize("site,profile", [("head_neck", "hospital_a"), ("lung", "hospital_d"), ("prostate", "hospital_c")])
def test_synthetic_case_round_trip(tmp_path, site, profile):
    case = synth_case_dir(tmp_path / "cases", "p1", site=site, profile=profile)
    export_case(case, tmp_path / "dicom" / "p1")
    summary = import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    assert [r.name for r in summary.imported] == ["p1"] and not summary.skipped
    _compare(case, tmp_path / "back" / "p1")


def test_arcs_couch_and_energies_round_trip(tmp_path, make_case):
    from addiff_core.case_io import Beam, Plan

    plan = Plan(tumour_site="head_neck", prescriptions={"PTV70": 70.0}, fractions=35, technique="VMAT",
                beams=(Beam(181.0, 0.0, 6.0, 179.0), Beam(179.0, 0.0, 6.0, 181.0), Beam(30.0, 270.0, 10.0, 150.0),
                       Beam(0.0, 0.0, 6.0, 0.0), Beam(45.0, 15.0, 15.0)))
    case = make_case(tmp_path, name="arcs", plan=plan)
    export_case(case, tmp_path / "dicom")
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    back = load_case(tmp_path / "back" / "dicom").plan
    assert back.beams == plan.beams
    rp = pydicom.dcmread(str(tmp_path / "dicom" / "rtplan.dcm"))
    assert str(rp.BeamSequence[0].ControlPointSequence[0].GantryRotationDirection) == "CW"


def test_holes_and_several_contours_per_slice_round_trip_exactly(tmp_path, make_case):
    n = 16
    z, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2,) * 3, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2)
    ring = ((r <= 6) & (r >= 3)) | (r <= 1)  # a ring with an island inside its hole
    ring &= np.abs(z) <= 3
    islands = ((np.abs(x - 4) <= 1) | (np.abs(x + 4) <= 1)) & (np.abs(y) <= 1) & (np.abs(z) <= 2)
    case = make_case(tmp_path, name="holes", masks={"Larynx": ring.astype(np.uint8), "Mandible": islands.astype(np.uint8)})
    export_case(case, tmp_path / "dicom")
    rs = pydicom.dcmread(str(tmp_path / "dicom" / "rtstruct.dcm"))
    numbers = {str(r.ROIName): int(r.ROINumber) for r in rs.StructureSetROISequence}
    larynx = next(rc for rc in rs.ROIContourSequence if int(rc.ReferencedROINumber) == numbers["Larynx"])
    uids = [str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) for c in larynx.ContourSequence]
    assert max(uids.count(u) for u in uids) == 3  # outer ring, hole, island on one slice
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    back = load_case(tmp_path / "back" / "dicom")
    assert np.array_equal(back.array("Larynx"), ring)
    assert np.array_equal(back.array("Mandible"), islands)


def _rotation(ax: float, az: float) -> np.ndarray:
    a, c = math.radians(ax), math.radians(az)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ rx


def test_oblique_series_round_trip(tmp_path):
    """Oblique slices (rotated direction cosines): geometry, contours and dose come back as they were."""
    d = _rotation(20.0, 25.0)
    case = synth_case_dir(tmp_path / "cases", "oblique", direction=tuple(d.ravel()))
    export_case(case, tmp_path / "dicom")
    ct0 = pydicom.dcmread(str(tmp_path / "dicom" / "ct_0001.dcm"))
    assert [float(v) for v in ct0.ImageOrientationPatient] == pytest.approx(list(d[:, 0]) + list(d[:, 1]), abs=1e-6)
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    _compare(case, tmp_path / "back" / "dicom")


def test_left_handed_case_is_written_right_handed_and_comes_back_in_place(tmp_path, make_case):
    case = make_case(tmp_path, name="flipz", direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    export_case(case, tmp_path / "dicom")
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    a, b = load_case(case), load_case(tmp_path / "back" / "dicom")
    assert np.linalg.det(np.array(b.ct.GetDirection()).reshape(3, 3)) > 0
    for what in ("ct", "dose"):
        img = b.ct if what == "ct" else b.dose
        on_a = sitk.GetArrayFromImage(sitk.Resample(img, a.ct, sitk.Transform(), sitk.sitkNearestNeighbor))
        assert np.abs(on_a - a.array(what)).max() <= (1.0 if what == "ct" else 0.01 * a.array("dose").max())
    m = sitk.GetArrayFromImage(sitk.Resample(b.masks["PTV70"], a.ct, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    assert np.array_equal(m, a.array("PTV70"))


def test_cli_round_trip_with_nested_folders_and_identifiers_kept(tmp_path, capsys):
    case = synth_case_dir(tmp_path / "cases", "pat7", site="prostate", profile="hospital_c")
    assert main(["data", "export-dicom", str(case), str(tmp_path / "export")]) == 0
    assert "wrote 24 CT slice(s)" in capsys.readouterr().out
    # a patient folder in the hospital's own arrangement: CT in one sub-folder, RT objects in others, odd names
    src = tmp_path / "tps" / "PATIENT_0007"
    for i, f in enumerate(sorted((tmp_path / "export").iterdir(), reverse=True)):
        sub = Path("images") if f.name.startswith("ct_") else Path("rt") / f.stem
        (src / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / sub / f"IMG{i:05d}")
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "cases_back")]) == 0
    out = capsys.readouterr().out
    assert "PATIENT_0007" in out and "imported 1 of 1 patient(s)" in out
    back = tmp_path / "cases_back" / "PATIENT_0007"
    _compare(case, back)
    assert main(["data", "check", str(tmp_path / "cases_back")]) == 0
    info = yaml.safe_load((back / "dicom.yaml").read_text())
    ct0 = pydicom.dcmread(str(tmp_path / "export" / "ct_0001.dcm"))
    assert info["study"]["StudyInstanceUID"] == ct0.StudyInstanceUID
    assert info["frame_of_reference_uid"] == ct0.FrameOfReferenceUID
    assert info["ct_series"]["SeriesInstanceUID"] == ct0.SeriesInstanceUID
    assert info["ct_series"]["sop_instance_uids"][0] == ct0.SOPInstanceUID and len(info["ct_series"]["sop_instance_uids"]) == 24
    assert info["rtplan"]["SOPInstanceUID"] == pydicom.dcmread(str(tmp_path / "export" / "rtplan.dcm")).SOPInstanceUID
    assert info["patient"]["PatientID"] == "pat7"


def test_exported_objects_are_valid_and_share_study_and_frame_of_reference(tmp_path, make_case, monkeypatch):
    monkeypatch.setenv("ADDIFF_UID_ROOT", "1.2.826.0.1.3680043.10.999.")
    case = make_case(tmp_path, name="c")
    written = export_case(case, tmp_path / "dicom")
    cts = sorted((tmp_path / "dicom").glob("ct_*.dcm"))
    ds = {k: pydicom.dcmread(str(p)) for k, p in written.items()}
    assert str(ds["ct"].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"
    assert str(ds["rtstruct"].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.481.3"
    assert str(ds["rtplan"].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.481.5"
    assert str(ds["rtdose"].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.481.2"
    for d in ds.values():
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert str(d.SOPInstanceUID).startswith("1.2.826.0.1.3680043.10.999.") and len(str(d.SOPInstanceUID)) <= 64
        assert d.StudyInstanceUID == ds["ct"].StudyInstanceUID
    for_uid = ds["ct"].FrameOfReferenceUID
    assert ds["rtplan"].FrameOfReferenceUID == for_uid == ds["rtdose"].FrameOfReferenceUID
    assert ds["rtstruct"].ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == for_uid
    refs = ds["rtstruct"].ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert {str(r.ReferencedSOPInstanceUID) for r in refs.ContourImageSequence} == \
        {str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID) for p in cts}
    assert ds["rtplan"].ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == ds["rtstruct"].SOPInstanceUID
    assert ds["rtdose"].ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == ds["rtplan"].SOPInstanceUID
    assert (ds["rtdose"].DoseUnits, ds["rtdose"].DoseType, ds["rtdose"].DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    px = pydicom.dcmread(str(cts[0])).pixel_array
    assert px.shape == (16, 16) and px.dtype == np.int16
    assert ds["rtdose"].pixel_array.shape == (16, 16, 16)


def test_export_refuses_a_bad_uid_root_and_a_folder_with_dicom_files(tmp_path, make_case, capsys):
    case = make_case(tmp_path, name="c")
    assert main(["data", "export-dicom", str(case), str(tmp_path / "d"), "--uid-root", "1.2.abc."]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "UID root" in err
    assert main(["data", "export-dicom", str(case), str(tmp_path / "d")]) == 0
    assert main(["data", "export-dicom", str(case), str(tmp_path / "d")]) == 2
    assert "already holds .dcm files" in capsys.readouterr().err


def test_reimport_replaces_the_case_folder(tmp_path, make_case):
    case = make_case(tmp_path, name="c")
    export_case(case, tmp_path / "dicom" / "c")
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["c"]


def _coarse_dose_rtdose(tmp_path, make_case) -> tuple:
    """An export whose RTDOSE lies on its own coarser, shifted grid (as planning systems write it)."""
    from addiff_core.dicom.writer import Identity, write_rtdose

    case_dir = make_case(tmp_path, name="cd")
    export_case(case_dir, tmp_path / "dicom")
    case = load_case(case_dir)
    grid = sitk.Image(9, 9, 8, sitk.sitkFloat32)
    grid.SetSpacing([2 * s for s in case.ct.GetSpacing()])
    grid.SetOrigin([o + 0.5 * s for o, s in zip(case.ct.GetOrigin(), case.ct.GetSpacing())])
    coarse = sitk.Resample(case.dose, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ct0 = pydicom.dcmread(str(tmp_path / "dicom" / "ct_0001.dcm"))
    rp = pydicom.dcmread(str(tmp_path / "dicom" / "rtplan.dcm"))
    ident = Identity(str(ct0.PatientID), str(ct0.PatientName), "", "", ct0.StudyInstanceUID, "", "", "", "",
                     ct0.FrameOfReferenceUID)
    (tmp_path / "dicom" / "rtdose.dcm").unlink()
    write_rtdose(coarse, tmp_path / "dicom" / "rtdose.dcm", ident, None, plan_uid=rp.SOPInstanceUID, description="TPS dose")
    expected = sitk.GetArrayFromImage(sitk.Resample(coarse, case.ct, sitk.Transform(), sitk.sitkLinear, 0.0))
    return expected, float(sitk.GetArrayFromImage(coarse).max())


@pytest.mark.parametrize("variant", ["relative offsets", "absolute offsets", "cGy"])
def test_rtdose_on_its_own_grid_is_resampled_onto_the_ct_in_gy(tmp_path, make_case, variant):
    from helpers.dicom import edit

    expected, dmax = _coarse_dose_rtdose(tmp_path, make_case)

    def change(ds):
        if variant == "absolute offsets":  # first offset = the first frame's z (allowed for axial grids)
            z0 = float(ds.ImagePositionPatient[2])
            ds.GridFrameOffsetVector = [f"{z0 + float(v):.4f}" for v in ds.GridFrameOffsetVector]
        if variant == "cGy":
            ds.DoseUnits = "CGY"
            ds.DoseGridScaling = f"{float(ds.DoseGridScaling) * 100:.10g}"
    edit(tmp_path / "dicom" / "rtdose.dcm", change)
    import_dicom(tmp_path / "dicom", tmp_path / "back", echo=None)
    dose = load_case(tmp_path / "back" / "dicom").array("dose")
    assert np.abs(dose - expected).max() <= 1e-4 * dmax
    assert float(dose.max()) > 0.5 * dmax


def test_simpleitk_gdcm_reads_the_exported_ct_series_and_dose_grid(tmp_path):
    """A second, independent reader (GDCM inside SimpleITK) sees the same CT and dose grid."""
    case_dir = synth_case_dir(tmp_path / "cases", "g", site="lung", profile="hospital_b")
    export_case(case_dir, tmp_path / "dicom")
    case = load_case(case_dir)
    reader = sitk.ImageSeriesReader()
    series = str(pydicom.dcmread(str(tmp_path / "dicom" / "ct_0001.dcm"), stop_before_pixels=True).SeriesInstanceUID)
    files = reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom"), series)  # (the folder also holds the RT series)
    assert len(files) == case.ct.GetSize()[2]
    reader.SetFileNames(files)
    ct = reader.Execute()
    same_geometry_arrays(case, type(case)(case_id="g", path=case_dir, ct=ct, plan=case.plan, masks={}))
    assert np.array_equal(sitk.GetArrayFromImage(ct), case.array("ct"))
    dose = sitk.ReadImage(str(tmp_path / "dicom" / "rtdose.dcm"))  # GDCM: stored integers, not yet scaled
    assert dose.GetSize() == case.ct.GetSize()
    assert np.allclose(dose.GetOrigin(), case.ct.GetOrigin(), atol=1e-3)
    assert np.allclose(dose.GetSpacing(), case.ct.GetSpacing(), atol=1e-3)
    scaling = float(pydicom.dcmread(str(tmp_path / "dicom" / "rtdose.dcm"), stop_before_pixels=True).DoseGridScaling)
    gy = sitk.GetArrayFromImage(dose).astype(np.float64) * scaling
    assert np.abs(gy - case.array("dose")).max() <= 1e-6 * case.array("dose").max()
