"""The case format: the contract every other part of addiff-fl uses.

One folder per case::

    CASE/
      ct.nii.gz                 CT in HU
      dose.nii.gz               dose in Gy (absent for a case to be predicted)
      masks/<STRUCTURE>.nii.gz  binary masks on the CT grid
      possible_dose_mask.nii.gz optional: voxels that may receive dose (OpenKBP)
      plan.yaml                 tumour site, prescriptions, fractions, technique, beams

Images are read and written with SimpleITK; geometry (spacing, origin, direction) is kept.
Arrays are returned in SimpleITK's numpy order (z, y, x).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import SimpleITK as sitk
import yaml

from .contract import B_MAX, TECHNIQUES, TUMOUR_SITES
from .errors import CaseError
from .limits import file_problem, image_size_problem

BODY_NAME = "Body"
CASE_MARKERS = ("plan.yaml", "ct.nii.gz")  # a folder holding either is a case folder (is_case_dir)
CASE_DIR_RULE = "a folder holding " + " or ".join(CASE_MARKERS)  # is_case_dir in words, for messages
DICOM_INFO_FILE = "dicom.yaml"  # written by data import-dicom (dicom/reader.py)
_DICOM_INFO_PARTS = ("patient", "study", "rtplan")


@dataclass(frozen=True)
class Beam:
    """One static field (IMRT) or one arc (VMAT: gantry_start -> gantry_stop), angles in degrees."""

    gantry: float
    couch: float = 0.0
    energy_mv: float = 6.0
    gantry_stop: float | None = None  # set for VMAT arcs

    @property
    def is_arc(self) -> bool:
        return self.gantry_stop is not None

    def control_points(self, arc_step_deg: float = 10.0) -> list["Beam"]:
        """This beam as static beams: itself, or an arc sampled every ``arc_step_deg`` degrees."""
        if not self.is_arc:
            return [self]
        span = (self.gantry_stop - self.gantry) % 360.0 or 360.0
        n = max(2, int(math.ceil(span / arc_step_deg)) + 1)
        return [Beam(gantry=(self.gantry + span * k / (n - 1)) % 360.0, couch=self.couch, energy_mv=self.energy_mv)
                for k in range(n)]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"gantry": float(self.gantry), "couch": float(self.couch), "energy_mv": float(self.energy_mv)}
        if self.gantry_stop is not None:
            d = {"gantry_start": float(self.gantry), "gantry_stop": float(self.gantry_stop),
                 "couch": float(self.couch), "energy_mv": float(self.energy_mv)}
        return d


@dataclass(frozen=True)
class Plan:
    tumour_site: str
    prescriptions: dict[str, float]  # target structure name -> Gy
    fractions: int
    technique: str
    beams: tuple[Beam, ...]
    constraints: dict[str, Any] = field(default_factory=dict)  # optional overrides (see constraints.py)

    @property
    def max_prescription(self) -> float:
        return max(self.prescriptions.values())

    @property
    def targets(self) -> list[str]:
        """Target names, highest prescription first."""
        return sorted(self.prescriptions, key=lambda k: -self.prescriptions[k])

    def expanded_beams(self, arc_step_deg: float = 10.0) -> list[Beam]:
        """Static beams; each VMAT arc is sampled as control points every ``arc_step_deg``."""
        return [cp for b in self.beams for cp in b.control_points(arc_step_deg)]

    def to_dict(self) -> dict:
        d = {
            "tumour_site": self.tumour_site,
            "prescriptions": {k: float(v) for k, v in self.prescriptions.items()},
            "fractions": int(self.fractions),
            "technique": self.technique,
            "beams": [b.to_dict() for b in self.beams],
        }
        if self.constraints:
            d["constraints"] = dict(self.constraints)
        return d


MAX_ENERGY_MV = 25.0  # clinical photon beams: 4-25 MV
MAX_FRACTIONS = 100
MAX_BEAMS = B_MAX  # the model's beam rows (control points), far above any plan's field count


def _short(v: Any, n: int = 60) -> str:
    """repr() of a user value, cut to ``n`` characters (a value can be huge)."""
    r = repr(v) if isinstance(v, (int, float, str, bool, type(None))) else f"a {type(v).__name__}"
    return r if len(r) <= n else r[:n] + "..."


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def plan_from_dict(d: Any, case: str | Path = "<plan>") -> Plan:
    """Validate a plan mapping; raises CaseError naming plan.yaml and the field."""

    def bad(msg: str) -> CaseError:
        return CaseError(case, "plan.yaml", msg)

    if not isinstance(d, Mapping):
        raise bad("must be a mapping of plan fields")
    for key in ("tumour_site", "prescriptions", "fractions", "technique", "beams"):
        if key not in d or d[key] is None:
            raise bad(f"missing field '{key}'")
    site = d["tumour_site"]
    if site not in TUMOUR_SITES:
        raise bad(f"tumour_site must be one of {', '.join(TUMOUR_SITES)}; got {_short(site)}")
    rx = d["prescriptions"]
    if not isinstance(rx, Mapping) or not rx:
        raise bad("prescriptions must map target names to doses in Gy, e.g. {PTV70: 70}")
    for name, val in rx.items():
        if not _num(val) or float(val) <= 0:
            raise bad(f"prescription for {str(name)[:60]} must be a positive dose in Gy, got {_short(val)}")
        if float(val) > 150:
            raise bad(f"prescription for {str(name)[:60]} is {val} Gy: implausible (cGy given instead of Gy?)")
    fx = d["fractions"]
    if isinstance(fx, bool) or not isinstance(fx, int) or fx <= 0:
        raise bad(f"fractions must be a positive integer, got {_short(fx)}")
    if fx > MAX_FRACTIONS:
        raise bad(f"fractions is {fx}: implausible (at most {MAX_FRACTIONS})")
    tech = d["technique"]
    if tech not in TECHNIQUES:
        raise bad(f"technique must be IMRT or VMAT, got {_short(tech)}")
    beams_raw = d["beams"]
    if not isinstance(beams_raw, list) or not beams_raw:
        raise bad("beams must be a non-empty list")
    if len(beams_raw) > MAX_BEAMS:
        raise bad(f"{len(beams_raw)} beams: at most {MAX_BEAMS}")
    beams = []
    for i, b in enumerate(beams_raw):
        if not isinstance(b, Mapping):
            raise bad(f"beams[{i}] must be a mapping")
        energy = b.get("energy_mv", 6.0)
        couch = b.get("couch", 0.0)
        if not _num(energy) or not 0 < float(energy) <= MAX_ENERGY_MV:
            raise bad(f"beams[{i}].energy_mv must be a photon energy in (0, {MAX_ENERGY_MV:g}] MV, got {_short(energy)}")

        def angle(key: str, v: Any) -> float:
            if not _num(v) or abs(float(v)) > 360:
                raise bad(f"beams[{i}].{key} must be an angle in degrees in [-360, 360], got {_short(v)}")
            return float(v)

        couch = angle("couch", couch)
        if "gantry_start" in b or "gantry_stop" in b:
            g0, g1 = angle("gantry_start", b.get("gantry_start")), angle("gantry_stop", b.get("gantry_stop"))
            beams.append(Beam(g0 % 360, couch, float(energy), g1 % 360))
        else:
            beams.append(Beam(angle("gantry", b.get("gantry")) % 360, couch, float(energy)))
    constraints = d.get("constraints") or {}
    if not isinstance(constraints, Mapping):
        raise bad("constraints must be a mapping")
    plan = Plan(tumour_site=site, prescriptions={str(k): float(v) for k, v in rx.items()}, fractions=fx,
                technique=tech, beams=tuple(beams), constraints=dict(constraints))
    if constraints:
        from .constraints import constraints_for_plan

        try:
            constraints_for_plan(plan)
        except ValueError as e:
            raise bad(str(e)[:300]) from None
    return plan


def case_file(case_dir: str | Path, rel: str) -> Path:
    """``case_dir/rel`` if it may be read: present, a regular file inside the case folder
    (:func:`limits.file_problem`: no FIFO, device or link out of the case).

    Raises:
        CaseError: missing or refused, naming the file.
    """
    path = Path(case_dir) / rel
    if not os.path.lexists(path):
        raise CaseError(case_dir, rel, "missing")
    refused = file_problem(path, case_dir)
    if refused:
        raise CaseError(case_dir, rel, refused)
    return path


def read_case_yaml(case_dir: str | Path, rel: str) -> Any:
    """A YAML file of a case folder (``plan.yaml``, ``dicom.yaml``) as plain data, through the one
    safe loader (``yamlsafe``); only a regular file inside the case folder is read.

    Raises:
        CaseError: missing, not a regular file inside the case, unreadable or refused YAML.
    """
    from . import yamlsafe

    case_dir = Path(case_dir)
    p = case_file(case_dir, rel)
    try:
        return yamlsafe.load_file(p)
    except yamlsafe.YamlRefused as e:
        raise CaseError(case_dir, rel, str(e)) from None
    except OSError as e:
        raise CaseError(case_dir, rel, f"cannot read ({e.strerror})") from None


def read_plan(case_dir: str | Path) -> Plan:
    return plan_from_dict(read_case_yaml(case_dir, "plan.yaml"), case_dir)


def read_dicom_info(case_dir: str | Path) -> dict[str, Any]:
    """``CASE/dicom.yaml`` (the DICOM identifiers ``data import-dicom`` keeps) as a mapping whose
    ``patient``, ``study`` and ``rtplan`` entries are mappings; {} for a case without one.

    Raises:
        CaseError: the file is refused (see :func:`read_case_yaml`) or not shaped as written.
    """
    if not os.path.lexists(Path(case_dir) / DICOM_INFO_FILE):
        return {}
    info = read_case_yaml(case_dir, DICOM_INFO_FILE)
    if info is None:
        return {}
    if not isinstance(info, Mapping) or any(not isinstance(info.get(k) or {}, Mapping) for k in _DICOM_INFO_PARTS):
        raise CaseError(case_dir, DICOM_INFO_FILE, f"must be a mapping whose {', '.join(_DICOM_INFO_PARTS)} are "
                                                   f"mappings (as data import-dicom writes it)")
    return dict(info)


def write_plan(case_dir: str | Path, plan: Plan) -> None:
    Path(case_dir).mkdir(parents=True, exist_ok=True)
    (Path(case_dir) / "plan.yaml").write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def read_image(case_dir: str | Path, rel: str, images: Mapping[str, sitk.Image] | None = None) -> sitk.Image:
    """``case_dir/rel``; ``images``: images already read (``checks.check_case``) are taken from it
    (after the same path checks) instead of being read again."""
    path = case_file(case_dir, rel)
    if images is not None and rel in images:
        return images[rel]
    refused = image_size_problem(path)  # from the header, before SimpleITK allocates the voxels
    if refused:
        raise CaseError(case_dir, rel, refused)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        detail = next((m for m in msg if "ERROR" in m or "error" in m), msg[-1] if msg else "")
        raise CaseError(case_dir, rel, f"unreadable or truncated image ({detail.strip()[:120]})") from None


def write_image(path: str | Path, array: np.ndarray, reference: sitk.Image | None = None,
                spacing=None, origin=None, direction=None) -> None:
    """Write a (z, y, x) array as NIfTI with the geometry of ``reference`` (or the given one)."""
    img = sitk.GetImageFromArray(array)
    if reference is not None:
        img.CopyInformation(reference)
    else:
        if spacing is not None:
            img.SetSpacing([float(s) for s in spacing])
        if origin is not None:
            img.SetOrigin([float(o) for o in origin])
        if direction is not None:
            img.SetDirection([float(d) for d in direction])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def list_masks(case_dir: str | Path) -> dict[str, Path]:
    mdir = Path(case_dir) / "masks"
    if not mdir.is_dir():
        return {}
    return {p.name[: -len(".nii.gz")]: p for p in sorted(mdir.glob("*.nii.gz"))}


@dataclass
class Case:
    """A case in memory: images as SimpleITK objects (geometry included) plus the plan."""

    case_id: str
    path: Path
    ct: sitk.Image
    plan: Plan
    masks: dict[str, sitk.Image]
    dose: sitk.Image | None = None
    possible_dose_mask: sitk.Image | None = None

    def array(self, what: str) -> np.ndarray:
        """'ct', 'dose', 'possible_dose_mask' or a structure name -> (z, y, x) numpy array."""
        if what == "ct":
            return sitk.GetArrayFromImage(self.ct).astype(np.float32)
        if what == "dose":
            return None if self.dose is None else sitk.GetArrayFromImage(self.dose).astype(np.float32)
        if what == "possible_dose_mask":
            return None if self.possible_dose_mask is None else sitk.GetArrayFromImage(self.possible_dose_mask) > 0
        return sitk.GetArrayFromImage(self.masks[what]) > 0

    @property
    def voxel_volume_cc(self) -> float:
        sx, sy, sz = self.ct.GetSpacing()
        return sx * sy * sz / 1000.0


def load_case(case_dir: str | Path, require_dose: bool = False,
              images: Mapping[str, sitk.Image] | None = None) -> Case:
    """Read a case folder. Raises CaseError (case, file, problem) on the first problem found.

    Full validation with every problem listed lives in ``addiff_core.checks``; this only checks
    what the loader needs (readable files, same grid, masks named by the plan exist).
    ``images``: what ``checks.check_case`` read (relative path -> image), not read again.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise CaseError(case_dir, ".", "case folder not found")
    plan = read_plan(case_dir)
    ct = read_image(case_dir, "ct.nii.gz", images)
    masks = {}
    for name, p in list_masks(case_dir).items():
        img = read_image(case_dir, f"masks/{p.name}", images)
        if not same_grid(img, ct):
            raise CaseError(case_dir, f"masks/{p.name}", "not on the CT grid (size/spacing/origin/direction differ)")
        masks[name] = img
    for t in plan.prescriptions:
        if t not in masks:
            raise CaseError(case_dir, "plan.yaml", f"names target {t} but masks/{t}.nii.gz is missing")
    dose = None
    if (case_dir / "dose.nii.gz").exists():
        dose = read_image(case_dir, "dose.nii.gz", images)
        if not same_grid(dose, ct):
            raise CaseError(case_dir, "dose.nii.gz", "not on the CT grid (size/spacing/origin/direction differ)")
    elif require_dose:
        raise CaseError(case_dir, "dose.nii.gz", "missing (a reference dose is needed for training/evaluation)")
    pdm = None
    if (case_dir / "possible_dose_mask.nii.gz").exists():
        pdm = read_image(case_dir, "possible_dose_mask.nii.gz", images)
        if not same_grid(pdm, ct):
            raise CaseError(case_dir, "possible_dose_mask.nii.gz", "not on the CT grid")
    return Case(case_id=case_dir.name, path=case_dir, ct=ct, plan=plan, masks=masks, dose=dose, possible_dose_mask=pdm)


