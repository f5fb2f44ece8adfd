"""Structure masks <-> RTSTRUCT contours on the CT grid, in any (also oblique) orientation.

Both directions work per slice in voxel-index space and map through the CT's origin, spacing and
direction cosines. mask -> contours: ``contourpy`` traces the 0.5 iso-line (voxel centres never
on an edge), collinear points dropped (else a 512^2 body needs > 64 KB of ContourData). contours -> mask:
``dicompylercore.dvhcalc.get_contour_mask``, combined per slice by exclusive or (a contour inside
another is a hole), as dicompyler-core and most planning systems do. A round trip gives back the
same mask voxel for voxel.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from contourpy import contour_generator
from dicompylercore.dvhcalc import get_contour_mask

__all__ = ["index_to_patient", "patient_to_index", "drop_collinear", "mask_to_contours", "contours_to_mask"]

IN_PLANE_TOL = 0.1  # slice-index units: how far a contour may lie off its slice plane


def _affine(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    d = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    return d * np.array(img.GetSpacing(), dtype=np.float64)[None, :], np.array(img.GetOrigin(), dtype=np.float64)


def index_to_patient(img: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) continuous (x, y, z) voxel indices -> (N, 3) patient coordinates (mm)."""
    m, o = _affine(img)
    return np.asarray(ijk, dtype=np.float64) @ m.T + o


def patient_to_index(img: sitk.Image, xyz: np.ndarray) -> np.ndarray:
    """(N, 3) patient coordinates (mm) -> (N, 3) continuous (x, y, z) voxel indices."""
    m, o = _affine(img)
    return np.linalg.solve(m, (np.asarray(xyz, dtype=np.float64) - o).T).T


def drop_collinear(pts: np.ndarray) -> np.ndarray:
    """A closed polygon ((N, 2) or (N, 3)) without the points that lie on the straight line through
    their two neighbours: the same polygon, fewer points."""
    if len(pts) < 4:
        return pts
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    a, b = pts[:, :2] - prev[:, :2], nxt[:, :2] - pts[:, :2]
    turn = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) > 1e-9 * (1.0 + np.abs(a).sum(1) * np.abs(b).sum(1))
    return pts[turn] if turn.sum() >= 3 else pts


def mask_to_contours(mask: np.ndarray, ref: sitk.Image) -> list[tuple[int, np.ndarray]]:
    """A (z, y, x) mask on ``ref``'s grid -> [(slice index, (N, 3) polygon in patient mm)], the
    polygons closed implicitly (first point not repeated), as DICOM CLOSED_PLANAR wants."""
    out = []
    for k in np.flatnonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1)):
        padded = np.pad(np.asarray(mask[k], dtype=np.float64), 1)
        for line in contour_generator(z=padded, name="serial", line_type="Separate").lines(0.5):
            pts = np.asarray(line, dtype=np.float64) - 1.0  # undo the padding; columns: (x = col, y = row)
            if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
                pts = pts[:-1]
            pts = drop_collinear(pts)
            if len(pts) < 3:
                continue
            ijk = np.column_stack([pts, np.full(len(pts), float(k))])
            out.append((int(k), index_to_patient(ref, ijk)))
    return out


def _rasterise(polygon_ij: np.ndarray, shape_yx: tuple[int, int]) -> tuple[slice, slice, np.ndarray] | None:
    """Voxel centres inside one polygon (index space), limited to its bounding box."""
    lo = np.maximum(np.floor(polygon_ij.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(polygon_ij.max(axis=0)).astype(int) + 1, [shape_yx[1], shape_yx[0]])
    if np.any(hi <= lo):
        return None
    cols, rows = np.arange(lo[0], hi[0], dtype=np.float64), np.arange(lo[1], hi[1], dtype=np.float64)
    x, y = np.meshgrid(cols, rows)
    points = np.column_stack([x.ravel(), y.ravel()])
    grid = get_contour_mask({"lut": (cols, rows), "x_lut_index": 0}, None, points, polygon_ij)
    return slice(lo[1], hi[1]), slice(lo[0], hi[0]), grid


def contours_to_mask(contours: list[np.ndarray], ref: sitk.Image) -> tuple[np.ndarray, list[str]]:
    """Closed planar contours ((N, 3) patient mm each) -> ((z, y, x) bool mask on ``ref``, notes).

    A contour not parallel to the CT slices, or lying between or outside them, is left out and
    counted in the notes.
    """
    nx, ny, nz = ref.GetSize()
    planes: dict[int, np.ndarray] = {}
    off_plane = outside = 0
    for pts in contours:
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        if len(pts) < 3:
            continue
        ijk = patient_to_index(ref, pts)
        k = float(np.mean(ijk[:, 2]))
        if np.ptp(ijk[:, 2]) > IN_PLANE_TOL or abs(k - round(k)) > IN_PLANE_TOL:
            off_plane += 1
            continue
        k = int(round(k))
        if not 0 <= k < nz:
            outside += 1
            continue
        hit = _rasterise(ijk[:, :2], (ny, nx))
        if hit is None:
            outside += 1
            continue
        rs, cs, grid = hit
        plane = planes.setdefault(k, np.zeros((ny, nx), dtype=bool))
        plane[rs, cs] ^= grid
    mask = np.zeros((nz, ny, nx), dtype=bool)
    for k, plane in planes.items():
        mask[k] = plane
    notes = []
    if off_plane:
        notes.append(f"{off_plane} contour(s) not on a CT slice plane (tilted, or between slices) left out")
    if outside:
        notes.append(f"{outside} contour(s) outside the CT volume left out")
    return mask, notes
