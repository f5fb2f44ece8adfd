"""Plan normalisation of a predicted dose: scale it so the primary target gets its prescription.

A treatment plan is normalised before it is approved: the planner scales the whole dose so the
target receives the prescribed dose at the reference point. ICRU Report 83 (2010, IMRT)
recommends reporting and prescribing to the median dose of the PTV, D50%. A dose prediction knows
the prescription and the target but not how the planner would normalise; this step applies the
convention to the prediction, so that its plan level comes from the prescription and its shape
from the model. On the 84 OpenKBP reference plans the median of the primary target over its
prescription is 1.02 +- 0.03 (mean +- sd; BENCHMARKS.md, issue #24).

A pure function of tensors: nothing of a prediction library does this (MONAI's intensity
transforms scale by image statistics, not by a dose statistic inside one mask).
"""
from __future__ import annotations

import torch

from .config import PLAN_NORMALISATIONS  # "none": leave the prediction; "target_median": ICRU 83's D50%

SCALE_BOUNDS = (0.5, 2.0)
"""The most a prediction is scaled down or up: a model whose target median is off by more than
a factor of two has not learned the case, and scaling would hide that."""

MIN_TARGET_MEDIAN = 1e-3
"""A target median (in units of the prescription) below this leaves the prediction unscaled."""


def plan_normalised(dose: torch.Tensor, batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """:func:`normalise_to_prescription` of a prediction for ``batch`` (its ``target_primary``
    mask, read only when ``mode`` is not "none")."""
    if mode == "none":
        return dose
    return normalise_to_prescription(dose, batch["target_primary"].to(dose), mode)


def normalise_to_prescription(dose: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale each prediction so the median of its primary target equals the prescription.

    Args:
        dose: (N, 1, S, S, S) normalised dose (Gy / rx: the prescription is 1).
        target: (N, 1, S, S, S) primary-target mask (> 0.5 inside), on the same grid.
        mode: one of :data:`PLAN_NORMALISATIONS`; "none" returns ``dose`` itself.

    Returns:
        the scaled dose; a case without target voxels, or with a target median below
        :data:`MIN_TARGET_MEDIAN`, is returned unscaled; the scale is clamped to :data:`SCALE_BOUNDS`.

    Raises:
        ValueError: an unknown ``mode``, or ``target`` not shaped like ``dose``.
    """
    if mode not in PLAN_NORMALISATIONS:
        raise ValueError(f"unknown plan normalisation {mode!r} (expected one of {', '.join(PLAN_NORMALISATIONS)})")
    if mode == "none":
        return dose
    if target.shape != dose.shape:
        raise ValueError(f"target mask shape {tuple(target.shape)} differs from the dose's {tuple(dose.shape)}")
    scales = []
    for d, m in zip(dose.flatten(1), target.flatten(1) > 0.5):
        inside = d[m]
        med = float(inside.median()) if inside.numel() else 0.0
        scale = 1.0 / med if med >= MIN_TARGET_MEDIAN else 1.0
        scales.append(min(max(scale, SCALE_BOUNDS[0]), SCALE_BOUNDS[1]))
    return dose * torch.tensor(scales, dtype=dose.dtype, device=dose.device).reshape(-1, *([1] * (dose.ndim - 1)))
