"""The default synthetic case of the tests (behind conftest's ``make_case`` fixture): a water
cylinder with a spine, a spherical PTV70 and a dose of ~70 Gy in it, on a 16^3 grid."""
from __future__ import annotations

from typing import Any

import numpy as np

from addiff_core.case_io import Beam, Plan

N = 16
DEFAULT_SPACING = (2.0, 2.0, 2.5)
RX = 70.0


def default_arrays(n: int = N) -> dict[str, Any]:
    """Default (z, y, x) arrays of the synthetic case: a water cylinder with a spine, a
    spherical PTV70 in the middle and a dose of ~70 Gy in it falling off outside."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) - (n - 1) / 2,) * 3, indexing="ij")
    body = (x ** 2 + y ** 2) <= (0.45 * n) ** 2
    ct = np.full((n, n, n), -1000, np.int16)
    ct[body] = 20
    cord = ((x ** 2 + (y - 0.3 * n) ** 2) <= (0.08 * n) ** 2)
    bone = ((x ** 2 + (y - 0.3 * n) ** 2) <= (0.16 * n) ** 2) & ~cord
    ct[bone] = 700
    ptv = (x ** 2 + y ** 2 + z ** 2) <= (0.2 * n) ** 2
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    dose = (RX * 1.03 * np.exp(-np.maximum(r - 0.2 * n, 0) ** 2 / (2 * (0.15 * n) ** 2))).astype(np.float32)
    dose[~body] = 0.0
    return {"ct": ct, "dose": dose, "masks": {"PTV70": ptv.astype(np.uint8), "SpinalCord": cord.astype(np.uint8),
                                              "Body": body.astype(np.uint8)},
            "possible_dose_mask": body.astype(np.uint8)}


def default_plan() -> Plan:
    return Plan(tumour_site="head_neck", prescriptions={"PTV70": RX}, fractions=35, technique="IMRT",
                beams=tuple(Beam(gantry=float(g)) for g in range(0, 360, 72)))
