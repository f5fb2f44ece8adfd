"""The importer on files the project did not write: pydicom's bundled RT test files
(``rtplan.dcm``, ``rtstruct.dcm``, ``rtdose.dcm``; ``pydicom.data.get_testdata_file``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from addiff_core.dicom.contours import contours_to_mask
from addiff_core.dicom.names import NameMapper
from addiff_core.dicom.reader import _rois, import_dicom
from addiff_core.dicom.rtplan import read_rtplan
from addiff_core.dicom.scan import DicomFile, read_header, scan_folder
from addiff_core.dicom.volumes import DicomDataError, read_rtdose


def _file(name: str):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return path


def test_rtplan_beams_prescription_and_fractions():
    path = Path(_file("rtplan.dcm"))
    info = read_rtplan(read_header(path), path)
    assert len(info.beams) == 1
    beam = info.beams[0]
    assert (beam.gantry, beam.couch, beam.energy_mv, beam.is_arc) == (0.0, 0.0, 6.0, False)
    assert info.fractions == 30
    assert info.rx_by_roi == {}  # its target dose reference is a point (COORDINATES), tied to no ROI
    assert [(u.description, u.dose, u.structure_type) for u in info.rx_unlinked] == [
        ("PTV", pytest.approx(30.826203), "COORDINATES")]
    assert info.label == "Plan1"


def test_rtstruct_roi_names_types_and_contours():
    path = Path(_file("rtstruct.dcm"))
    ds = read_header(path)
    rois = {name: (num, kind, closed, other) for num, name, kind, closed, other in _rois(DicomFile(path, "RTSTRUCT", ds))}
    assert set(rois) == {"patient", "Isocenter 1", "Isocenter 2"}
    assert rois["patient"][1] == "EXTERNAL" and len(rois["patient"][2]) == 3
    assert rois["Isocenter 1"][1] == "ISOCENTER" and rois["Isocenter 1"][2] == [] and rois["Isocenter 1"][3] == 1
    mapper = NameMapper()
    assert mapper("patient", "EXTERNAL") == ("Body", True)  # the external contour becomes the Body
    assert mapper("Isocenter 1", "ISOCENTER") == ("Isocenter_1", False)  # kept (valid file name), reported
    # rasterise the body contours on a 5 mm grid around them: one slab per contour plane
    contours = rois["patient"][2]
    zs = sorted({round(float(c[0, 2]), 3) for c in contours})
    lo, hi = np.min([c.min(axis=0) for c in contours], axis=0), np.max([c.max(axis=0) for c in contours], axis=0)
    ref = sitk.Image(int((hi[0] - lo[0]) / 5) + 5, int((hi[1] - lo[1]) / 5) + 5, len(zs), sitk.sitkUInt8)
    ref.SetSpacing((5.0, 5.0, (zs[-1] - zs[0]) / max(1, len(zs) - 1) or 1.0))
    ref.SetOrigin((float(lo[0]) - 10, float(lo[1]) - 10, zs[0]))
    mask, notes = contours_to_mask(contours, ref)
    assert notes == [] and all(mask[k].any() for k in range(len(zs)))
    area = mask[0].sum() * 25.0  # mm^2 of the first plane vs the polygon's own area (shoelace)
    xy = contours[0][:, :2]
    poly = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
    assert area == pytest.approx(poly, rel=0.1)


def test_rtdose_grid_and_units():
    path = Path(_file("rtdose.dcm"))
    img = read_rtdose(path, require_absolute=False)
    assert img.GetSize() == (10, 10, 15)
    assert img.GetSpacing() == pytest.approx((10.0, 10.0, 5.0))
    assert img.GetOrigin() == pytest.approx((189.43125, 199.43125, -761.87))
    ds = pydicom.dcmread(str(path), force=True)
    expected = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    assert np.allclose(sitk.GetArrayFromImage(img), expected, rtol=1e-6)
    with pytest.raises(DicomDataError, match="rtdose.dcm: DoseUnits is 'RELATIVE'"):
        read_rtdose(path)  # a relative dose is not a dose in Gy: refused for import


def test_the_three_files_are_found_by_content_and_each_patient_gets_one_line(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    for i, name in enumerate(("rtplan.dcm", "rtstruct.dcm", "rtdose.dcm")):
        shutil.copy(_file(name), src / f"file{i}")  # names say nothing
    (src / "readme.txt").write_text("not DICOM")
    scan = scan_folder(src)
    assert sorted(f.kind for p in scan.patients for f in p.files) == ["RTDOSE", "RTPLAN", "RTSTRUCT"]
    assert [p.name for p in scan.non_dicom] == ["readme.txt"]
    lines: list[str] = []
    summary = import_dicom(src, tmp_path / "cases", echo=lines.append)
    assert len(summary.results) == 3 and not summary.imported  # three patients, no CT: nothing to import
    skipped = [ln for ln in lines if "SKIPPED" in ln]
    assert len(skipped) == 3 and all("no RTPLAN" in ln or "no RTSTRUCT" in ln or "no CT" in ln for ln in skipped)
    assert any("ignored 1 non-DICOM file(s): readme.txt" in ln for ln in lines)
