"""Shared test fixtures.

* ``openkbp_dir``: the OpenKBP sample folder (``helpers.shared_data``: ``$ADDIFF_OPENKBP_SAMPLE``,
  ``../shared/openkbp-sample`` or ``/work/shared/openkbp-sample``); the test is skipped when it is absent.
* ``procs``: processes a test starts (``helpers.federation.Processes``), all stopped by PID at
  the end; the test fails if any was still running after its leader stopped.
* ``tiny_model``: the tests' tiny ``ModelConfig`` (``helpers.models.TINY_MODEL``; tests that need
  it outside a test function import it from there).
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
  ``spacing``, ``origin``, ``direction``. ``make_case.arrays()`` returns the default arrays
  (``helpers.cases``).

Helpers that are not fixtures live in the ``tests/helpers/`` package (``from helpers.X import ...``).

The README's command runs the suite with pytest-xdist (``-n 3 --dist loadgroup``): each worker
uses one torch thread (several workers with several threads each would oversubscribe a 2-core
machine), tests that share an expensive module fixture carry one ``xdist_group`` so that they
run on one worker, and the slow tests are dealt out first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from addiff_core.case_io import Plan, save_case
from addiff_core.config import ModelConfig
from helpers.cases import DEFAULT_SPACING, N, default_arrays, default_plan
from helpers.models import TINY_MODEL
from helpers.shared_data import OPENKBP_SAMPLE

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the slow end-to-end tests first (stable order otherwise): with
    ``--dist loadgroup`` the first tests are dealt to the workers in turn, so the long runs start
    at once on different workers instead of ending the suite one after the other. A serial run
    keeps the file order (module fixtures are set up once)."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def tiny_model() -> ModelConfig:
    """The tests' tiny model configuration (16^3 grid; ``helpers.models.TINY_MODEL``)."""
    return TINY_MODEL


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
    p = OPENKBP_SAMPLE
    if not (p / "pt_11" / "ct.csv").is_file() and not any(p.glob("pt_*/ct.csv")):
        pytest.skip(f"OpenKBP sample not found at {p}")
    return p


@pytest.fixture
def procs():
    from helpers.federation import Processes

    p = Processes()
    yield p
    leftover = p.stop_all()
    assert not leftover, f"processes were still running after their leaders stopped: {leftover}"
