"""``addiff data check``: list every problem of every case, never stopping at the first.

``check_case`` reads a case folder defensively (it never raises for bad data) and returns one
:class:`Problem` per defect found, each naming the case, the file (relative to the case folder)
and what is wrong, with a hint where one helps. ``check_dataset`` does that for every case
folder found under a data folder (recursively, so a folder of site sub-folders works too).

Note: SimpleITK (2.5, ITK 5.4) silently reads a truncated ``.nii.gz`` (the missing voxels come
back as zeros) and turns stored NaN/inf voxels into 0. So every NIfTI image is first read with
Python alone (:mod:`.nifti_raw`): the gzip stream must be complete and hold every voxel its header
announces (:func:`nifti_gz_problem`), and NaN/inf are counted in the raw float voxels
(:func:`nifti_nonfinite_count`). Only regular files inside the case folder are read, and an
image declaring more voxels than ``limits.max_voxels()`` is refused from its header
(:mod:`.limits`). Hidden folders (names starting with '.') are skipped, each named as a problem.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from .case_io import (BODY_NAME, CASE_DIR_RULE, Plan, hidden_case_dirs, is_case_dir, plan_from_dict, read_case_yaml,
                      read_dicom_info)
from .contract import OAR_NAMES
from .errors import CaseError
from .limits import file_problem, image_size_problem
from .nifti_raw import read_nifti_raw

# A structure (mask file) name: a letter, then letters, digits, '_' or '-' (no spaces, no dots).
STRUCTURE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
CT_MAX_HU = 5000.0       # HU; metal on extended-scale scanners exceeds it in a few voxels (OpenKBP pt_171: 34)
CT_HIGH_FRACTION = 1e-3  # ... so a CT is flagged only when more than 0.1% of its voxels do
DOSE_MAX_GY = 150.0
CGY_FACTOR = 3.0        # max dose > 3 x highest prescription: probably cGy
LOW_DOSE_FACTOR = 0.3   # max dose < 0.3 x highest prescription: units / normalisation?
TARGET_MEDIAN_FACTOR = 0.5  # median dose in the primary target < 0.5 x its prescription: misaligned?
NEGATIVE_DOSE_TOL = -1e-3   # Gy; resampling may leave tiny negative round-off
HIDDEN_CASE = ("hidden folder (its name starts with '.'): skipped, neither checked nor used for training; "
               "rename it without the leading '.' to use it as a case")


def _offset_ct(hu: np.ndarray, lo: float) -> bool:
    """Whether a CT whose minimum is >= 0 holds raw CT numbers (+1024) rather than HU, from the
    body's HU distribution: a body (voxels >= 500 above the image's lowest value, air) on >= 5 % of
    the image, or an image that is mostly >= 500. A water phantom in HU (all about 0) is neither."""
    return bool(np.median(hu) >= 500 or np.count_nonzero(hu >= lo + 500) >= 0.05 * hu.size)


@dataclass
class Problem:
    """One defect: ``case`` (case folder), ``file`` (relative to it) and a readable message."""

    case: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.file}: {self.message}"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    """Compact numbers / tuples for messages."""
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return str(int(round(v))) if abs(v) >= 1000 and np.isfinite(v) else f"{v:.4g}"
    return str(v)


def _inside(path: Path, folder: Path) -> bool:
    """True if ``path``, with every symbolic link resolved, lies inside ``folder`` (resolved)."""
    try:
        real, base = path.resolve(), folder.resolve()
    except (OSError, RuntimeError):
        return False
    return base in real.parents


def _near_names(case_dir: Path, rel: str) -> list[str]:
    """Files that look like a misnamed ``rel`` (other case or extension), for hints."""
    stem = rel.split(".")[0].lower()
    folder = (case_dir / rel).parent
    try:
        return sorted(p.name for p in folder.iterdir()
                      if p.name != Path(rel).name and p.name.split(".")[0].lower() == stem)
    except OSError:
        return []


def _grid_differences(img: sitk.Image, ct: sitk.Image, tol: float = 1e-3) -> list[str]:
    out = []
    if img.GetSize() != ct.GetSize():
        out.append(f"size {_fmt(img.GetSize())} vs CT {_fmt(ct.GetSize())}")
        if img.GetDimension() != ct.GetDimension():
            return out
    for what, a, b in (("spacing", img.GetSpacing(), ct.GetSpacing()),
                       ("origin", img.GetOrigin(), ct.GetOrigin()),
                       ("direction", img.GetDirection(), ct.GetDirection())):
        if not np.allclose(a, b, atol=tol):
            out.append(f"{what} {_fmt(a)} vs CT {_fmt(b)}")
    return out


def _canonical_twin(name: str) -> str | None:
    """The canonical OAR/Body name ``name`` is a misspelling of (case, '_', '-' ignored), if any."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for canon in OAR_NAMES + (BODY_NAME,):
        if key == canon.lower() and name != canon:
            return canon
    return None


