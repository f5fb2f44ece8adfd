"""Phantom hospitals: non-IID synthetic cases with a physics-inspired dose.

Every hospital (:class:`HospitalProfile`) has its own case mix (tumour sites), patient build,
CT scanner (HU calibration offset, noise), planning habits (IMRT field count or VMAT arcs,
beam energy, prescriptions and fractionation, aperture margin, how hard OARs are spared) and
linac (penumbra). A case is drawn on a cube grid of ``size`` voxels:

* anatomy per tumour site, in LPS millimetres centred on the grid (+x left, +y posterior,
  +z superior): body outline with subcutaneous fat, bones (vertebrae, skull and mandible for
  head & neck; ribs, sternum for lung; pelvis, sacrum, femoral heads for prostate), air
  (airway, lungs, rectal gas), soft tissues with texture, the treatment couch under the patient;
  targets (one or two PTVs, nested/adjacent) and the canonical OARs of ``case_io.OAR_NAMES``;
* dose (:func:`phantom_dose`): for every beam (arcs as control points) a field conformed to the
  targets' beam's-eye-view projection plus margin, painted with each target's prescription,
  fluence lowered for beamlets crossing OARs and beam weights lowered for beams whose path
  crosses OARs; a few multiplicative beamlet updates (an MLEM-like "light optimiser", limited
  modulation) push targets towards their prescriptions and OARs under their goals; then
  penumbra (2-D Gaussian of the fluence), depth dose with build-up and attenuation
  exp(-mu(energy) * radiological depth through the CT), inverse square and a low scatter term;
  the primary target's D95 is scaled to its prescription exactly.

Everything is deterministic for a ``numpy.random.Generator``; :func:`write_synthetic_sites`
seeds one per (seed, site, case).

Modules: ``hospitals`` (profiles, grids, plans), ``canvas`` (drawing), ``body`` (what every
anatomy shares), ``head_neck`` / ``lung`` / ``prostate`` (one anatomy each), ``dose`` (the dose
model), ``cases`` (a case, and hospitals written to disk).
"""
from __future__ import annotations

from .cases import SITE_FILE_HEADER, SYNTH_MARKER, synth_case, write_synthetic_sites
from .dose import phantom_dose
from .hospitals import HOSPITAL_PROFILES, HospitalProfile, default_spacing, hospital_profile, make_plan, site_name

__all__ = [
    "HospitalProfile", "HOSPITAL_PROFILES", "hospital_profile", "default_spacing", "synth_case",
    "phantom_dose", "make_plan", "write_synthetic_sites", "site_name", "SYNTH_MARKER", "SITE_FILE_HEADER",
]
