"""The GDP-HMM files beside the plans: ``meta_data.csv`` and ``PTV_DICT.json``, and the layout facts
the importer takes from the challenge repository (RiqiangGao/GDP-HMM_AAPMChallenge).

* ``meta_data.csv``: one row per plan, columns ``PID, PlanID, isVMAT, cohort, site, phase,
  npz_path`` (data_loader.py reads ``npz_path``, ``site``, ``cohort`` and ``phase``). ``site`` is
  the tumour site (1 head and neck, 2 lung: evaluation.ipynb's leaderboard cell, "lung site is
  PTV, HNC site is PTVHighOPT" with ``site == 1`` -> PTVHighOPT); ``cohort`` the data source.
  ``npz_path`` is a path on the organisers' machine: rows are matched to files by file name.
* ``PTV_DICT.json``: patient id -> ``PTV_High`` / ``PTV_Mid`` / ``PTV_Low``, each with
  ``OPTName``, ``PDose`` (Gy) and, for Mid/Low (later versions also High), ``StructName``.
  The patient id of a plan is its file name up to the first ``+``, zero-padded to 3 characters
  (data_loader.py: ``PatientID = ID.split('+')[0]``; ``f"{PatientID:0>3}"`` when shorter).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError

DEFAULT_SPACING_XYZ = (2.5, 2.5, 2.0)
"""mm, SimpleITK (x, y, z) order: DICOM2NPZ.py ``__main__``, ``img_spac = [2.5, 2.5, 2]`` passed to
``resample_img`` (CT resampled, masks and dose onto it). Used when a plan's dict has no
``spacing`` of its own (DICOM2NPZ.get_npz_dict_ref_CT stores ``CT.GetSpacing()`` there)."""
TUMOUR_SITE_OF = {1: "head_neck", 2: "lung"}
"""meta_data.csv ``site`` -> the project's tumour site (see the module doc)."""
LEADERBOARD_PTV_HIGH = {"head_neck": "PTVHighOPT", "lung": "PTV"}
"""The structure the leaderboard cell of evaluation.ipynb normalises D97 in, per tumour site."""
LEVELS = ("PTV_High", "PTV_Mid", "PTV_Low")
HELDOUT_PHASES = ("valid", "test", "external_test")  # data_loader.py's evaluation phases
MAX_JSON_BYTES = 64 << 20
MAX_CSV_BYTES = 64 << 20


def patient_id(plan_id: str) -> str:
    """PTV_DICT key of a plan file name (data_loader.py ``MyDataset.__getitem__``)."""
    pid = plan_id.split("+")[0]
    return f"{pid:0>3}" if len(pid) < 3 else pid


@dataclass(frozen=True)
class MetaRow:
    """One plan's row of meta_data.csv (values as written, ``None`` when the column is absent)."""

    plan_id: str
    site: str | None
    cohort: str | None
    phase: str | None

    @property
    def tumour_site(self) -> str | None:
        try:
            return TUMOUR_SITE_OF.get(int(float(self.site or "")))
        except ValueError:
            return None


def _small_file(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise UserError(f"{path}: {size} bytes; a {what} is at most {limit}")
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def read_meta(path: str | Path) -> dict[str, MetaRow]:
    """meta_data.csv -> plan id (file name without ``.npz``) -> row.

    Raises:
        UserError: unreadable, no ``npz_path`` column, or one plan listed twice (one line).
    """
    path = Path(path)
    text = _small_file(path, MAX_CSV_BYTES, "meta_data.csv").decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "npz_path" not in reader.fieldnames:
        raise UserError(f"{path}: no npz_path column (GDP-HMM's meta_data.csv has PID, PlanID, isVMAT, cohort, "
                        f"site, phase, npz_path)")
    rows: dict[str, MetaRow] = {}
    for i, r in enumerate(reader, start=2):
        name = str(r.get("npz_path") or "").replace("\\", "/").rsplit("/", 1)[-1]
        if not name.endswith(".npz"):
            raise UserError(f"{path}: line {i}: npz_path {name[:80]!r} does not name an .npz file")
        plan = name[: -len(".npz")]
        if plan in rows:
            raise UserError(f"{path}: line {i}: plan {plan[:80]} is listed twice")
        rows[plan] = MetaRow(plan, _cell(r, "site"), _cell(r, "cohort"), _cell(r, "phase"))
    return rows


def _cell(row: Mapping[str, Any], key: str) -> str | None:
    v = row.get(key)
    return None if v is None or str(v).strip() == "" else str(v).strip()


def read_ptv_dict(path: str | Path) -> dict[str, Any]:
    """PTV_DICT.json as a mapping of patient ids (checked per patient when used: :func:`levels`).

    Raises:
        UserError: unreadable, not JSON, or not a mapping (one line).
    """
    path = Path(path)
    try:
        doc = json.loads(_small_file(path, MAX_JSON_BYTES, "PTV_DICT.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: must map patient ids to their PTV_High/PTV_Mid/PTV_Low entries")
    return doc


@dataclass(frozen=True)
class Level:
    """One PTV level of a patient: its optimisation structure, clinical structure and dose."""

    level: str
    opt_name: str
    struct_name: str | None
    pdose_gy: float

    @property
    def target(self) -> str:
        """The structure that carries the prescription in the plan: the clinical PTV
        (``StructName``), else the OPT structure (data_loader.py does so for PTV_High)."""
        return self.struct_name or self.opt_name


def levels(ptv_dict: Mapping[str, Any], pid: str) -> list[Level]:
    """The patient's PTV levels, highest first (PTV_High, PTV_Mid, PTV_Low as present).

    Raises:
        ValueError: the patient is absent, has no PTV_High, or a level lacks OPTName/PDose or
            holds an implausible dose (the message names the patient and the field).
    """
    entry = ptv_dict.get(pid)
    if not isinstance(entry, Mapping):
        raise ValueError(f"PTV_DICT.json has no entry for patient {pid[:40]}")
    if not isinstance(entry.get("PTV_High"), Mapping):
        raise ValueError(f"PTV_DICT.json: patient {pid[:40]} has no PTV_High")
    out = []
    for lv in LEVELS:
        d = entry.get(lv)
        if d is None:
            continue
        if not isinstance(d, Mapping):
            raise ValueError(f"PTV_DICT.json: {pid[:40]}.{lv} must be a mapping")
        opt, struct, pdose = d.get("OPTName"), d.get("StructName"), d.get("PDose")
        if not isinstance(opt, str) or not opt:
            raise ValueError(f"PTV_DICT.json: {pid[:40]}.{lv} has no OPTName")
        if struct is not None and not isinstance(struct, str):
            raise ValueError(f"PTV_DICT.json: {pid[:40]}.{lv}.StructName must be a name")
        if isinstance(pdose, bool) or not isinstance(pdose, (int, float)) or not math.isfinite(pdose) \
                or not 0 < pdose <= 150:
            raise ValueError(f"PTV_DICT.json: {pid[:40]}.{lv}.PDose must be a dose in (0, 150] Gy, got {pdose!r:.40}")
        out.append(Level(lv, opt, struct or None, float(pdose)))
    return out


def find_beside(src: Path, name: str) -> Path | None:
    """``name`` in ``src`` or ``src/meta_files`` (the repository's layout), or None."""
    for p in (src / name, src / "meta_files" / name):
        if p.is_file():
            return p
    return None