class _Checker:
    """Collects the problems of one case folder."""

    def __init__(self, case_dir: Path, images: dict[str, sitk.Image] | None = None):
        self.dir = case_dir
        self.case = str(case_dir)
        self.problems: list[Problem] = []
        self.nonfinite: dict[str, int] = {}  # rel -> NaN/inf voxels stored in the file
        self.images = images  # rel -> every image read (for a loader that need not read it again)

    def add(self, file: str, message: str) -> None:
        self.problems.append(Problem(self.case, file, message))

    # ---- images --------------------------------------------------------------------------
    def read(self, rel: str, required: bool) -> sitk.Image | None:
        """Read an image, recording missing/unreadable/truncated; None if unusable."""
        path = self.dir / rel
        if not os.path.lexists(path):
            if required:
                near = _near_names(self.dir, rel)
                hint = f" (found {', '.join(near)}: save it as {Path(rel).name})" if near else ""
                self.add(rel, f"missing{hint}")
            return None
        refused = file_problem(path, self.dir) or image_size_problem(path)  # before any voxel is read
        if refused:
            self.add(rel, refused)
            return None
        if rel.endswith((".nii.gz", ".nii")):
            raw = read_nifti_raw(path)
            if raw.problem:
                self.add(rel, f"unreadable image: {raw.problem}")
                return None
            if raw.dtype:  # SimpleITK reads NaN/inf as 0: count them in the raw voxels
                a = np.frombuffer(raw.data, dtype=raw.dtype, count=raw.count, offset=raw.offset)
                self.nonfinite[rel] = int(a.size - np.count_nonzero(np.isfinite(a)))
            del raw
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else "")
            self.add(rel, f"unreadable or truncated image ({detail[:160]})")
            return None
        except Exception as e:  # noqa: BLE001 - never raise for bad data
            self.add(rel, f"unreadable image ({type(e).__name__}: {e})")
            return None
        if img.GetDimension() != 3:
            self.add(rel, f"must be a 3-D image, got {img.GetDimension()}-D")
            return None
        if img.GetNumberOfComponentsPerPixel() != 1:
            self.add(rel, f"must be a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
            return None
        return img if self.images is None else self.images.setdefault(rel, img)  # kept for the loader

    def _report_nonfinite(self, rel: str, finite: np.ndarray) -> bool:
        """Report NaN/inf voxels (counted in the raw file: SimpleITK reads them as 0).
        Returns True when no voxel is finite."""
        n = max(self.nonfinite.get(rel, 0), int(finite.size - np.count_nonzero(finite)))
        if n:
            self.add(rel, f"{n} voxel(s) are NaN/inf (SimpleITK silently reads them as 0)")
        return n >= finite.size

    def on_grid(self, rel: str, img: sitk.Image, ct: sitk.Image | None) -> bool:
        if ct is None:
            return True
        diffs = _grid_differences(img, ct)
        if diffs:
            self.add(rel, "not on the CT grid: " + "; ".join(diffs) + " (resample it onto ct.nii.gz)")
            return False
        return True

    def binary_mask(self, rel: str, arr: np.ndarray) -> np.ndarray | None:
        """Check a mask's values; returns the boolean mask (even if non-binary) or None."""
        if self.nonfinite.get(rel) or not np.all(np.isfinite(arr)):
            self.add(rel, "mask contains NaN/inf values")
            return None
        odd = (arr != 0) & (arr != 1)
        if odd.any():
            extra = np.unique(arr[odd]).tolist()
            shown = ", ".join(_fmt(v) for v in extra[:5]) + (", ..." if len(extra) > 5 else "")
            self.add(rel, f"not a binary mask: values other than 0/1 ({shown}); save as 0/1 uint8")
        return arr > 0

    # ---- parts ----------------------------------------------------------------------------
    def plan(self) -> tuple[Plan | None, dict[str, float]]:
        """Read plan.yaml -> (validated Plan or None, usable prescriptions even if the plan
        is otherwise invalid)."""
        if not os.path.lexists(self.dir / "plan.yaml"):
            near = _near_names(self.dir, "plan.yaml")
            hint = f" (found {', '.join(near)}: save it as plan.yaml)" if near else ""
            self.add("plan.yaml", f"missing{hint}")
            return None, {}
        try:
            raw = read_case_yaml(self.dir, "plan.yaml")  # a regular file inside the case, safe YAML
        except CaseError as e:
            self.add("plan.yaml", e.problem)
            return None, {}
        rx: dict[str, float] = {}
        if isinstance(raw, Mapping) and isinstance(raw.get("prescriptions"), Mapping):
            for k, v in raw["prescriptions"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and 0 < v <= 150:
                    rx[str(k)] = float(v)
        try:
            plan = plan_from_dict(raw, self.case)
        except CaseError as e:
            self.add("plan.yaml", e.problem)
            return None, rx
        except Exception as e:  # noqa: BLE001
            self.add("plan.yaml", f"invalid plan ({type(e).__name__}: {e})")
            return None, rx
        return plan, dict(plan.prescriptions)

    def ct(self) -> sitk.Image | None:
        ct = self.read("ct.nii.gz", required=True)
        if ct is None:
            return None
        a = sitk.GetArrayViewFromImage(ct)
        finite = np.isfinite(a)
        if self._report_nonfinite("ct.nii.gz", finite):
            return ct
        if finite.any():
            lo, hi = float(a[finite].min()), float(a[finite].max())
            if lo >= 0 and _offset_ct(a[finite], lo):
                self.add("ct.nii.gz", f"does not look like HU: minimum is {_fmt(lo)} >= 0 (air should be about "
                                      f"-1000 HU); raw CT numbers with a +1024 offset? subtract 1024 (or apply "
                                      f"the DICOM rescale slope/intercept)")
            n_high = int(np.count_nonzero(a > CT_MAX_HU))
            if n_high > CT_HIGH_FRACTION * a.size:  # a few metal voxels (extended HU scale) are fine
                self.add("ct.nii.gz", f"does not look like HU: {n_high} voxels ({100 * n_high / a.size:.2g}%) are "
                                      f"above {CT_MAX_HU:g} HU, maximum {_fmt(hi)} (more than metal implants "
                                      f"explain; unscaled values? apply the DICOM rescale slope/intercept)")
        return ct

    def masks(self, ct: sitk.Image | None, rx: dict[str, float]) -> dict[str, np.ndarray]:
        mdir = self.dir / "masks"
        found: dict[str, np.ndarray] = {}
        if not mdir.exists():
            return found
        if not mdir.is_dir():
            self.add("masks", "must be a folder of <STRUCTURE>.nii.gz files")
            return found
        try:
            entries = sorted(mdir.iterdir())
        except OSError as e:
            self.add("masks", f"cannot list: {e}")
            return found
        for p in entries:
            rel = f"masks/{p.name}"
            if p.name.startswith("."):
                continue
            if not p.name.endswith(".nii.gz"):
                self.add(rel, "not a .nii.gz mask: ignored by the loader (convert it to NIfTI .nii.gz)")
                continue
            name = p.name[: -len(".nii.gz")]
            if not STRUCTURE_NAME_RE.fullmatch(name):
                self.add(rel, f"{name!r} is not a valid structure name (a letter, then letters, digits, "
                              f"'_' or '-'; no spaces or dots)")
            else:
                twin = _canonical_twin(name)
                if twin:
                    self.add(rel, f"{name!r} looks like {twin} but is not spelled canonically: rename to "
                                  f"masks/{twin}.nii.gz or the model will not use it")
            img = self.read(rel, required=True)
            if img is None:
                continue
            arr = sitk.GetArrayViewFromImage(img)
            m = self.binary_mask(rel, arr)
            if m is None:
                continue
            if not m.any():
                if name in rx:
                    self.add(rel, f"empty target: {name} is prescribed {_fmt(rx[name])} Gy but its mask has no voxels")
                else:
                    self.add(rel, "empty mask (no voxel set)")
            if self.on_grid(rel, img, ct):
                found[name] = m
        return found

    def dose(self, ct: sitk.Image | None, plan: Plan | None, rx: dict[str, float],
             masks: dict[str, np.ndarray]) -> None:
        rel = "dose.nii.gz"
        if not (self.dir / rel).exists():
            near = _near_names(self.dir, rel)
            if near:  # the dose is optional, but a misnamed one is a mistake
                self.add(rel, f"missing, but found {', '.join(near)}: save it as dose.nii.gz")
            return
        img = self.read(rel, required=True)
        if img is None:
            return
        on_grid = self.on_grid(rel, img, ct)
        a = sitk.GetArrayViewFromImage(img)
        finite = np.isfinite(a)
        if self._report_nonfinite(rel, finite) or not finite.any():
            return
        d = np.where(finite, a, 0).astype(np.float32)
        lo, hi = float(d.min()), float(d.max())
        if lo < NEGATIVE_DOSE_TOL:
            self.add(rel, f"negative dose: minimum {_fmt(lo)} Gy in {int((d < NEGATIVE_DOSE_TOL).sum())} voxel(s)")
        rx_max = max(rx.values()) if rx else None
        if (rx_max and hi > CGY_FACTOR * rx_max) or hi > DOSE_MAX_GY:
            ref = (f"{CGY_FACTOR:g} x the highest prescription ({_fmt(rx_max)} Gy)" if rx_max and hi > CGY_FACTOR * rx_max
                   else f"{DOSE_MAX_GY:g} Gy")
            self.add(rel, f"maximum dose {_fmt(hi)} Gy is above {ref}: looks like cGy; divide by 100")
            return
        if rx_max and hi < LOW_DOSE_FACTOR * rx_max:
            hint = "wrong units or normalisation?"
            fx = plan.fractions if plan is not None else None
            if fx and fx > 1 and 0.5 * rx_max / fx <= hi <= 2.0 * rx_max / fx:
                hint = f"looks like the dose of one fraction: multiply by the {fx} fractions"
            self.add(rel, f"maximum dose {_fmt(hi)} Gy is far below the prescription ({_fmt(rx_max)} Gy, "
                          f"< {LOW_DOSE_FACTOR:g} x): {hint}")
            return
        if on_grid and rx_max:
            primary = max(rx, key=lambda k: rx[k])
            m = masks.get(primary)
            if m is not None and m.any():
                med = float(np.median(d[m]))
                if med < TARGET_MEDIAN_FACTOR * rx[primary]:
                    self.add(rel, f"median dose in {primary} is {_fmt(med)} Gy, under {TARGET_MEDIAN_FACTOR:g} x its "
                                  f"prescription ({_fmt(rx[primary])} Gy) although the maximum is {_fmt(hi)} Gy: "
                                  f"dose misaligned with the CT/masks (flipped or transposed axes, wrong origin)?")

    def possible_dose_mask(self, ct: sitk.Image | None) -> None:
        rel = "possible_dose_mask.nii.gz"
        if not (self.dir / rel).exists():
            return
        img = self.read(rel, required=True)
        if img is None:
            return
        self.on_grid(rel, img, ct)
        m = self.binary_mask(rel, sitk.GetArrayViewFromImage(img))
        if m is not None and not m.any():
            self.add(rel, "empty mask (no voxel may receive dose)")

    def dicom_info(self) -> None:
        """dicom.yaml (import-dicom's identifiers, read by export-dicom and predict --rtdose)."""
        try:
            read_dicom_info(self.dir)
        except CaseError as e:
            self.add(e.file, e.problem)

    def run(self) -> list[Problem]:
        if not self.dir.exists():
            self.add(".", "case folder not found")
            return self.problems
        if not self.dir.is_dir():
            self.add(".", "not a folder")
            return self.problems
        if self.dir.is_symlink() and not _inside(self.dir, self.dir.parent):
            self.add(".", "is a symbolic link to a folder outside the data folder; not read")
            return self.problems
        plan, rx = self.plan()
        ct = self.ct()
        masks = self.masks(ct, rx)
        mask_files = {p.name[: -len(".nii.gz")] for p in (self.dir / "masks").glob("*.nii.gz")} \
            if (self.dir / "masks").is_dir() else set()
        for target in rx:
            if target not in mask_files:
                self.add("plan.yaml", f"prescribes {_fmt(rx[target])} Gy to {target} but masks/{target}.nii.gz is missing")
        self.dose(ct, plan, rx, masks)
        self.possible_dose_mask(ct)
        self.dicom_info()
        return self.problems


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------
def check_case(case_dir: str | Path, images: dict[str, sitk.Image] | None = None) -> list[Problem]:
    """Every problem of one case folder (an empty list for a good case). Never raises for bad
    data: an unexpected error while checking is itself reported as a Problem. ``images`` (if given)
    receives the images read, so that ``case_io.load_case(..., images=)`` does not read them again."""
    checker = _Checker(Path(case_dir), images)
    try:
        return checker.run()
    except Exception as e:  # noqa: BLE001 - a checker must not crash on bad input
        checker.add(".", f"internal error while checking this case ({type(e).__name__}: {e})")
        return checker.problems


def _walk_cases(root: Path) -> tuple[list[Path], list[Path]]:
    """(case folders, hidden case folders skipped) under ``root``, recursively, sorted."""
    out: list[Path] = []
    hidden: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        d = Path(dirpath)
        if is_case_dir(d):
            out.append(d)
            dirnames[:] = []
            continue
        hidden += hidden_case_dirs(d)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
    return sorted(out), sorted(hidden)


def find_cases(data_dir: str | Path) -> list[Path]:
    """Case folders under ``data_dir`` (itself included), recursively, sorted; hidden folders
    (names starting with '.') are skipped (``check_dataset`` names those holding a case) and a
    case folder is not searched further."""
    return _walk_cases(Path(data_dir))[0]


def check_dataset(data_dir: str | Path) -> tuple[int, list[Problem]]:
    """Check every case folder found under ``data_dir`` -> (number of cases, all problems).

    Never raises: a missing data folder, or one without cases, is reported as a Problem.
    """
    root = Path(data_dir)
    if not root.is_dir():
        return 0, [Problem(str(root), ".", "data folder not found" if not root.exists() else "not a folder")]
    try:
        cases, hidden = _walk_cases(root)
    except Exception as e:  # noqa: BLE001
        return 0, [Problem(str(root), ".", f"cannot list the data folder ({type(e).__name__}: {e})")]
    problems = [Problem(str(h), ".", HIDDEN_CASE) for h in hidden]
    if not cases:
        return 0, problems + [Problem(str(root), ".", f"no case folders found (each is {CASE_DIR_RULE})")]
    for c in cases:
        problems.extend(check_case(c))
    return len(cases), problems
