"""The evaluation region of a case: the one rule for where a prediction may hold dose.

As OpenKBP masks every prediction with the possible-dose mask, every prediction here is zero
outside (:func:`zero_outside`) the first of: the case's ``possible_dose_mask.nii.gz``, its body
structure (``case_io.BODY_NAME`` or another of ``metrics.BODY_NAMES``), the voxels with CT > -500
HU. Scores use it as the possible-dose mask; the model sees it as the ``body`` tensor.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import SimpleITK as sitk

from .case_io import BODY_NAME, Case
from .metrics import BODY_NAMES

BODY_HU_THRESHOLD = -500.0
"""Without a possible-dose mask or a body structure, the region is CT above this (HU)."""

Dose = TypeVar("Dose", sitk.Image, np.ndarray)


def body_structure(case: Case) -> str | None:
    """Name of the case's body structure: ``Body`` first, then any other name in ``BODY_NAMES``
    (sorted); None when the case has none."""
    if BODY_NAME in case.masks:
        return BODY_NAME
    return next((n for n in sorted(case.masks) if n in BODY_NAMES), None)


def evaluation_region(case: Case) -> sitk.Image:
    """The case's evaluation region as a 0/1 UInt8 image on its CT grid (geometry of the CT):
    possible-dose mask, else body structure, else CT > -500 HU (see the module doc)."""
    body = body_structure(case)
    if case.possible_dose_mask is not None:
        src = case.possible_dose_mask != 0
    elif body is not None:
        src = case.masks[body] != 0
    else:
        src = case.ct > BODY_HU_THRESHOLD
    region = sitk.Cast(src, sitk.sitkUInt8)
    region.CopyInformation(case.ct)
    return region


def region_array(case: Case) -> np.ndarray:
    """:func:`evaluation_region` as a boolean ``(z, y, x)`` array."""
    return sitk.GetArrayFromImage(evaluation_region(case)) > 0  # a copy: a view would outlive its image


def zero_outside(dose: Dose, region: sitk.Image | np.ndarray) -> Dose:
    """``dose`` with every voxel outside ``region`` set to 0 (OpenKBP's ``pred * mask``).

    Either both SimpleITK images on the same grid (the result keeps the dose's pixel type and
    geometry), or numpy arrays of one shape (a new array of the dose's dtype).
    """
    if isinstance(dose, sitk.Image):
        mask = region if isinstance(region, sitk.Image) else _like(np.asarray(region), dose)
        return sitk.Mask(dose, sitk.Cast(mask != 0, sitk.sitkUInt8), 0.0)
    arr = np.asarray(dose)
    m = sitk.GetArrayFromImage(region) if isinstance(region, sitk.Image) else np.asarray(region)
    if m.shape != arr.shape:
        raise ValueError(f"region shape {m.shape} does not match dose shape {arr.shape}")
    return np.where(m != 0, arr, np.zeros((), arr.dtype))


def _like(mask: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ref)
    return img
