"""Helpers of the DICOM-RT tests: tiny synthetic cases and exported patients."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom

from addiff_core.case_io import Case, save_case
from addiff_core.dicom.writer import export_case
from addiff_core.synth import default_spacing, synth_case

SIZE = 24


def synth_case_dir(root: Path, name: str = "p1", site: str = "head_neck", profile: str = "hospital_a", seed: int = 0,
                   size: int = SIZE, direction=None, origin=(-110.0, -95.0, -60.0)) -> Path:
    """A phantom case (``synth.synth_case``) written as a case folder."""
    ct, masks, dose, plan, pdm = synth_case(np.random.default_rng(seed), site, size=size, hospital_profile=profile)
    return save_case(Path(root) / name, ct, plan, masks, dose=dose, possible_dose_mask=pdm,
                     spacing=default_spacing(site, size, profile), origin=origin, direction=direction)


def export_patient(case_dir: Path, dst: Path) -> Path:
    export_case(case_dir, dst)
    return dst


def edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    """Read a DICOM file, change it, write it back."""
    ds = pydicom.dcmread(str(path))
    change(ds)
    ds.save_as(str(path))


def copy_case(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1.0, float(a.sum() + b.sum()))


def same_geometry_arrays(a: Case, b: Case) -> None:
    assert a.ct.GetSize() == b.ct.GetSize()
    assert np.allclose(a.ct.GetSpacing(), b.ct.GetSpacing(), atol=1e-4)
    assert np.allclose(a.ct.GetOrigin(), b.ct.GetOrigin(), atol=1e-3)
    assert np.allclose(a.ct.GetDirection(), b.ct.GetDirection(), atol=1e-5)
