"""Structure names: a TPS's ROI names -> the project's (``contract.OAR_NAMES``, ``Body``, ``PTV<Gy>``).

Looked up by a normalised key (lower case, letters and digits only: ``Parotid_L`` = ``PAROTID-L``);
defaults cover TG-263 and common variants. A number in a target's name is a dose only next to a
unit (``PTV_70Gy``, ``PTV 5040cGy``) or when it matches a prescription (``PTV_70``, ``PTV_7000``
cGy): RayStation's ``PTV_1 ... PTV_5`` are not 1-5 Gy. A mapping file adds to or overrides the
defaults (``None`` drops a name); other names are kept as valid file names and reported as unused.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from ..case_io import BODY_NAME
from ..contract import OAR_NAMES

__all__ = ["DEFAULT_NAME_MAP", "normalise", "target_dose_from_name", "NameMapper", "infer_tumour_site",
           "unsupported_site", "site_from_text", "safe_structure_name"]

_ALIASES: dict[str, tuple[str, ...]] = {
    "Brainstem": ("Brainstem", "Brain_Stem", "BrainStem"),
    "SpinalCord": ("SpinalCord", "Spinal_Cord", "Cord"),
    "LeftParotid": ("Parotid_L", "L_Parotid", "LParotid", "Lt_Parotid", "Parotid_Lt", "Parotid_Left", "Left_Parotid"),
    "RightParotid": ("Parotid_R", "R_Parotid", "RParotid", "Rt_Parotid", "Parotid_Rt", "Parotid_Right", "Right_Parotid"),
    "Esophagus": ("Esophagus", "Oesophagus"),
    "Larynx": ("Larynx",),
    "Mandible": ("Mandible", "Bone_Mandible"),
    "LeftLung": ("Lung_L", "L_Lung", "LLung", "Lung_Lt", "Lt_Lung", "Lung_Left", "Left_Lung"),
    "RightLung": ("Lung_R", "R_Lung", "RLung", "Lung_Rt", "Rt_Lung", "Lung_Right", "Right_Lung"),
    "Heart": ("Heart",),
    "Rectum": ("Rectum",),
    "Bladder": ("Bladder",),
    "LeftFemoralHead": ("Femur_Head_L", "FemoralHead_L", "Femoral_Head_L", "L_FemoralHead", "Left_Femoral_Head",
                        "Femur_L", "FemurHead_Lt"),
    "RightFemoralHead": ("Femur_Head_R", "FemoralHead_R", "Femoral_Head_R", "R_FemoralHead", "Right_Femoral_Head",
                         "Femur_R", "FemurHead_Rt"),
    BODY_NAME: ("Body", "External", "Outline", "Skin", "Body_Contour", "BodyContour"),
}


def normalise(name: str) -> str:
    """The lookup key of a structure name: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


DEFAULT_NAME_MAP: dict[str, str] = {normalise(alias): canon for canon, aliases in _ALIASES.items() for alias in aliases}
DEFAULT_NAME_MAP.update({normalise(c): c for c in OAR_NAMES})

_TARGET_DOSE_RE = re.compile(r"^ptv[ _-]*(?:(c?gy)[ _-]*)?(\d+(?:[.,p]\d+)?)[ _-]*(c?gy)?$", re.IGNORECASE)
DOSE_MATCH_GY = 0.01  # a name's number matches a prescription within this (Gy)
_STRUCTURE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def target_dose_from_name(name: str, doses: Iterable[float] | None = None) -> float | None:
    """The dose (Gy) a target name carries: with a unit (``PTV_70Gy`` -> 70, ``PTV_5040cGy`` ->
    50.4), or without one when the number, in Gy or in cGy, is one of ``doses`` (the plan's or
    the mapping file's prescriptions: ``PTV_70`` or ``PTV_7000`` -> 70 when 70 Gy is prescribed)."""
    m = _TARGET_DOSE_RE.match(str(name).strip())
    if not m or (m.group(1) and m.group(3)):
        return None
    value = float(m.group(2).replace(",", ".").replace("p", "."))
    unit = (m.group(1) or m.group(3) or "").lower()
    if unit:
        value = value / 100.0 if unit == "cgy" else value
        return value if 0 < value <= 150 else None
    for cand in (value, value / 100.0):
        if 0 < cand <= 150 and any(d > 0 and abs(cand - d) <= DOSE_MATCH_GY for d in doses or ()):
            return cand
    return None


