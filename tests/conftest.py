"""Shared test fixtures.

* ``openkbp_dir``: the OpenKBP sample folder (``/work/shared/openkbp-sample`` or
  ``$ADDIFF_OPENKBP_SAMPLE``); the test is skipped when it is absent.
* ``procs``: processes a test starts (``Processes`` of test_federation_helpers), all stopped by
  PID at the end; the test fails if any was still running after its leader stopped.
* ``make_case``: a factory writing a small valid 16^3 head-and-neck case with
  ``case_io.save_case``::

      case = make_case(tmp_path)                         # tmp_path / "case"
      case = make_case(tmp_path, name="c2", dose=None)   # no dose.nii.gz
      case = make_case(tmp_path, masks={"Larynx": m})    # add a mask
      case = make_case(tmp_path, masks={"SpinalCord": None})  # drop a default mask
      case = make_case(tmp_path, plan={"tumour_site": "lung"})  # raw plan.yaml mapping/text

  Overrides: ``ct``, ``dose``, ``possible_dose_mask`` (arrays (z, y, x), or None to omit the
  latter two), ``masks`` (merged into the defaults PTV70, SpinalCord, Body; None drops one),
  ``plan`` (a ``Plan``; or a dict / str written verbatim to plan.yaml, valid or not),
  ``spacing``, ``origin``, ``direction``. ``make_case.arrays()`` returns the default arrays.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml

from addiff_core.case_io import Beam, Plan, save_case

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


@pytest.fixture
def make_case() -> Callable[..., Path]:
    """Factory: ``make_case(root, name="case", **overrides) -> case folder`` (see module doc)."""

    def _make(root: str | Path, name: str = "case", **overrides: Any) -> Path:
        d = default_arrays()
        unknown = set(overrides) - {"ct", "dose", "possible_dose_mask", "masks", "plan", "spacing", "origin", "direction"}
        if unknown:
            raise TypeError(f"make_case: unknown overrides {sorted(unknown)}")
        masks = dict(d["masks"])
        for k, v in (overrides.get("masks") or {}).items():
            if v is None:
                masks.pop(k, None)
            else:
                masks[k] = v
        plan = overrides.get("plan", default_plan())
        spacing = overrides.get("spacing", DEFAULT_SPACING)
        origin = overrides.get("origin", tuple(-(N - 1) / 2 * s for s in spacing))
        case_dir = save_case(Path(root) / name, overrides.get("ct", d["ct"]),
                             plan if isinstance(plan, Plan) else default_plan(), masks,
                             dose=overrides.get("dose", d["dose"]),
                             possible_dose_mask=overrides.get("possible_dose_mask", d["possible_dose_mask"]),
                             spacing=spacing, origin=origin, direction=overrides.get("direction"))
        if isinstance(plan, str):
            (case_dir / "plan.yaml").write_text(plan, encoding="utf-8")
        elif not isinstance(plan, Plan):
            (case_dir / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
        return case_dir

    _make.arrays = default_arrays  # type: ignore[attr-defined]
    _make.plan = default_plan  # type: ignore[attr-defined]
    return _make


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    """The OpenKBP sample folder (24 patients); skips the test when it is not available."""
    p = Path(os.environ.get("ADDIFF_OPENKBP_SAMPLE", "/work/shared/openkbp-sample"))
    if not (p / "pt_11" / "ct.csv").is_file() and not any(p.glob("pt_*/ct.csv")):
        pytest.skip(f"OpenKBP sample not found at {p}")
    return p


@pytest.fixture
def procs():
    from test_federation_helpers import Processes

    p = Processes()
    yield p
    leftover = p.stop_all()
    assert not leftover, f"processes were still running after their leaders stopped: {leftover}"
