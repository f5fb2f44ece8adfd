"""Find DICOM files by content (never by name) and group them by patient.

Every file under the source folder is opened with pydicom (headers only). Files that are not
DICOM are listed and left alone; DICOM objects the importer does not use (MR, RT images,
DICOMDIR, ...) are listed with their modality. The rest is grouped by PatientID, and each
patient gets a case name: the top-level sub-folder of the source that holds all of its files and
no other patient's, else the source folder itself when it holds one patient only, else the
PatientID (made a valid folder name).
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from .names import safe_structure_name

__all__ = ["SOP_CLASSES", "KIND_OF", "DicomFile", "PatientFiles", "Scan", "read_header", "scan_folder"]

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "RTDOSE": "1.2.840.10008.5.1.4.1.1.481.2",
    "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3",
    "RTPLAN": "1.2.840.10008.5.1.4.1.1.481.5",
}
KIND_OF = {uid: kind for kind, uid in SOP_CLASSES.items()}


@dataclass
class DicomFile:
    path: Path
    kind: str  # CT | RTSTRUCT | RTPLAN | RTDOSE
    ds: Dataset  # header (no pixel data)


@dataclass
class PatientFiles:
    patient_id: str
    name: str  # case folder name
    files: list[DicomFile] = field(default_factory=list)

    def of(self, kind: str) -> list[DicomFile]:
        return [f for f in self.files if f.kind == kind]


@dataclass
class Scan:
    patients: list[PatientFiles]
    non_dicom: list[Path]
    unused: list[tuple[Path, str]]  # DICOM objects not used, with their modality / SOP class


def read_header(path: Path) -> Dataset | None:
    """The DICOM header of ``path`` (no pixel data), or None if it is not a DICOM file."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        pass  # no preamble: old files may still be DICOM
    except Exception:  # noqa: BLE001 - a broken file is reported, never fatal
        return None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        uid = str(ds.get("SOPClassUID", ""))
        return ds if uid.startswith("1.2.840.10008.") else None
    except Exception:  # noqa: BLE001
        return None


def _case_name(pid: str, files: list[DicomFile], src: Path, owners: dict[str, set[str]]) -> str:
    tops = {f.path.relative_to(src).parts[0] for f in files if len(f.path.relative_to(src).parts) > 1}
    direct = any(len(f.path.relative_to(src).parts) == 1 for f in files)
    if len(tops) == 1 and not direct:
        top = next(iter(tops))
        if owners[top] == {pid}:
            return safe_structure_name(top)
    if set().union(*owners.values()) == {pid}:
        return safe_structure_name(src.resolve().name)
    return safe_structure_name(pid or "unknown_patient")


def scan_folder(src: str | Path) -> Scan:
    """Read the headers of every file under ``src`` and group the usable ones by patient."""
    src = Path(src)
    paths = [src] if src.is_file() else sorted(
        Path(d) / f for d, dirs, fs in os.walk(src) for f in fs
        if not any(part.startswith(".") for part in (Path(d) / f).relative_to(src).parts))
    if src.is_file():
        src = src.parent
    groups: dict[str, list[DicomFile]] = defaultdict(list)
    non_dicom: list[Path] = []
    unused: list[tuple[Path, str]] = []
    owners: dict[str, set[str]] = defaultdict(set)  # top-level folder -> patient ids
    for p in paths:
        ds = read_header(p)
        if ds is None:
            non_dicom.append(p)
            continue
        kind = KIND_OF.get(str(ds.get("SOPClassUID", "")))
        if kind is None:
            unused.append((p, str(ds.get("Modality", "")) or str(ds.get("SOPClassUID", "?"))))
            continue
        pid = str(ds.get("PatientID", "") or "")
        groups[pid].append(DicomFile(p, kind, ds))
        rel = p.relative_to(src).parts
        owners[rel[0] if len(rel) > 1 else "."].add(pid)
    patients = [PatientFiles(pid, _case_name(pid, files, src, owners), files) for pid, files in groups.items()]
    seen: dict[str, int] = {}
    for pf in sorted(patients, key=lambda q: q.name):  # unique case names
        n = seen.get(pf.name, 0)
        seen[pf.name] = n + 1
        if n:
            pf.name = f"{pf.name}_{n + 1}"
    return Scan(sorted(patients, key=lambda q: q.name), non_dicom, unused)
