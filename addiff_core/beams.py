"""Beam geometry on a voxel grid: directions, beam's-eye-view apertures, radiological depth and
the GDP-HMM style "beam plate", for the phantom dose engine (``synth``) and the preprocessing.

Arrays are (z, y, x), ``spacing`` (x, y, z) mm. Positions are LPS *grid millimetres*: voxel
(k, j, i) sits at (i * sx, j * sy, k * sz) (identity direction matrix, head-first supine, as every
case here; only differences matter, so the origin never enters). Angles follow IEC 61217. The
isocentre defaults to the target's centroid (the volume centre if the target is empty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .case_io import Beam

__all__ = [
    "beam_direction", "bev_basis", "expand_beams", "grid_axes", "target_centroid", "source_position",
    "hu_to_density", "BEVGrid", "VoxelCoords", "bev_coordinates", "aperture_from_points", "target_bev", "aperture_mask",
    "radiological_depth", "beam_plate",
]


# -- directions ------------------------------------------------------------------------------------
def beam_direction(gantry_deg: float, couch_deg: float = 0.0) -> np.ndarray:
    """Unit vector of beam *travel* (source -> isocentre) in LPS (x, y, z), IEC 61217, head-first
    supine: IEC fixed (X, Y, Z) = (left, superior, anterior), so LPS = (X, -Z, Y); the source sits
    at (sin g cos c, -sin g sin c, cos g) (couch counter-clockwise seen from above), hence
    ``(-sin g cos c, cos g, sin g sin c)``. Gantry 0 travels +y (posterior), 90 -x; gantry 90 with
    couch 90 travels superior."""
    g = math.radians(float(gantry_deg))
    c = math.radians(float(couch_deg))
    d = np.array([-math.sin(g) * math.cos(c), math.cos(g), math.sin(g) * math.sin(c)], dtype=np.float64)
    d[np.abs(d) < 1e-12] = 0.0
    return d / np.linalg.norm(d)


def bev_basis(direction: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (u, v) spanning the plane perpendicular to ``direction`` (BEV axes); for a
    coplanar beam v is +-z and u lies in the axial plane."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    ref = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(ref, d)
    u /= np.linalg.norm(u)
    v = np.cross(d, u)
    return u, v / np.linalg.norm(v)


def expand_beams(beams: Iterable[Beam], arc_step_deg: float = 10.0) -> list[Beam]:
    """Static beams; arcs are sampled as control points like ``Plan.expanded_beams``."""
    from .case_io import Plan

    beams = tuple(beams)
    if not any(b.is_arc for b in beams):
        return list(beams)
    plan = Plan(tumour_site="head_neck", prescriptions={"PTV": 1.0}, fractions=1, technique="VMAT", beams=beams)
    return plan.expanded_beams(arc_step_deg)


# -- grid helpers ----------------------------------------------------------------------------------
def grid_axes(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (grid mm) along x, y and z for a (z, y, x) ``shape``."""
    nz, ny, nx = (int(s) for s in shape)
    sx, sy, sz = (float(s) for s in spacing)
    return np.arange(nx) * sx, np.arange(ny) * sy, np.arange(nz) * sz