def save_case(case_dir: str | Path, ct: np.ndarray, plan: Plan, masks: Mapping[str, np.ndarray],
              dose: np.ndarray | None = None, possible_dose_mask: np.ndarray | None = None,
              spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    """Write a case from (z, y, x) arrays. ``spacing``/``origin`` are in SimpleITK (x, y, z) order."""
    case_dir = Path(case_dir)
    (case_dir / "masks").mkdir(parents=True, exist_ok=True)
    geo = dict(spacing=spacing, origin=origin, direction=direction)
    write_image(case_dir / "ct.nii.gz", np.asarray(ct, dtype=np.int16 if np.issubdtype(np.asarray(ct).dtype, np.integer) else np.float32), **geo)
    for name, m in masks.items():
        write_image(case_dir / "masks" / f"{name}.nii.gz", np.asarray(m).astype(np.uint8), **geo)
    if dose is not None:
        write_image(case_dir / "dose.nii.gz", np.asarray(dose, dtype=np.float32), **geo)
    if possible_dose_mask is not None:
        write_image(case_dir / "possible_dose_mask.nii.gz", np.asarray(possible_dose_mask).astype(np.uint8), **geo)
    write_plan(case_dir, plan)
    return case_dir


def is_case_dir(p: str | Path) -> bool:
    """Is ``p`` a case folder (:data:`CASE_DIR_RULE`)? The one rule: data check, training,
    predict and the output checks all ask this."""
    p = Path(p)
    return p.is_dir() and any((p / m).exists() for m in CASE_MARKERS)


CASE_ENTRIES = frozenset({"ct.nii.gz", "dose.nii.gz", "possible_dose_mask.nii.gz", "plan.yaml", "masks"})
"""What :func:`save_case` writes into a case folder."""


def only_case_entries(folder: str | Path, extra: Iterable[str] = ()) -> bool:
    """Is ``folder`` a directory holding nothing but what an importer writes into a case
    (:data:`CASE_ENTRIES` and its own ``extra`` files)? Only such a folder may be replaced."""
    folder, allowed = Path(folder), CASE_ENTRIES | set(extra)
    return folder.is_dir() and all(p.name in allowed for p in folder.iterdir())


def list_cases(data_dir: str | Path) -> list[Path]:
    """Case folders (:func:`is_case_dir`) directly under data_dir, sorted by name. Hidden folders
    (names starting with '.', e.g. an import in progress) are not cases: see
    :func:`hidden_case_dirs`, which names them so that none is skipped silently."""
    return sorted(p for p in Path(data_dir).iterdir() if not p.name.startswith(".") and is_case_dir(p))


def hidden_case_dirs(data_dir: str | Path) -> list[Path]:
    """Folders under data_dir that hold case files but whose name starts with '.': skipped."""
    return sorted(p for p in Path(data_dir).iterdir() if p.name.startswith(".") and is_case_dir(p))


@contextlib.contextmanager
def staged_case_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` to write a case into; when the block ends without an
    error it replaces ``out_dir`` (one rename), otherwise it is removed. An importer that fails
    half-way never leaves a half-written case folder behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
