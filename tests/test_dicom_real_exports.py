"""The importer and exporter on real third-party exports (issue #27): ``../shared/dicom-real``.

* ``eclipse-breast`` (Varian Eclipse breast boost, 14 Gy in 7 fractions, from dicompyler-core's
  test data): its CT is built from its one slice as its README says (``helpers.dicom_real``). Its
  prescription sits on a site dose reference "Breast", its body contour needs > 64 KB of
  ContourData when written at the CT's resolution, and its structures (heart, lung, breast) are
  those of a site the model does not know.
* ``mim-rtstruct`` (GE CT slices + a MIM RTSTRUCT, from rt-utils): CT + RTSTRUCT, no RTPLAN.

The patient is imported once per module (about 10 s: 512x512x98 CT); nothing is downloaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from addiff_core.case_io import load_case
from addiff_core.dicom.mapping import load_mapping
from addiff_core.dicom.contours import contours_to_mask
from addiff_core.dicom.objects import Identity, new_uid, right_handed
from addiff_core.dicom.reader import _rois, import_dicom
from addiff_core.dicom.scan import DicomFile
from addiff_core.dicom.writer import write_rtstruct
from addiff_core.dvh import dvh_points
from helpers.dicom_real import build_eclipse_breast, need

MAPPING = {"tumour_site": "lung"}  # breast is no site of the model: the hospital says what to treat it as


def _import(src: Path, out: Path, mapping: dict | None, tmp: Path) -> tuple[object, str]:
    lines: list[str] = []
    m = None
    if mapping is not None:
        (tmp / "map.yaml").write_text(yaml.safe_dump(mapping))
        m = load_mapping(tmp / "map.yaml")
    return import_dicom(src, out, m, echo=lines.append), "\n".join(lines)


@pytest.fixture(scope="module")
def breast(tmp_path_factory):
    """(the built source folder, the imported case folder, the import's output)."""
    root = tmp_path_factory.mktemp("eclipse")
    src = build_eclipse_breast(root / "src" / "eclipse-breast")
    summary, out = _import(src.parent, root / "cases", MAPPING, root)
    assert summary.imported, out
    return src, summary.imported[0].case_dir, out


@pytest.fixture
def dicompyler(monkeypatch):
    """dicompyler-core 0.5.6 with pydicom 3 (see tests/test_dicom_dvh.py)."""
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):
        monkeypatch.setattr(pydicom.dicomio, "read_file", pydicom.dcmread, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from dicompylercore import dicomparser, dvhcalc
    return dicomparser, dvhcalc


def test_eclipse_site_dose_reference_is_the_prescription_of_the_targets_that_receive_it(breast):
    _, case_dir, out = breast
    case = load_case(case_dir)
    # DR "Breast" (SITE, 14 Gy, no ROI): the boost's targets get it, not the whole breast (median 2.9 Gy)
    assert case.plan.prescriptions == {"Tumor_Bed": 14.0, "Tumor_Bed_Block": 14.0}
    assert (case.plan.fractions, len(case.plan.beams), case.plan.technique) == (7, 4, "IMRT")
    assert "prescription 14 Gy (dose reference 'Breast', SITE) assigned to Tumor Bed, Tumor Bed Block" in out
    assert "'CALC POINT', COORDINATES) is tied to no structure: ignored" in out
    assert "check:" not in out  # the dose sits on the prescribed targets


def test_eclipse_breast_without_a_mapping_is_refused_by_site_not_guessed_as_lung(tmp_path, breast):
    src, _, _ = breast
    summary, out = _import(src.parent, tmp_path / "cases", None, tmp_path)
    assert not summary.imported
    skipped = [ln for ln in out.splitlines() if "SKIPPED" in ln]
    assert len(skipped) == 1 and "rtss.dcm: looks like a breast case (Areola, Breast)" in skipped[0], out
    assert "a tumour site the model does not know" in skipped[0] and "`tumour_site` in the mapping file" in skipped[0]


def test_eclipse_breast_agrees_with_dicompyler_core(breast, dicompyler):
    """Volumes, Dmean and, for the targets, D95 of the imported case vs dicompyler-core's DVH of the
    original RTSTRUCT + RTDOSE, for structures of >= 5 cc (below, both rasterisations differ by
    whole voxels: Scar, 0.5 cc, 8 %). Measured: volumes within 1.0 %, Dmean within 0.02 Gy, D95
    within 0.06 Gy."""
    dicomparser, dvhcalc = dicompyler
    _, case_dir, _ = breast
    src = need("eclipse-breast")
    case = load_case(case_dir)
    dose = case.array("dose")
    ours_of = {v: k for k, v in yaml.safe_load((case_dir / "dicom.yaml").read_text())["structure_names"].items()}
    checked = set()
    for number, s in dicomparser.DicomParser(str(src / "rtss.dcm")).GetStructures().items():
        name = ours_of.get(s["name"])
        if name is None:
            continue
        theirs = dvhcalc.get_dvh(str(src / "rtss.dcm"), str(src / "rtdose.dcm"), number)
        mask = case.array(name).astype(bool)
        target = name in case.plan.prescriptions
        ours = dvh_points(dose, mask, case.voxel_volume_cc, is_target=True)
        volume = mask.sum() * case.voxel_volume_cc
        if theirs.volume < 5.0:
            continue
        assert volume == pytest.approx(theirs.volume, rel=0.015), name
        assert ours["Dmean"] == pytest.approx(theirs.mean, abs=0.03 + 0.005 * theirs.mean), name
        if target:
            assert ours["D95"] == pytest.approx(theirs.statistic("D95").value, abs=0.1), name
        checked.add(s["name"])
    assert {"BODY", "Heart", "Lt Lung", "Tumor Bed", "Tumor Bed Block", "Breast"} <= checked


def test_eclipse_breast_rtstruct_export_is_valid_dicom_and_reads_back_voxel_for_voxel(tmp_path, breast, dicompyler):
    """The RTSTRUCT ``export-dicom`` writes for the real patient (its body contour is > 64 KB of
    ContourData at the CT's resolution): no element written as VR UN, dicompyler-core parses every
    contour, the TPS's ROI names are kept, and the importer's reading gives the same masks back."""
    dicomparser, _ = dicompyler
    _, case_dir, _ = breast
    case = load_case(case_dir)
    ct = right_handed(case.ct)
    ident = Identity.for_case(case, None, keep_study=False)
    path = tmp_path / "rtstruct.dcm"
    write_rtstruct(case, ct, new_uid(), [new_uid() for _ in range(ct.GetSize()[2])], path, ident, None)
    ds = pydicom.dcmread(path)
    assert not [e for e in ds.iterall() if e.VR == "UN"]
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    assert {"BODY", "Tumor Bed", "Lt Lung"} <= set(names.values())  # the TPS's names, not Tumor_Bed
    body = next(n for n, v in names.items() if v == "BODY")
    coords = dicomparser.DicomParser(str(path)).GetStructureCoordinates(body)  # parses every DS value
    assert len(coords) == 98
    ours_of = {v: k for k, v in yaml.safe_load((case_dir / "dicom.yaml").read_text())["structure_names"].items()}
    for _, name, _, contours, _ in _rois(DicomFile(path, "RTSTRUCT", ds)):
        mask, notes = contours_to_mask(contours, case.ct)
        assert not notes and np.array_equal(mask, case.array(ours_of[name]).astype(bool)), name


def test_ct_and_rtstruct_without_rtplan_is_refused_in_one_line_even_with_a_mapping(tmp_path):
    src = need("mim-rtstruct")
    mapping = {"tumour_site": "head_neck", "prescriptions": {"ROI-1": 60}, "fractions": 30}
    summary, out = _import(src, tmp_path / "cases", mapping, tmp_path)
    assert not summary.imported
    skipped = [ln for ln in out.splitlines() if "SKIPPED" in ln]
    assert len(skipped) == 1, out
    assert "no RTPLAN among the patient's files (2 CT, 1 RTSTRUCT)" in skipped[0]
    assert "beams" in skipped[0] and "mapping file cannot give" in skipped[0]