def target_centroid(target_mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Centroid (x, y, z) in grid mm of a (z, y, x) mask; the volume centre if the mask is empty."""
    m = np.asarray(target_mask) > 0
    sx, sy, sz = (float(s) for s in spacing)
    if not m.any():
        nz, ny, nx = m.shape
        return np.array([(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, (nz - 1) / 2 * sz])
    k, j, i = (a.mean() for a in np.nonzero(m))
    return np.array([i * sx, j * sy, k * sz])


def source_position(isocentre: Sequence[float], direction: Sequence[float], sad_mm: float = 1000.0) -> np.ndarray:
    """Source position = isocentre - SAD * direction (the beam travels along ``direction``)."""
    return np.asarray(isocentre, dtype=np.float64) - float(sad_mm) * np.asarray(direction, dtype=np.float64)


def hu_to_density(hu: np.ndarray) -> np.ndarray:
    """Relative electron density (water = 1) from HU, bilinear: -1000 -> 0, 0 -> 1, 1000 -> 1.6
    (float32, clipped to [0, 3])."""
    hu = np.asarray(hu, dtype=np.float32)
    rho = np.where(hu <= 0, 1.0 + hu / 1000.0, 1.0 + hu * 0.0006)
    return np.clip(rho, 0.0, 3.0).astype(np.float32)


class VoxelCoords:
    """Voxel-centre positions relative to an isocentre: of the flat (z, y, x) indices ``index``
    (1-D results), or of the whole grid (broadcast (z, y, x) results)."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], isocentre: Sequence[float],
                 index: np.ndarray | None = None):
        self.shape = tuple(int(s) for s in shape)
        iso = np.asarray(isocentre, dtype=np.float64)
        x, y, z = grid_axes(self.shape, spacing)
        x, y, z = (x - iso[0]).astype(np.float32), (y - iso[1]).astype(np.float32), (z - iso[2]).astype(np.float32)
        self.index = None if index is None else np.asarray(index)
        if self.index is None:
            self.x, self.y, self.z = x[None, None, :], y[None, :, None], z[:, None, None]
        else:
            k, j, i = np.unravel_index(self.index, self.shape)
            self.x, self.y, self.z = x[i], y[j], z[k]
        self._norm2: np.ndarray | None = None

    def dot(self, vec: Sequence[float]) -> np.ndarray:
        """Projection of each voxel position on ``vec`` (float32)."""
        out = None
        for c, a in zip(vec, (self.x, self.y, self.z)):
            c = float(c)
            if abs(c) < 1e-9:
                continue
            t = a * np.float32(c)
            out = t if out is None else out + t
        if out is None:
            out = np.zeros(1, np.float32)
        full = self.shape if self.index is None else self.index.shape
        return np.broadcast_to(out, full) if out.shape != full else out

    def norm2(self) -> np.ndarray:
        if self._norm2 is None:
            self._norm2 = self.x ** 2 + self.y ** 2 + self.z ** 2
        return self._norm2


