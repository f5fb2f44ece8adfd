"""Building blocks of the DICOM objects :mod:`.writer` writes: UIDs, the shared patient/study/frame
identity, the common modules of every object, the Part 10 file writing and the image plane.

UIDs: every new UID comes from ``pydicom.uid.generate_uid`` under a root: the argument, else the
environment variable ``ADDIFF_UID_ROOT``, else ``2.25.`` (a random UUID written as a decimal
number, ISO/IEC 9834-8 and DICOM PS3.5 B.2: unique without a registered root). A hospital with
its own registered root (digits and dots, ending in a dot, at most 40 characters) gets UIDs of
that root followed by a random suffix, at most 64 characters in all.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ..case_io import Case, read_dicom_info
from .scan import SOP_CLASSES
from .validate import DicomWriteError, file_problems, needs_implicit_vr, valid_or_empty, value_problems

__all__ = ["UID_ROOT", "STUDY_SOP_CLASS", "new_uid", "Identity", "base_dataset", "save", "right_handed",
           "set_image_plane", "ds_number", "now"]

UID_ROOT = "2.25."
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RTSTRUCTs refer to studies
_PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])


def new_uid(root: str | None = None) -> str:
    """A new UID under ``root``, else ``$ADDIFF_UID_ROOT``, else ``2.25.`` (UUID-derived)."""
    root = root or os.environ.get("ADDIFF_UID_ROOT") or UID_ROOT
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.", root) or len(root) > 40:
        raise ValueError(f"UID root {root!r} must be digits separated by dots, end with a dot and be <= 40 characters")
    return generate_uid(prefix=None) if root == "2.25." else generate_uid(prefix=root)


def ds_number(v: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    return format_number_as_ds(float(v))


def now() -> tuple[str, str]:
    t = _dt.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


@dataclass
class Identity:
    """Patient, study and frame of reference shared by the objects written for one case. Values
    of ``dicom.yaml`` that are not valid for their VR (a hashed birth date, a sex of 'X', an ID
    over 64 characters from an anonymiser) are left empty (type 2) rather than copied."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_id: str
    study_date: str
    study_time: str
    accession: str
    for_uid: str
    plan_uid: str | None = None  # the case's own RTPLAN (from dicom.yaml), for predicted doses

    @classmethod
    def for_case(cls, case: Case, root: str | None, keep_study: bool) -> "Identity":
        """The patient from the case's dicom.yaml (else the case id); the study and frame of
        reference too when ``keep_study`` (results written back), else fresh ones."""
        info = read_dicom_info(case.path)  # safe YAML, a regular file inside the case; CaseError if not
        pat, st = info.get("patient") or {}, info.get("study") or {}
        date, time = now()

        def ok(vr: str, value) -> str:  # anonymisers write hashes into dates and IDs: dropped, not copied
            return valid_or_empty(vr, str(value or ""))

        keep = keep_study and bool(ok("UI", st.get("StudyInstanceUID"))) and bool(ok("UI", info.get("frame_of_reference_uid")))

        sex = ok("CS", pat.get("PatientSex"))
        return cls(
            patient_id=ok("LO", pat.get("PatientID")) or case.case_id[:64],
            patient_name=ok("PN", pat.get("PatientName")) or case.case_id[:64],
            birth_date=ok("DA", pat.get("PatientBirthDate")), sex=sex if sex in ("M", "F", "O") else "",
            study_uid=st["StudyInstanceUID"] if keep else new_uid(root),
            study_id=ok("SH", st.get("StudyID")) if keep else "addiff",
            study_date=ok("DA", st.get("StudyDate")) if keep else date,
            study_time=ok("TM", st.get("StudyTime")) if keep else time,
            accession=ok("SH", st.get("AccessionNumber")) if keep else "",
            for_uid=info["frame_of_reference_uid"] if keep else new_uid(root),
            plan_uid=(ok("UI", (info.get("rtplan") or {}).get("SOPInstanceUID")) or None) if keep else None)


def base_dataset(kind: str, ident: Identity, series_uid: str, series_number: int, description: str, root: str | None,
                 instance: int = 1) -> FileDataset:
    """A new object of ``kind`` (CT | RTSTRUCT | RTPLAN | RTDOSE) with its file meta and the patient,
    study, series, equipment, frame of reference and SOP common modules filled in.

    Args:
        kind: the object; ident: patient/study identity; series_uid, series_number, description:
            its series; root: UID root (None: ``2.25.``); instance: InstanceNumber.
    """
    sop_uid = new_uid(root)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[kind]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ADDIFF_FL"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    date, time = now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[kind], sop_uid
    ds.StudyDate, ds.StudyTime = ident.study_date, ident.study_time
    ds.AccessionNumber = ident.accession
    ds.Modality = kind
    ds.Manufacturer = "addiff-fl"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description[:64]
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.SoftwareVersions = "addiff-fl"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ident.study_id[:16]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    if kind != "RTSTRUCT":  # the structure set names its frame of reference in its own sequence
        ds.FrameOfReferenceUID = ident.for_uid
        ds.PositionReferenceIndicator = ""
    return ds


def save(ds: FileDataset, path: Path) -> Path:
    """Write a DICOM Part 10 file and check it (:mod:`.validate`): Explicit VR Little Endian, or
    Implicit VR (4-byte lengths, readable by every reader) when an element is too long for
    Explicit VR, where pydicom would write an unparsable VR UN.

    Raises:
        DicomWriteError: a value breaks its VR (nothing written), or the written file does not
            read back as written (the file is removed).
    """
    problems = value_problems(ds)
    if problems:
        raise DicomWriteError(f"{path}: not written, invalid value: {problems[0]}")
    implicit = bool(needs_implicit_vr(ds))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    if _PYDICOM_MAJOR >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, implicit
        ds.save_as(str(path), write_like_original=False)
    problems = file_problems(path, ds)
    if problems:
        path.unlink()
        raise DicomWriteError(f"{path}: written file is not valid DICOM ({problems[0]}); removed")
    return path


def right_handed(img: sitk.Image) -> sitk.Image:
    """The same image with slices ordered along +normal (DICOM positions increase along it)."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    if np.linalg.det(d) > 0:
        return img
    nz = img.GetSize()[2]
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[::-1].copy())
    out.SetSpacing(img.GetSpacing())
    out.SetOrigin(img.TransformIndexToPhysicalPoint((0, 0, nz - 1)))
    d[:, 2] *= -1
    out.SetDirection([float(v) for v in d.ravel()])
    return out


def set_image_plane(ds: Dataset, img: sitk.Image, k: int = 0) -> None:
    """Image plane of slice ``k`` of ``img``: position, orientation, pixel spacing, size."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    ds.ImagePositionPatient = [ds_number(v) for v in img.TransformIndexToPhysicalPoint((0, 0, int(k)))]
    ds.ImageOrientationPatient = [ds_number(v) for v in np.concatenate([d[:, 0], d[:, 1]])]
    ds.PixelSpacing = [ds_number(sy), ds_number(sx)]  # row spacing (y), column spacing (x)
    ds.SliceThickness = ds_number(sz)
    ds.Rows, ds.Columns = img.GetSize()[1], img.GetSize()[0]
