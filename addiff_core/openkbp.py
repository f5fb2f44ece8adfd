"""Importer for the OpenKBP grand-challenge sparse-CSV format (Babier et al., Med. Phys. 2021).

A patient folder holds ``ct.csv``, ``dose.csv``, ``possible_dose_mask.csv``, ``voxel_dimensions.csv``
and one CSV per structure: header ``,data``, a flat C-order index into 128^3 and the value.

Axes (checked on the real sample: ``tests/test_openkbp.py::test_anatomy_orientation``): OpenKBP
indexes ``(row, column, slice)`` = (anterior->posterior, right->left, superior->inferior), and
``voxel_dimensions.csv`` is (dy, dx, dz). The case's LPS ``(z, y, x)`` is therefore
``transpose(2, 0, 1)[::-1]`` (voxel (r, c, s) -> (S - 1 - s, r, c)), spacing (vd[1], vd[0], vd[2]).
OpenKBP has no patient coordinates: the grid is centred on 0 mm. CT is stored as HU + 1024
(0 = omitted): written as int16 HU, omitted voxels -1024; dose as float32 Gy.
"""
from __future__ import annotations

import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .case_io import Beam, Plan, only_case_entries, plan_from_dict, save_case, staged_case_dir
from .errors import CaseError

GRID_SHAPE = (128, 128, 128)  # OpenKBP (row, column, slice)
TARGETS = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
STRUCTURES = tuple(TARGETS) + OARS
FRACTIONS = 35
GANTRY_ANGLES = tuple(range(0, 360, 40))  # nine equispaced coplanar 6 MV fields
CT_OFFSET = 1024


