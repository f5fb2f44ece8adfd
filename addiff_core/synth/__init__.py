"""Phantom hospitals: non-IID synthetic cases with a physics-inspired dose.

Each hospital (:class:`HospitalProfile`) has its own case mix, patient build, CT scanner, planning
habits (IMRT fields or VMAT arcs, energy, prescriptions, margins, OAR sparing) and penumbra. A case
is drawn in LPS mm centred on a cube grid: anatomy per tumour site with the canonical OARs, and a
dose (:func:`phantom_dose`) from target-conformed fields with a few MLEM-like fluence updates,
penumbra, depth dose through the CT and inverse square, the target's D95 scaled to its
prescription. Deterministic: :func:`write_synthetic_sites` seeds one generator per (seed, site, case).

Modules: ``hospitals`` (profiles, plans), ``canvas`` (drawing), ``body``, ``head_neck`` / ``lung``
/ ``prostate`` (one anatomy each), ``dose``, ``cases`` (a case, and hospitals written to disk).
"""
from __future__ import annotations

from .cases import SITE_FILE_HEADER, SYNTH_MARKER, synth_case, write_synthetic_sites
from .dose import phantom_dose
from .hospitals import HOSPITAL_PROFILES, HospitalProfile, default_spacing, hospital_profile, make_plan, site_name

__all__ = [
    "HospitalProfile", "HOSPITAL_PROFILES", "hospital_profile", "default_spacing", "synth_case",
    "phantom_dose", "make_plan", "write_synthetic_sites", "site_name", "SYNTH_MARKER", "SITE_FILE_HEADER",
]
