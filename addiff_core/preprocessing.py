"""Case -> tensors on the model's fixed grid, and a predicted dose -> the case's CT grid in Gy.

The model grid is a ``size``^3 box at ``spacing`` mm (the CT's own spacing when not set), with
the CT's direction, centred on the centroid of the targets. One SimpleITK resampling onto that
box does both the resampling and the crop/pad; the inverse resampling brings a prediction back
onto the original CT geometry. The sample tensors are described in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import ScaleIntensityRange

from .beams import beam_plate
from .case_io import Case
from .config import GridConfig
from .constraints import constraints_for_plan
from .contract import (
    B_MAX, BEAM_FEATURES, C_MAX, CONSTRAINT_FEATURES, CONSTRAINT_KINDS, MIN_STRUCTURE_VOXELS, N_OARS, OAR_NAMES,
    TARGET_STRUCT, TECHNIQUES, TUMOUR_SITES,
)
from .regions import evaluation_region



@dataclass(frozen=True)
class GridSpec:
    """Geometry of the model grid in patient space (SimpleITK conventions, (x, y, z) tuples)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def reference(self) -> sitk.Image:
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref

    @property
    def voxel_volume_cc(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def model_grid(case: Case, grid: GridConfig) -> GridSpec:
    """The ``grid.size``^3 box at ``grid.spacing`` centred on the centroid of the case's targets.

    At the CT's own spacing the box is aligned with the CT voxels (centre within half a voxel of
    the centroid), so resampling there and back is exact.
    """
    spacing = tuple(float(s) for s in (grid.spacing or case.ct.GetSpacing()))
    target = np.zeros(sitk.GetArrayViewFromImage(case.ct).shape, dtype=bool)
    for name in case.plan.prescriptions:
        target |= case.array(name)
    if target.any():
        cz, cy, cx = (float(np.mean(ix)) for ix in np.nonzero(target))
    else:  # no target (should have been caught by the checks): centre of the image
        cz, cy, cx = ((n - 1) / 2.0 for n in target.shape)
    direction = np.array(case.ct.GetDirection()).reshape(3, 3)
    if np.allclose(spacing, case.ct.GetSpacing(), rtol=1e-6):
        # same spacing: snap the box onto the CT's voxel lattice so that the round trip is lossless
        start = [float(round(c - (grid.size - 1) / 2.0)) for c in (cx, cy, cz)]
        origin = np.array(case.ct.TransformContinuousIndexToPhysicalPoint(start))
    else:
        centre = np.array(case.ct.TransformContinuousIndexToPhysicalPoint((cx, cy, cz)))
        origin = centre - direction @ (np.array(spacing) * (grid.size - 1) / 2.0)
    return GridSpec(size=(grid.size,) * 3, spacing=spacing, origin=tuple(float(o) for o in origin),
                    direction=tuple(float(d) for d in case.ct.GetDirection()))


def _resample(image: sitk.Image, ref: sitk.Image, interpolator: int, default: float) -> np.ndarray:
    out = sitk.Resample(image, ref, sitk.Transform(), interpolator, float(default), image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def _resample_mask(image: sitk.Image, ref: sitk.Image) -> np.ndarray:
    # linear on the 0/1 image then threshold: smoother than nearest when the grid is coarser
    img = sitk.Cast(image > 0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0)) >= 0.5


def beam_features(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(B_MAX, 6) beam rows [sin g, cos g, sin c, cos c, energy/10, from_arc] and a validity mask."""
    feats = np.zeros((B_MAX, BEAM_FEATURES), dtype=np.float32)
    mask = np.zeros(B_MAX, dtype=bool)
    rows = []
    for b in case.plan.beams:
        rows += [(cp.gantry, cp.couch, cp.energy_mv, float(b.is_arc)) for cp in b.control_points()]
    if len(rows) > B_MAX:  # very long arcs: keep an even subsample
        idx = np.linspace(0, len(rows) - 1, B_MAX).round().astype(int)
        rows = [rows[i] for i in idx]
    for i, (g, c, e, arc) in enumerate(rows):
        g, c = np.deg2rad(g), np.deg2rad(c)
        feats[i] = (np.sin(g), np.cos(g), np.sin(c), np.cos(c), e / 10.0, arc)
        mask[i] = True
    return feats, mask


def constraint_features(case: Case, present: dict[str, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C_MAX, 6) constraint rows, (C_MAX,) structure index, (C_MAX,) mask (structures present)."""
    rx = case.plan.max_prescription
    feats = np.zeros((C_MAX, CONSTRAINT_FEATURES), dtype=np.float32)
    struct = np.zeros(C_MAX, dtype=np.int64)
    mask = np.zeros(C_MAX, dtype=bool)
    i = 0
    for c in constraints_for_plan(case.plan):
        if i >= C_MAX:
            break
        if c.structure == "__target__":
            s = TARGET_STRUCT
        elif c.structure in OAR_NAMES and present.get(c.structure, False):
            s = OAR_NAMES.index(c.structure)
        else:
            continue
        feats[i, CONSTRAINT_KINDS.index(c.kind)] = 1.0
        feats[i, 4] = c.threshold_gy / rx
        feats[i, 5] = c.limit
        struct[i] = s
        mask[i] = True
        i += 1
    return feats, struct, mask


def case_to_sample(case: Case, grid: GridConfig, *, with_dose: bool = True) -> tuple[dict[str, torch.Tensor], GridSpec]:
    """Turn a loaded case into the model's sample tensors (see docs/ARCHITECTURE.md).

    ``with_dose=False`` (prediction) skips resampling the reference dose: ``dose`` is zeros and
    ``has_dose`` False, as for a case without one."""
    spec = model_grid(case, grid)
    ref = spec.reference()
    rx = case.plan.max_prescription

    ct = _resample(sitk.Cast(case.ct, sitk.sitkFloat32), ref, sitk.sitkLinear, grid.hu_min)
    ct = ScaleIntensityRange(a_min=grid.hu_min, a_max=grid.hu_max, b_min=-1.0, b_max=1.0, clip=True)(ct)
    ct = np.asarray(ct, dtype=np.float32)

    shape = ct.shape
    targets = np.zeros(shape, dtype=np.float32)
    primary_name = case.plan.targets[0]
    primary = np.zeros(shape, dtype=bool)
    for name in case.plan.targets:
        m = _resample_mask(case.masks[name], ref)
        targets = np.maximum(targets, m * np.float32(case.plan.prescriptions[name] / rx))
        if name == primary_name:
            primary = m
    oars = np.zeros((N_OARS,) + shape, dtype=np.float32)
    present = {}
    for k, name in enumerate(OAR_NAMES):
        if name in case.masks:
            m = _resample_mask(case.masks[name], ref)
            oars[k] = m
            present[name] = bool(m.sum() > MIN_STRUCTURE_VOXELS)
    body = _resample_mask(evaluation_region(case), ref)  # the one rule: regions.evaluation_region

    has_dose = with_dose and case.dose is not None
    if has_dose:
        dose = _resample(sitk.Cast(case.dose, sitk.sitkFloat32), ref, sitk.sitkLinear, 0.0) / np.float32(rx)
    else:
        dose = np.zeros(shape, dtype=np.float32)

    plate = beam_plate(primary if primary.any() else targets > 0, spec.spacing, case.plan.expanded_beams())
    plate = plate / max(float(plate.max()), 1e-8)
    beams, beam_mask = beam_features(case)
    cons, cons_struct, cons_mask = constraint_features(case, present)

    t = torch.from_numpy
    sample = {
        "ct": t(ct[None].copy()),
        "dose": t(np.asarray(dose, dtype=np.float32)[None].copy()),
        "has_dose": torch.tensor(has_dose),
        "targets": t(targets[None]),
        "target_primary": t(primary[None].astype(np.float32)),
        "oars": t(oars),
        "oar_present": torch.tensor([present.get(n, False) for n in OAR_NAMES]),
        "body": t(np.asarray(body, dtype=np.float32)[None]),
        "beam_plate": t(plate.astype(np.float32)[None]),
        "beams": t(beams),
        "beam_mask": t(beam_mask),
        "technique": torch.tensor(TECHNIQUES.index(case.plan.technique)),
        "tumour_site": torch.tensor(TUMOUR_SITES.index(case.plan.tumour_site)),
        "constraints": t(cons),
        "constraint_struct": t(cons_struct),
        "constraint_mask": t(cons_mask),
        "rx": torch.tensor(float(rx), dtype=torch.float32),
    }
    return sample, spec


def dose_to_ct_grid(dose_norm: np.ndarray | torch.Tensor, rx: float, spec: GridSpec, ct: sitk.Image) -> sitk.Image:
    """Map a normalised dose on the model grid (S, S, S) back to the CT's geometry, in Gy."""
    if isinstance(dose_norm, torch.Tensor):
        dose_norm = dose_norm.detach().cpu().numpy()
    arr = np.asarray(dose_norm, dtype=np.float32).reshape(spec.size[::-1]) * np.float32(rx)
    img = sitk.GetImageFromArray(np.clip(arr, 0.0, None))
    img.SetSpacing(spec.spacing)
    img.SetOrigin(spec.origin)
    img.SetDirection(spec.direction)
    out = sitk.Resample(img, ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return out
