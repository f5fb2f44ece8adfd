"""Find DICOM files by content (never by name) and group them by patient.

Every regular file in the source folder is opened, headers only (:mod:`.files`); hidden entries,
FIFOs, devices, links out of the folder, non-DICOM files and objects the importer does not use are
listed (``Scan.skipped``). Files are grouped by PatientID; a patient's case name is the top-level
sub-folder holding all its files and no other patient's, else the source folder (one patient),
else the PatientID.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from ..limits import file_problem
from .files import read_header
from .names import safe_structure_name

__all__ = ["SOP_CLASSES", "KIND_OF", "DicomFile", "PatientFiles", "Scan", "read_header", "scan_folder"]

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "RTDOSE": "1.2.840.10008.5.1.4.1.1.481.2",
    "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3",
    "RTPLAN": "1.2.840.10008.5.1.4.1.1.481.5",
}
ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"  # RT Ion Plan
KIND_OF = {uid: kind for kind, uid in SOP_CLASSES.items()}
KIND_OF[ION_PLAN_SOP_CLASS] = "RTPLAN"  # read so that it is refused by name (rtplan.refusal)


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
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # not read at all, with why

    def skipped_line(self, src: Path, shown: int = 5) -> str:
        """One line naming the entries not read (the first ``shown``) and why."""
        def rel(p: Path) -> str:
            return str(p.relative_to(src)) if src in p.parents else p.name

        items = [f"{rel(p)} ({why.removeprefix('is ').removesuffix('; not read')})" for p, why in self.skipped[:shown]]
        more = f", and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"not read: {len(self.skipped)} file(s)/folder(s): {', '.join(items)}{more}"


def _listing(src: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(regular files inside ``src`` to read, entries skipped with why), sorted. Hidden folders and
    linked folders are not walked into."""
    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for d, dirs, files in os.walk(src):  # followlinks=False
        here = Path(d)
        for n in sorted(dirs):
            if n.startswith("."):
                skipped.append((here / n, "hidden folder: its name starts with '.'"))
            elif (here / n).is_symlink():
                skipped.append((here / n, "symbolic link to a folder: not followed"))
        dirs[:] = sorted(n for n in dirs if not n.startswith(".") and not (here / n).is_symlink())
        for n in sorted(files):
            p = here / n
            why = "hidden file: its name starts with '.'" if n.startswith(".") else file_problem(p, src, "DICOM")
            if why:
                skipped.append((p, why))
            else:
                paths.append(p)
    return sorted(paths), skipped


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
    paths, skipped = ([src], []) if src.is_file() else _listing(src)
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
    return Scan(sorted(patients, key=lambda q: q.name), non_dicom, unused, skipped)
