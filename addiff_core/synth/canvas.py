"""Drawing on a phantom's grid: millimetre coordinates centred on the grid and shape primitives
(ellipsoids, tubes, capsules, superellipses, smooth noise, irregular tumours)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage


class Canvas:
    """Coordinates (mm, grid centre = 0) and shape primitives evaluated on bounding boxes."""

    def __init__(self, shape: tuple[int, int, int], spacing: Sequence[float], rng: np.random.Generator):
        self.shape = shape
        self.spacing = tuple(float(s) for s in spacing)
        self.rng = rng
        nz, ny, nx = shape
        sx, sy, sz = self.spacing
        self.x = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)
        self.z = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(np.float32)
        self.X, self.Y, self.Z = self.x[None, None, :], self.y[None, :, None], self.z[:, None, None]
        # smallest semi-axes that still hit voxels on coarse grids (a structure never vanishes)
        self.rmin = (0.55 * sx, 0.55 * sy, 0.55 * sz)

    def _range(self, axis: np.ndarray, lo: float, hi: float) -> slice:
        a = int(np.searchsorted(axis, lo, side="left"))
        b = int(np.searchsorted(axis, hi, side="right"))
        return slice(max(a, 0), min(b, axis.size))

    def ellipsoid(self, c: Sequence[float], semi: Sequence[float], floor: bool = True) -> np.ndarray:
        semi = [max(float(s), r) if floor else float(s) for s, r in zip(semi, self.rmin)]
        out = np.zeros(self.shape, bool)
        sl = (self._range(self.z, c[2] - semi[2], c[2] + semi[2]), self._range(self.y, c[1] - semi[1], c[1] + semi[1]),
              self._range(self.x, c[0] - semi[0], c[0] + semi[0]))
        z, y, x = self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :]
        out[sl] = ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2 <= 1.0
        return out

    def tube(self, cx, cy, rx, ry, z0: float, z1: float) -> np.ndarray:
        """Elliptic tube along z; cx, cy, rx, ry are numbers or callables of z (mm)."""
        out = np.zeros(self.shape, bool)
        ks = self._range(self.z, z0, z1)
        z = self.z[ks]
        f = lambda v: (v(z) if callable(v) else np.full(z.shape, float(v), np.float32)).astype(np.float32)[:, None, None]
        rx_, ry_ = np.maximum(f(rx), self.rmin[0]), np.maximum(f(ry), self.rmin[1])
        cx_, cy_ = f(cx), f(cy)
        out[ks] = ((self.X - cx_) / rx_) ** 2 + ((self.Y - cy_) / ry_) ** 2 <= 1.0
        # coarse grids: keep the tube continuous (nearest voxel where a slice came out empty)
        for k in np.flatnonzero(~out[ks].any(axis=(1, 2))):
            j = int(np.argmin(np.abs(self.y - cy_[k, 0, 0])))
            i = int(np.argmin(np.abs(self.x - cx_[k, 0, 0])))
            out[ks.start + k, j, i] = True
        return out

    def segment(self, p0: Sequence[float], p1: Sequence[float], radius: float) -> np.ndarray:
        """Capsule between two points (union of spheres)."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        n = max(2, int(np.linalg.norm(p1 - p0) / max(radius * 0.7, 1e-3)) + 1)
        out = np.zeros(self.shape, bool)
        for t in np.linspace(0, 1, n):
            out |= self.ellipsoid(p0 + t * (p1 - p0), (radius,) * 3)
        return out

    def superellipse(self, cx, cy, ax, ay, p: float) -> np.ndarray:
        """Per-slice superellipse |x/ax|^p + |y/ay|^p <= 1; arguments are (nz, 1, 1) arrays or numbers."""
        return (np.abs(self.X - cx) / ax) ** p + (np.abs(self.Y - cy) / ay) ** p <= 1.0

    def smooth_noise(self, cell_mm: float) -> np.ndarray:
        """Unit-variance-ish smooth random field with features of about ``cell_mm``."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        coarse = [max(2, int(math.ceil(n * s / cell_mm)) + 1) for n, s in ((nz, sz), (ny, sy), (nx, sx))]
        g = self.rng.standard_normal(coarse).astype(np.float32)
        zoom = [n / c for n, c in zip((nz, ny, nx), coarse)]
        return ndimage.zoom(g, zoom, order=1, mode="nearest", grid_mode=True)[:nz, :ny, :nx]

    def ensure(self, mask: np.ndarray, c: Sequence[float]) -> np.ndarray:
        """Guarantee a non-empty mask: the voxel nearest ``c`` when nothing was drawn."""
        if not mask.any():
            k = int(np.argmin(np.abs(self.z - c[2])))
            j = int(np.argmin(np.abs(self.y - c[1])))
            i = int(np.argmin(np.abs(self.x - c[0])))
            mask[k, j, i] = True
        return mask


def sig(t):
    return 1.0 / (1.0 + np.exp(-t))


def lumpy(cv: Canvas, rng: np.random.Generator, c: Sequence[float], semi: Sequence[float], margin: float = 0.0,
           lumps: list | None = None) -> tuple[np.ndarray, list]:
    """Irregular tumour: a main ellipsoid and 1-2 lumps; ``margin`` grows all of them (GTV -> PTV)."""
    if lumps is None:
        lumps = [(np.asarray(c, float), np.asarray(semi, float))]
        for _ in range(int(rng.integers(1, 3))):
            off = rng.normal(0, 0.45, 3) * np.asarray(semi)
            lumps.append((np.asarray(c, float) + off, np.asarray(semi) * rng.uniform(0.45, 0.75, 3)))
    out = np.zeros(cv.shape, bool)
    for cc, ss in lumps:
        out |= cv.ellipsoid(cc, ss + margin)
    return out, lumps