def bev_coordinates(coords: VoxelCoords, direction: Sequence[float], sad_mm: float | None = 1000.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beam's-eye-view ``(pu, pv, r2)``: mm across the beam axis, projected to the isocentre plane
    along the ray from the source (``sad_mm=None``: parallel), and the squared distance (mm^2)
    from the source (``inf`` when parallel)."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    u, v = bev_basis(d)
    pu, pv = coords.dot(u), coords.dot(v)
    if sad_mm is None:
        return pu, pv, np.full(1, np.inf, np.float32)
    sad = np.float32(sad_mm)
    w = coords.dot(d)  # depth beyond the isocentre plane along the axis
    axial = w + sad  # distance from the source along the axis
    scale = sad / np.maximum(axial, np.float32(1.0))
    r2 = coords.norm2() + np.float32(2.0) * sad * w + sad * sad
    return pu * scale, pv * scale, r2


# -- beam's-eye-view maps --------------------------------------------------------------------------
@dataclass(frozen=True)
class BEVGrid:
    """A 2-D pixel grid in the beam's-eye view (isocentre plane): pixel (a, b) is centred at
    (u0 + a * pixel, v0 + b * pixel) mm. Lookups outside the grid read 0."""

    u0: float
    v0: float
    pixel: float
    nu: int
    nv: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.nu, self.nv

    def flat_index(self, pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
        """Indices into ``np.pad(image, 1).ravel()``; points outside land on the zero border."""
        inv = np.float32(1.0 / self.pixel)
        a = np.rint((pu - np.float32(self.u0)) * inv)
        b = np.rint((pv - np.float32(self.v0)) * inv)
        a = np.clip(a, -1, self.nu, out=a).astype(np.int32) + 1
        b = np.clip(b, -1, self.nv, out=b).astype(np.int32) + 1
        a *= np.int32(self.nv + 2)
        a += b
        return a

    @staticmethod
    def sample(image: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
        """Nearest-pixel values of a BEV ``image`` at points given by :meth:`flat_index`."""
        return np.pad(np.asarray(image, dtype=np.float32), 1).ravel()[flat_index]

    def splat(self, pu: np.ndarray, pv: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Sum of ``weights`` (or counts) per pixel of the points (pu, pv); outside points dropped."""
        a = np.rint((np.asarray(pu) - self.u0) / self.pixel).astype(np.int64)
        b = np.rint((np.asarray(pv) - self.v0) / self.pixel).astype(np.int64)
        ok = (a >= 0) & (a < self.nu) & (b >= 0) & (b < self.nv)
        w = None if weights is None else np.broadcast_to(np.asarray(weights, np.float64), a.shape)[ok]
        out = np.bincount(a[ok] * self.nv + b[ok], weights=w, minlength=self.nu * self.nv)
        return out.reshape(self.nu, self.nv)


def _default_pixel(spacing: Sequence[float]) -> float:
    return float(min(min(float(s) for s in spacing) / 2.0, 2.0))


def aperture_from_points(pu: np.ndarray, pv: np.ndarray, spacing: Sequence[float], margin_mm: float = 5.0,
                         pad_mm: float = 0.0, pixel_mm: float | None = None, grid: BEVGrid | None = None
                         ) -> tuple[BEVGrid, np.ndarray]:
    """Field shape ``(grid, aperture)`` from the BEV coordinates of a target's voxels; the
    arguments as :func:`target_bev`'s, and ``grid`` to draw on instead of one fitted to the points."""
    pu = np.asarray(pu, dtype=np.float32).ravel()
    pv = np.asarray(pv, dtype=np.float32).ravel()
    pixel = float(pixel_mm) if pixel_mm else (grid.pixel if grid is not None else _default_pixel(spacing))
    reach = float(margin_mm) + 0.5 * max(float(s) for s in spacing)
    if grid is None:
        if pu.size == 0:
            return BEVGrid(0.0, 0.0, pixel, 1, 1), np.zeros((1, 1), bool)
        extra = reach + float(pad_mm) + 2 * pixel
        lo_u, hi_u = float(pu.min()) - extra, float(pu.max()) + extra
        lo_v, hi_v = float(pv.min()) - extra, float(pv.max()) + extra
        grid = BEVGrid(lo_u, lo_v, pixel, int(math.ceil((hi_u - lo_u) / pixel)) + 1,
                       int(math.ceil((hi_v - lo_v) / pixel)) + 1)
    if pu.size == 0:
        return grid, np.zeros(grid.shape, bool)
    hits = grid.splat(pu, pv) > 0
    if not hits.any():
        return grid, hits
    dist = ndimage.distance_transform_edt(~hits, sampling=grid.pixel)
    return grid, ndimage.binary_fill_holes(dist <= reach)


def target_bev(target_mask: np.ndarray, spacing: Sequence[float], direction: Sequence[float],
               isocentre: Sequence[float] | None = None, sad_mm: float | None = 1000.0, margin_mm: float = 5.0,
               pad_mm: float = 0.0, pixel_mm: float | None = None) -> tuple[BEVGrid, np.ndarray]:
    """The field shape: the target's beam's-eye-view projection dilated by ``margin_mm``, each voxel
    a disk of half its largest spacing (no gaps), holes filled.

    Args:
        target_mask: (z, y, x); spacing: (x, y, z) mm; direction: LPS unit vector of travel.
        isocentre: grid mm (None: the target's centroid); sad_mm: None for a parallel projection.
        margin_mm, pad_mm: dilation, and extra grid on every side; pixel_mm: None for the default.

    Returns:
        ``(grid, aperture)``: a :class:`BEVGrid` and a bool image on it (1x1 and empty for an
        empty target).
    """
    m = np.asarray(target_mask) > 0
    iso = target_centroid(m, spacing) if isocentre is None else np.asarray(isocentre, dtype=np.float64)
    idx = np.flatnonzero(m)
    if idx.size == 0:
        return aperture_from_points(np.zeros(0), np.zeros(0), spacing, margin_mm, pad_mm, pixel_mm)
    pu, pv, _ = bev_coordinates(VoxelCoords(m.shape, spacing, iso, idx), direction, sad_mm)
    return aperture_from_points(pu, pv, spacing, margin_mm, pad_mm, pixel_mm)


def aperture_mask(target_mask: np.ndarray, spacing: Sequence[float], gantry: float, couch: float = 0.0,
                  margin_mm: float = 5.0, isocentre: Sequence[float] | None = None,
                  sad_mm: float | None = 1000.0) -> np.ndarray:
    """Bool (z, y, x) mask of the voxels in the field of the beam at ``gantry``/``couch`` (degrees,
    IEC 61217), the whole ray in front of and behind the target; the rest as :func:`target_bev`'s."""
    m = np.asarray(target_mask) > 0
    iso = target_centroid(m, spacing) if isocentre is None else np.asarray(isocentre, dtype=np.float64)
    d = beam_direction(gantry, couch)
    grid, ap = target_bev(m, spacing, d, iso, sad_mm, margin_mm)
    pu, pv, _ = bev_coordinates(VoxelCoords(m.shape, spacing, iso), d, sad_mm)
    return grid.sample(ap, grid.flat_index(pu, pv)) > 0.5


# -- radiological depth ----------------------------------------------------------------------------
def _shift_bilinear(padded: np.ndarray, fl: tuple[int, int], w: tuple[float, float], n1: int, n2: int,
                    pad: int) -> np.ndarray:
    """Bilinear sample of the last two axes of a zero-padded array at q + fl + w (per axis)."""
    out = None
    for da, wa in ((0, 1.0 - w[0]), (1, w[0])):
        if wa <= 1e-7:
            continue
        for db, wb in ((0, 1.0 - w[1]), (1, w[1])):
            if wb <= 1e-7:
                continue
            a0, b0 = pad + fl[0] + da, pad + fl[1] + db
            t = padded[..., a0:a0 + n1, b0:b0 + n2] * np.float32(wa * wb)
            out = t if out is None else out + t
    return out


def radiological_depth(density: np.ndarray, spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Water-equivalent depth (mm) of every voxel centre along ``direction`` (LPS unit vector),
    from where the ray enters the volume (outside = vacuum). A slice march along the axis closest
    to the beam, bilinear one slice upstream: O(voxels), about a voxel of lateral blur."""
    rho = np.asarray(density, dtype=np.float32)
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    sx, sy, sz = (float(s) for s in spacing)
    vel = np.array([d[2] / sz, d[1] / sy, d[0] / sx])  # index units per mm, array axis order
    a = int(np.argmax(np.abs(vel)))
    step_mm = 1.0 / abs(vel[a])
    others = [ax for ax in range(3) if ax != a]
    o = vel[others] / abs(vel[a])  # in-plane index offset per slice step along the ray
    r = np.moveaxis(rho, a, 0)
    if vel[a] < 0:
        r = r[::-1]
    n0, n1, n2 = r.shape
    pad = 2
    t = -o  # upstream point = q - o
    fl = (int(math.floor(t[0])), int(math.floor(t[1])))
    w = (float(t[0] - fl[0]), float(t[1] - fl[1]))
    rpad = np.pad(r, ((0, 0), (pad, pad), (pad, pad)))
    half = np.float32(step_mm / 2.0)
    inc = r.copy()
    inc[1:] += _shift_bilinear(rpad[:-1], fl, w, n1, n2, pad)
    inc *= half
    depth = np.zeros((n0, n1 + 2 * pad, n2 + 2 * pad), np.float32)
    depth[0, pad:pad + n1, pad:pad + n2] = inc[0]
    for k in range(1, n0):
        depth[k, pad:pad + n1, pad:pad + n2] = _shift_bilinear(depth[k - 1], fl, w, n1, n2, pad) + inc[k]
    out = depth[:, pad:pad + n1, pad:pad + n2]
    if vel[a] < 0:
        out = out[::-1]
    return np.ascontiguousarray(np.moveaxis(out, 0, a))


# -- beam plate ------------------------------------------------------------------------------------
def beam_plate(target_mask: np.ndarray, spacing: Sequence[float], beams: Sequence[Beam], sad_mm: float = 1000.0,
               margin_mm: float = 5.0, isocentre: Sequence[float] | None = None,
               arc_step_deg: float = 10.0) -> np.ndarray:
    """GDP-HMM style beam-geometry volume (float32, (z, y, x); zeros for an empty target): per
    static beam of ``beams`` its field (:func:`aperture_mask`) weighted by (SAD / distance from the
    source)^2, summed; arcs are sampled every ``arc_step_deg``; the rest as :func:`target_bev`'s."""
    m = np.asarray(target_mask) > 0
    out = np.zeros(m.shape, np.float32)
    if not m.any():
        return out
    iso = target_centroid(m, spacing) if isocentre is None else np.asarray(isocentre, dtype=np.float64)
    coords = VoxelCoords(m.shape, spacing, iso)
    sad2 = np.float32(float(sad_mm) ** 2)
    for b in expand_beams(beams, arc_step_deg):
        d = beam_direction(b.gantry, b.couch)
        grid, ap = target_bev(m, spacing, d, iso, sad_mm, margin_mm)
        pu, pv, r2 = bev_coordinates(coords, d, sad_mm)
        inside = grid.sample(ap, grid.flat_index(pu, pv))
        inside *= sad2
        inside /= r2
        out += inside
    return out
