"""The sample-tensor contract: the sizes, vocabularies and codes that the tensors of a case
(``preprocessing.case_to_sample``), the model (``models/``) and the losses (``losses.py``) must
agree on. One source for each; docs/ARCHITECTURE.md ("Sample tensors") describes the tensors.

Changing a value here changes the shape or meaning of a tensor, so a model trained before no
longer fits (the federation's reply checks and ``checkpoint`` loading refuse it).
"""
from __future__ import annotations

# -- vocabularies (the case format uses the same names: ``case_io`` re-exports them) ----------
TUMOUR_SITES = ("head_neck", "lung", "prostate")
"""``tumour_site`` of a plan; the sample's ``tumour_site`` is an index into this tuple."""

TECHNIQUES = ("IMRT", "VMAT")
STAGES = ("vae", "diffusion", "unet")  # the trainable units of a model (state-dict prefixes)
"""``technique`` of a plan; the sample's ``technique`` is an index into this tuple."""

OAR_NAMES = (
    "Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Esophagus", "Larynx", "Mandible",
    "LeftLung", "RightLung", "Heart", "Rectum", "Bladder", "LeftFemoralHead", "RightFemoralHead",
)
"""Canonical OAR names: the order of the model's OAR channels (``oars``, ``oar_present``). Other
structures are kept on disk but not fed to the model."""

N_OARS = len(OAR_NAMES)

# -- beams ------------------------------------------------------------------------------------
B_MAX = 72
"""Rows of ``beams`` / ``beam_mask`` (beams or arc control points; longer arcs are subsampled);
also the most beams a plan may list."""

BEAM_FEATURES = 6
"""Columns of ``beams``: sin g, cos g, sin c, cos c, energy_mv / 10, 1 if from a VMAT arc."""

# -- constraints ------------------------------------------------------------------------------
C_MAX = 16
"""Rows of ``constraints`` / ``constraint_struct`` / ``constraint_mask``: the most constraints a
plan may have."""

CONSTRAINT_KINDS = ("Dmax", "Dmean", "Vx", "Dmin_pct")
"""Constraint kinds, in the order of the one-hot in ``constraints[..., :4]``."""

DMAX, DMEAN, VX, DMIN_PCT = range(len(CONSTRAINT_KINDS))

CONSTRAINT_FEATURES = len(CONSTRAINT_KINDS) + 2
"""Columns of ``constraints``: the one-hot kind, threshold / rx, limit."""

TARGET_STRUCT = N_OARS
"""``constraint_struct`` value meaning ``target_primary`` (the other values index OAR_NAMES)."""

N_CONSTRAINT_STRUCTS = N_OARS + 1
"""Values ``constraint_struct`` can take: every OAR, and the primary target."""

# -- structures -------------------------------------------------------------------------------
MIN_STRUCTURE_VOXELS = 5
"""A structure is present (``oar_present``; constraints and the cord Dmax error in the metrics)
when it has more voxels than this."""