def _target_name(dose_gy: float) -> str:
    return "PTV" + f"{round(dose_gy, 2):g}".replace(".", "p")


def safe_structure_name(name: str) -> str:
    """``name`` as a valid structure (file) name: invalid characters -> ``_``, a letter first."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name).strip()).strip("_") or "ROI"
    if not s[0].isalpha():
        s = "S_" + s
    return s[:64]


class NameMapper:
    """Maps ROI names to the project's names; ``extra`` (a mapping file's ``structure_names``)
    overrides the defaults, a value of None drops the structure; ``doses`` (Gy, the plan's and the
    mapping file's prescriptions) confirm a unit-less number in a target's name as its dose."""

    def __init__(self, extra: Mapping[str, str | None] | None = None, doses: Iterable[float] = ()):
        self.map: dict[str, str | None] = dict(DEFAULT_NAME_MAP)
        self.map.update({normalise(k): v for k, v in (extra or {}).items()})
        self.doses = tuple(doses)

    def __call__(self, roi_name: str, interpreted_type: str = "") -> tuple[str | None, bool]:
        """-> (project name or None to drop, known): ``known`` is False for a name kept as-is."""
        key = normalise(roi_name)
        if key in self.map:
            return self.map[key], True
        dose = target_dose_from_name(roi_name, self.doses)
        if dose is not None:
            return _target_name(dose), True
        if str(interpreted_type).upper() == "EXTERNAL":
            return BODY_NAME, True
        return safe_structure_name(roi_name), False


_SITE_HINTS = {
    "head_neck": {"Brainstem", "LeftParotid", "RightParotid", "Larynx", "Mandible"},
    "lung": {"LeftLung", "RightLung", "Heart"},
    "prostate": {"Rectum", "Bladder", "LeftFemoralHead", "RightFemoralHead"},
}


_OTHER_SITES = (("breast", re.compile(r"breast|chestwall|areola|nipple")),
                ("brain", re.compile(r"^(whole)?brain(?!stem)|hippocamp")))


def unsupported_site(names: Iterable[str], text: str | None = "") -> tuple[str, list[str]] | None:
    """A tumour site the model does not know (breast, brain) that structure names or a plan's
    TreatmentSite point to -> (site, the names or text that say so), or None. A breast plan has a
    heart and a lung, so the structures alone would call it lung."""
    for site, pattern in _OTHER_SITES:
        hits = [n for n in names if pattern.search(normalise(n))]
        if re.search(rf"(^|[^a-z]){site}($|[^a-z])", str(text or "").lower()):
            hits.insert(0, f"TreatmentSite {text!r}")
        if hits:
            return site, hits
    return None


def infer_tumour_site(names: set[str] | list[str]) -> str | None:
    """The tumour site the project's structure names point to, or None when unclear."""
    scores = {site: len(hints & set(names)) for site, hints in _SITE_HINTS.items()}
    best = max(scores.values())
    winners = [s for s, v in scores.items() if v == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


_SITE_WORDS = (("head_neck", ("head_neck", "headneck", "head and neck", "head & neck", "h&n", "hn", "oropharynx",
                              "nasopharynx", "larynx", "oral cavity")),
               ("lung", ("lung", "thorax", "thoracic", "nsclc", "sclc")),
               ("prostate", ("prostate", "pelvis", "prostatic")))


def site_from_text(text: str | None) -> str | None:
    """A tumour site from free text such as an RTPLAN's TreatmentSite ("Head and neck", "Lung")."""
    t = str(text or "").strip().lower()
    if not t:
        return None
    hits = {site for site, words in _SITE_WORDS
            if any(re.search(rf"(^|[^a-z]){re.escape(w)}($|[^a-z])", t) for w in words)}
    return hits.pop() if len(hits) == 1 else None
