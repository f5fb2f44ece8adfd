"""Dose-volume primitives of one structure: pure numpy, no I/O, nothing else of the project.

Shared by :mod:`addiff_core.metrics` and :mod:`addiff_core.constraints`, so neither imports the
other. Arrays (z, y, x), doses in Gy, masks cast with ``!= 0``; OpenKBP's percentile conventions;
``V_x`` is a fraction (0..1); every function gives ``nan`` for an empty structure.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DVH_PERCENT_POINTS: tuple[int, ...] = (99, 98, 95, 50, 2, 1)
"""The ``D_x`` points reported by :func:`dvh_points`."""


# -- masks -----------------------------------------------------------------------------------------
def as_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` as a boolean array of ``shape`` (every voxel when None)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match dose shape {shape}")
    return m if m.dtype == bool else m != 0


def structure_doses(dose: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1-D float64 array of the dose in the structure's voxels."""
    dose = np.asarray(dose)
    return np.asarray(dose[as_mask(mask, dose.shape)], dtype=np.float64)


# -- DVH points ------------------------------------------------------------------------------------
def dose_at_volume_pct(dose: np.ndarray, mask: np.ndarray, pct: float) -> float:
    """``D_pct`` (Gy): the dose at least ``pct`` % of the structure receives, the linear
    ``(100 - pct)``-th percentile (D95 = 5th, D2 = 98th)."""
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"volume percentage must be in [0, 100], got {pct!r}")
    d = structure_doses(dose, mask)
    if d.size == 0:
        return math.nan
    return float(np.percentile(d, 100.0 - pct))


def d_cc(dose: np.ndarray, mask: np.ndarray, cc: float, voxel_volume_cc: float) -> float:
    """``D_cc``: the minimum dose to the hottest ``cc`` cm^3 (OpenKBP's): the percentile
    ``100 - n / N * 100`` (clipped to 0) of the ``N`` voxel doses, ``n = max(1, round(cc / voxel_volume_cc))``."""
    if not voxel_volume_cc > 0 or not cc > 0:
        raise ValueError("cc and voxel_volume_cc must be positive")
    d = structure_doses(dose, mask)
    if d.size == 0:
        return math.nan
    n = max(1.0, float(np.round(cc / voxel_volume_cc)))
    return float(np.percentile(d, max(0.0, 100.0 - n / d.size * 100.0)))


def dmax(dose: np.ndarray, mask: np.ndarray) -> float:
    """Maximum voxel dose in the structure (Gy); nan when empty."""
    d = structure_doses(dose, mask)
    return float(d.max()) if d.size else math.nan


def dmean(dose: np.ndarray, mask: np.ndarray) -> float:
    """Mean voxel dose in the structure (Gy); nan when empty."""
    d = structure_doses(dose, mask)
    return float(d.mean()) if d.size else math.nan


def v_x(dose: np.ndarray, mask: np.ndarray, x_gy: float) -> float:
    """``V_x``: fraction (0..1) of the structure's voxels receiving ``>= x_gy``; nan when empty."""
    d = structure_doses(dose, mask)
    return float(np.count_nonzero(d >= x_gy) / d.size) if d.size else math.nan


def _vx_key(x_gy: float) -> str:
    return f"V{float(x_gy):g}Gy"


def dvh_points(dose: np.ndarray, mask: np.ndarray, voxel_volume_cc: float, is_target: bool,
               v_x_gy: Sequence[float] = ()) -> dict[str, float]:
    """The usual DVH points of one structure (Gy): :data:`DVH_PERCENT_POINTS`, ``Dmean``,
    ``D_0.1cc``, ``Dmax``, and for an OAR ``V{x}Gy`` (a fraction) per ``x`` in ``v_x_gy``."""
    d = structure_doses(dose, mask)
    out: dict[str, float] = {}
    if d.size == 0:
        keys = [f"D{p}" for p in DVH_PERCENT_POINTS] + ["Dmean", "D_0.1cc", "Dmax"]
        keys += [] if is_target else [_vx_key(x) for x in v_x_gy]
        return {k: math.nan for k in keys}
    pcts = np.percentile(d, [100.0 - p for p in DVH_PERCENT_POINTS])
    out.update({f"D{p}": float(v) for p, v in zip(DVH_PERCENT_POINTS, pcts)})
    out["Dmean"] = float(d.mean())
    out["D_0.1cc"] = d_cc(d, np.ones(d.shape, bool), 0.1, voxel_volume_cc)
    out["Dmax"] = float(d.max())
    if not is_target:
        for x in v_x_gy:
            out[_vx_key(x)] = float(np.count_nonzero(d >= x) / d.size)
    return out


def dvh_curve(dose: np.ndarray, mask: np.ndarray, bins: int | np.ndarray = 200) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative DVH ``(dose_axis, fraction receiving >= dose_axis[i])``; ``bins``: a number of
    points from 0 to Dmax, or an explicit dose axis in Gy (the same one to compare two curves)."""
    d = np.sort(structure_doses(dose, mask))
    if np.ndim(bins) == 0:
        nb = int(bins)
        if nb < 2:
            raise ValueError("bins must be >= 2 (or an explicit dose axis)")
        axis = np.linspace(0.0, float(d[-1]) if d.size else 0.0, nb)
    else:
        axis = np.asarray(bins, dtype=np.float64)
        if axis.ndim != 1 or np.any(np.diff(axis) < 0):
            raise ValueError("an explicit dose axis must be 1-D and non-decreasing")
    if d.size == 0:
        return axis, np.zeros_like(axis)
    frac = (d.size - np.searchsorted(d, axis, side="left")) / d.size
    return axis, frac.astype(np.float64)