# -- CSV parsing -----------------------------------------------------------------------------------
def read_sparse_csv(path: Path, case: str | Path, with_values: bool,
                    shape: tuple[int, int, int] = GRID_SHAPE) -> tuple[np.ndarray, np.ndarray | None]:
    """An OpenKBP sparse CSV -> (flat int64 indices, float64 values or None); CaseError naming the
    file for unparsable rows, bad indices or non-finite values."""
    rel = path.name
    try:
        with open(path, "r", encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise CaseError(case, rel, f"cannot read: {e}") from None
    skip = 1 if re.search(r"[A-Za-z]", first) else 0  # header ",data"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" for header-only files
            arr = np.loadtxt(path, delimiter=",", skiprows=skip, usecols=(0, 1) if with_values else (0,),
                             dtype=np.float64, ndmin=2, encoding="utf-8")
    except (ValueError, IndexError) as e:
        what = "index,value rows" if with_values else "index rows"
        raise CaseError(case, rel, f"not an OpenKBP sparse CSV (expected header ',data' then {what}): "
                                   f"{str(e).splitlines()[0]}") from None
    if arr.size == 0:
        return np.zeros(0, np.int64), (np.zeros(0) if with_values else None)
    fidx = arr[:, 0]
    n = int(np.prod(shape))
    if not np.all(np.isfinite(fidx)) or np.any(fidx != np.floor(fidx)):
        raise CaseError(case, rel, "flat indices must be integers")
    bad = (fidx < 0) | (fidx >= n)
    if np.any(bad):
        row = int(np.argmax(bad))
        raise CaseError(case, rel, f"index {int(fidx[row])} (data row {row + 1}) out of range 0..{n - 1} "
                                   f"for a {'x'.join(map(str, shape))} grid")
    values = None
    if with_values:
        values = arr[:, 1]
        if not np.all(np.isfinite(values)):
            row = int(np.argmax(~np.isfinite(values)))
            raise CaseError(case, rel, f"non-finite value {values[row]} at data row {row + 1}")
    return fidx.astype(np.int64), values


def read_voxel_dimensions(src_dir: Path) -> tuple[float, float, float]:
    """voxel_dimensions.csv -> (row, column, slice) spacing in mm; CaseError if absent or bad."""
    path = src_dir / "voxel_dimensions.csv"
    if not path.is_file():
        raise CaseError(src_dir, path.name, "missing (needs three voxel sizes in mm)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vd = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1, encoding="utf-8").ravel()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CaseError(src_dir, path.name, f"not three numbers: {str(e).splitlines()[0]}") from None
    if vd.size != 3:
        raise CaseError(src_dir, path.name, f"expected three voxel sizes in mm, got {vd.size} values")
    if not np.all(np.isfinite(vd)) or np.any(vd <= 0) or np.any(vd > 50):
        raise CaseError(src_dir, path.name, f"voxel sizes must be positive mm values (0 < v <= 50), got {vd.tolist()}")
    return float(vd[0]), float(vd[1]), float(vd[2])


def to_case_array(openkbp_flat_or_3d: np.ndarray, shape: tuple[int, int, int] = GRID_SHAPE) -> np.ndarray:
    """OpenKBP (row, col, slice) array -> case (z, y, x) array: transpose (2, 0, 1), z flipped
    so that it increases superiorly. Returns a C-contiguous copy."""
    a = np.asarray(openkbp_flat_or_3d).reshape(shape)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[::-1])


def openkbp_index_to_case_index(flat: np.ndarray | int,
                                shape: tuple[int, int, int] = GRID_SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat OpenKBP index -> (z, y, x) index into the imported case arrays."""
    r, c, s = np.unravel_index(flat, shape)
    return shape[2] - 1 - s, r, c


def _dense(idx: np.ndarray, values: np.ndarray | float, fill: float, dtype, shape) -> np.ndarray:
    a = np.full(int(np.prod(shape)), fill, dtype=dtype)
    a[idx] = values
    return to_case_array(a, shape)


# -- import ----------------------------------------------------------------------------------------
def openkbp_plan(targets: list[str]) -> Plan:
    """The OpenKBP plan: head and neck, 35 fractions, nine 6 MV IMRT fields, prescriptions for
    the given PTVs only."""
    d = {
        "tumour_site": "head_neck",
        "prescriptions": {t: TARGETS[t] for t in TARGETS if t in targets},
        "fractions": FRACTIONS,
        "technique": "IMRT",
        "beams": [Beam(gantry=float(g), couch=0.0, energy_mv=6.0).to_dict() for g in GANTRY_ANGLES],
    }
    return plan_from_dict(d)


PATIENT_FILES = ("ct.csv", "dose.csv", "possible_dose_mask.csv", "voxel_dimensions.csv")
"""A folder holding any of these is an OpenKBP patient folder."""
MAX_DEPTH = 3  # patient folders are looked for at most this deep below the folder given


def _is_patient_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in PATIENT_FILES)


def import_openkbp_patient(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert one OpenKBP patient folder into the case folder ``out_dir`` (ct, dose, possible-dose
    mask, every non-empty structure, whose names are already canonical, and plan.yaml), written
    beside it and moved into place, so a failed import leaves nothing. An existing case folder is
    replaced, any other non-empty folder refused (FileExistsError); CaseError names a bad CSV."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise CaseError(src_dir, ".", "OpenKBP patient folder not found")
    if not (src_dir / "ct.csv").is_file():
        raise CaseError(src_dir, "ct.csv", "missing (every OpenKBP patient has a CT)")
    if out_dir.exists() and not only_case_entries(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a case folder; not overwriting")
    shape = GRID_SHAPE
    vd = read_voxel_dimensions(src_dir)
    spacing = (vd[1], vd[0], vd[2])  # (row, col, slice) = (dy, dx, dz) -> (dx, dy, dz)
    size_xyz = (shape[1], shape[0], shape[2])
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(size_xyz, spacing))

    idx, val = read_sparse_csv(src_dir / "ct.csv", src_dir, True, shape)
    hu = np.rint(val) - CT_OFFSET
    if hu.size and (hu.min() < -32768 or hu.max() > 32767):
        raise CaseError(src_dir, "ct.csv", f"values {val.min()}..{val.max()} do not fit int16 after the -1024 offset")
    ct = _dense(idx, hu.astype(np.int16), -CT_OFFSET, np.int16, shape)

    dose = None
    if (src_dir / "dose.csv").is_file():
        didx, dval = read_sparse_csv(src_dir / "dose.csv", src_dir, True, shape)
        dose = _dense(didx, dval.astype(np.float32), 0.0, np.float32, shape)
    pdm = None
    if (src_dir / "possible_dose_mask.csv").is_file():
        pidx, _ = read_sparse_csv(src_dir / "possible_dose_mask.csv", src_dir, False, shape)
        pdm = _dense(pidx, 1, 0, np.uint8, shape)
    masks: dict[str, np.ndarray] = {}
    for name in STRUCTURES:
        f = src_dir / f"{name}.csv"
        if f.is_file():
            sidx, _ = read_sparse_csv(f, src_dir, False, shape)
            if sidx.size:  # an empty structure is dropped (and not prescribed)
                masks[name] = _dense(sidx, 1, 0, np.uint8, shape)
    targets = [t for t in TARGETS if t in masks]
    if not targets:
        raise CaseError(src_dir, "PTV70.csv", "no non-empty target (PTV70/PTV63/PTV56): cannot write a plan")
    plan = openkbp_plan(targets)

    with staged_case_dir(out_dir) as tmp:
        save_case(tmp, ct, plan, masks, dose=dose, possible_dose_mask=pdm, spacing=spacing, origin=origin)
    return out_dir


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def find_patients(src: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """OpenKBP patient folders in ``src``: itself, or every one up to ``max_depth`` below it (not
    inside a patient, hidden skipped), in natural order; covers ``provided-data/train-pats/pt_1``."""
    if _is_patient_dir(src):
        return [src]
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        subs = sorted((c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_natural_key)
        for c in subs:
            if _is_patient_dir(c):
                found.append(c)
            elif depth < max_depth:
                walk(c, depth + 1)

    walk(src, 1)
    return found


@dataclass
class ImportSummary:
    """What :func:`import_openkbp` did: the case folders written and the patients skipped, each
    as ``(patient folder relative to the source, reason)``."""

    imported: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def text(self, out: Path | None = None) -> str:
        """A few lines for a person: counts, where the cases are, every skipped patient's reason."""
        where = ""
        if out is not None and self.imported:
            folders = sorted({str(p.parent) for p in self.imported})
            where = f" into {', '.join(folders)}" if len(folders) <= 4 else f" into {len(folders)} folders under {out}"
        lines = [f"imported {len(self.imported)} OpenKBP patient(s){where}"
                 + (f"; skipped {len(self.skipped)}:" if self.skipped else "")]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def import_openkbp(src: str | Path, out: str | Path, progress: bool = True) -> ImportSummary:
    """Import every patient of ``src`` (:func:`find_patients`) into ``out`` at its relative path, so
    each dataset split stays a data folder of its own (``out/train-pats/pt_1``). A patient that
    fails is skipped with its reason. Raises CaseError when ``src`` holds no patient and
    FileExistsError when a destination is not a case folder (nothing is overwritten)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CaseError(src, ".", "OpenKBP folder not found")
    patients = find_patients(src)
    if not patients:
        raise CaseError(src, ".", f"no OpenKBP patient folders (sub-folders holding {' or '.join(PATIENT_FILES)}) "
                                  f"found up to {MAX_DEPTH} levels down")
    summary = ImportSummary()
    for i, p in enumerate(patients, 1):
        rel = Path(p.name) if p == src else p.relative_to(src)
        t0 = time.perf_counter()
        try:
            summary.imported.append(import_openkbp_patient(p, out / rel))
            msg = f"{rel} -> {summary.imported[-1]} ({time.perf_counter() - t0:.1f} s)"
        except CaseError as e:
            reason = f"{e.file}: {e.problem}"
            summary.skipped.append((rel.as_posix(), reason))
            msg = f"{rel} skipped: {reason}"
        if progress:
            print(f"[{i}/{len(patients)}] {msg}", file=sys.stderr, flush=True)
    return summary
