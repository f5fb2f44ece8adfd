"""Structure names: a TPS's ROI names -> the project's names (``case_io.OAR_NAMES``, ``Body``, ``PTV<Gy>``).

Lookup is by a normalised key (lower case, everything but letters and digits removed), so
``Parotid_L``, ``parotid l`` and ``PAROTID-L`` are the same name. The defaults cover the TG-263
spellings (``Parotid_L``, ``SpinalCord``, ``Bone_Mandible``, ``Femur_Head_L``, ``Lung_L``, ...)
and common variants (``L Parotid``, ``Cord``, ``Oesophagus``, ``External``). Targets that carry
their dose in the name (``PTV_70``, ``PTV70``, ``PTV_7000`` in cGy, ``PTV_50.4``) become
``PTV70`` / ``PTV50p4``. A site's mapping file adds to or overrides the defaults (its keys are
normalised the same way); a name mapped to ``None`` is dropped. Any other name is kept, made a
valid file name (letters, digits, ``_`` and ``-``), and reported as not used by the model.
"""
from __future__ import annotations

import re
from typing import Mapping

from ..case_io import BODY_NAME, OAR_NAMES

__all__ = ["DEFAULT_NAME_MAP", "normalise", "target_dose_from_name", "NameMapper", "infer_tumour_site",
           "site_from_text", "safe_structure_name"]

_ALIASES: dict[str, tuple[str, ...]] = {
    "Brainstem": ("Brainstem", "Brain_Stem", "BrainStem"),
    "SpinalCord": ("SpinalCord", "Spinal_Cord", "Cord"),
    "LeftParotid": ("Parotid_L", "L_Parotid", "LParotid", "Lt_Parotid", "Parotid_Lt", "Parotid_Left", "Left_Parotid"),
    "RightParotid": ("Parotid_R", "R_Parotid", "RParotid", "Rt_Parotid", "Parotid_Rt", "Parotid_Right", "Right_Parotid"),
    "Esophagus": ("Esophagus", "Oesophagus"),
    "Larynx": ("Larynx",),
    "Mandible": ("Mandible", "Bone_Mandible"),
    "LeftLung": ("Lung_L", "L_Lung", "LLung", "Lung_Lt", "Lung_Left", "Left_Lung"),
    "RightLung": ("Lung_R", "R_Lung", "RLung", "Lung_Rt", "Lung_Right", "Right_Lung"),
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

_TARGET_DOSE_RE = re.compile(r"^ptv[ _-]*(\d+(?:[.,p]\d+)?)[ _-]*(gy|cgy)?$", re.IGNORECASE)
_STRUCTURE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def target_dose_from_name(name: str) -> float | None:
    """The dose (Gy) a target name carries (``PTV_70`` -> 70, ``PTV_7000`` -> 70, ``PTV50.4`` -> 50.4)."""
    m = _TARGET_DOSE_RE.match(str(name).strip())
    if not m:
        return None
    value = float(m.group(1).replace(",", ".").replace("p", "."))
    if (m.group(2) or "").lower() == "cgy" or value > 150:  # TG-263 PTV_7000 is in cGy
        value /= 100.0
    return value if 0 < value <= 150 else None


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
    overrides the defaults, a value of None drops the structure."""

    def __init__(self, extra: Mapping[str, str | None] | None = None):
        self.map: dict[str, str | None] = dict(DEFAULT_NAME_MAP)
        self.map.update({normalise(k): v for k, v in (extra or {}).items()})

    def __call__(self, roi_name: str, interpreted_type: str = "") -> tuple[str | None, bool]:
        """-> (project name or None to drop, known): ``known`` is False for a name kept as-is."""
        key = normalise(roi_name)
        if key in self.map:
            return self.map[key], True
        dose = target_dose_from_name(roi_name)
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
