"""The real third-party DICOM-RT exports of ``../shared/dicom-real`` (never copied into the
project; tests read them, or copy them into a temporary folder)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from helpers.shared_data import shared_folder

DICOM_REAL = shared_folder("dicom-real", "ADDIFF_DICOM_REAL")


def need(name: str) -> Path:
    """The shared export ``name``; the test skips when the shared data is absent."""
    src = DICOM_REAL / name
    if not src.is_dir():
        pytest.skip(f"shared DICOM data {src} not present")
    return src


def build_eclipse_breast(dst: Path, with_dose: bool = True, with_plan: bool = True) -> Path:
    """The eclipse-breast patient with a full CT series, as its README says: ``ct.0.dcm`` copied
    onto each of the 98 planes the RTSTRUCT refers to (z from the contours on that image,
    SOPInstanceUID from its ContourImageSequence). Dose and contours are real; the CT is not."""
    src = need("eclipse-breast")
    dst.mkdir(parents=True, exist_ok=True)
    rs = pydicom.dcmread(src / "rtss.dcm")
    z_of: dict[str, float] = {}
    for rc in rs.ROIContourSequence:
        for c in rc.get("ContourSequence") or []:
            z_of.setdefault(str(c.ContourImageSequence[0].ReferencedSOPInstanceUID), float(c.ContourData[2]))
    ct = pydicom.dcmread(src / "ct.0.dcm")
    z0 = float(ct.ImagePositionPatient[2])
    step = float(ct.SliceThickness)
    for k, (uid, z) in enumerate(sorted(z_of.items(), key=lambda t: t[1])):
        z = z0 + step * round((z - z0) / step)  # the CT plane the contour lies on
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = uid
        ct.ImagePositionPatient = [ct.ImagePositionPatient[0], ct.ImagePositionPatient[1], f"{z:.4f}"]
        ct.SliceLocation = f"{z:.4f}"
        ct.InstanceNumber = k + 1
        ct.save_as(dst / f"ct.{k}.dcm")
    names = ["rtss.dcm"] + (["rtplan.dcm"] if with_plan else []) + (["rtdose.dcm"] if with_dose else [])
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return dst
