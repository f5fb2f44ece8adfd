"""Phantom hospitals: non-IID synthetic cases with a physics-inspired dose.

Every hospital (:class:`HospitalProfile`) has its own case mix (tumour sites), patient build,
CT scanner (HU calibration offset, noise), planning habits (IMRT field count or VMAT arcs,
beam energy, prescriptions and fractionation, aperture margin, how hard OARs are spared) and
linac (penumbra). A case is drawn on a cube grid of ``size`` voxels:

* anatomy per tumour site, in LPS millimetres centred on the grid (+x left, +y posterior,
  +z superior): body outline with subcutaneous fat, bones (vertebrae, skull and mandible for
  head & neck; ribs, sternum for lung; pelvis, sacrum, femoral heads for prostate), air
  (airway, lungs, rectal gas), soft tissues with texture, the treatment couch under the patient;
  targets (one or two PTVs, nested/adjacent) and the canonical OARs of ``case_io.OAR_NAMES``;
* dose (:func:`phantom_dose`): for every beam (arcs as control points) a field conformed to the
  targets' beam's-eye-view projection plus margin, painted with each target's prescription,
  fluence lowered for beamlets crossing OARs and beam weights lowered for beams whose path
  crosses OARs; a few multiplicative beamlet updates (an MLEM-like "light optimiser", limited
  modulation) push targets towards their prescriptions and OARs under their goals; then
  penumbra (2-D Gaussian of the fluence), depth dose with build-up and attenuation
  exp(-mu(energy) * radiological depth through the CT), inverse square and a low scatter term;
  the primary target's D95 is scaled to its prescription exactly.

Everything is deterministic for a ``numpy.random.Generator``; :func:`write_synthetic_sites`
seeds one per (seed, site, case).
"""
from __future__ import annotations

import math
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml
from scipy import ndimage

from . import beams as B
from .case_io import TUMOUR_SITES, Beam, Plan, save_case

__all__ = [
    "HospitalProfile", "HOSPITAL_PROFILES", "hospital_profile", "default_spacing", "synth_case",
    "phantom_dose", "make_plan", "write_synthetic_sites", "site_name",
]

# --------------------------------------------------------------------------------------------
# hospitals
# --------------------------------------------------------------------------------------------
# A prescription scheme: (fractions, primary Gy, secondary Gy or None). Target names are PTV<Gy>.
Scheme = tuple[int, float, "float | None"]


@dataclass(frozen=True)
class HospitalProfile:
    name: str
    description: str
    site_mix: tuple[float, float, float]  # probabilities of head_neck, lung, prostate
    body_scale: float = 1.0  # mean patient build (1 = average adult)
    hu_offset: float = 0.0  # scanner calibration offset (HU)
    noise_sd: float = 12.0  # scanner noise (HU)
    vmat_prob: float = 0.0  # probability that a plan is VMAT instead of IMRT
    imrt_fields: tuple[int, ...] = (7,)  # field counts used for IMRT
    vmat_arcs: tuple[int, ...] = (2,)  # arc counts used for VMAT
    start_gantry: float = 0.0  # first IMRT field angle
    energy_mv: tuple[float, float, float] = (6.0, 6.0, 6.0)  # per tumour site
    schemes: Mapping[str, tuple[Scheme, ...]] = field(default_factory=dict)
    secondary_prob: float = 0.5  # prostate: probability of a seminal-vesicle PTV when the scheme has one
    margin_mm: float = 5.0  # aperture margin around the PTV projection
    sparing: float = 1.0  # OAR-sparing aggressiveness (0 = none)
    penumbra_mm: float = 3.5  # linac penumbra (Gaussian sigma)
    fov_scale: float = 1.0  # reconstruction field of view relative to the default


_DEFAULT_SCHEMES: dict[str, tuple[Scheme, ...]] = {
    "head_neck": ((35, 70.0, 56.0),),
    "lung": ((30, 60.0, None),),
    "prostate": ((39, 78.0, None),),
}

HOSPITAL_PROFILES: tuple[HospitalProfile, ...] = (
    HospitalProfile(
        name="hospital_a", description="head & neck centre: mostly H&N, 9/7-field 6 MV IMRT, PTV70/PTV56 in 35 fx, "
                                       "strong parotid/cord sparing, calibrated low-noise scanner",
        site_mix=(0.70, 0.15, 0.15), body_scale=1.0, hu_offset=0.0, noise_sd=10.0, vmat_prob=0.15,
        imrt_fields=(9, 7), vmat_arcs=(2,), start_gantry=0.0, energy_mv=(6.0, 6.0, 6.0),
        schemes={"head_neck": ((35, 70.0, 56.0),), "lung": ((30, 60.0, None),), "prostate": ((39, 78.0, 60.0),)},
        secondary_prob=0.3, margin_mm=5.0, sparing=1.0, penumbra_mm=3.0, fov_scale=1.0),
    HospitalProfile(
        name="hospital_b", description="thoracic centre: mostly lung, VMAT (partial arcs on the tumour side), "
                                       "H&N 66/54 in 30 fx, lung 60/30 or 55/20, larger patients, "
                                       "scanner reading -30 HU with high noise",
        site_mix=(0.15, 0.70, 0.15), body_scale=1.08, hu_offset=-30.0, noise_sd=22.0, vmat_prob=0.8,
        imrt_fields=(7,), vmat_arcs=(1, 2), start_gantry=0.0, energy_mv=(6.0, 6.0, 10.0),
        schemes={"head_neck": ((30, 66.0, 54.0),), "lung": ((30, 60.0, None), (20, 55.0, None)),
                 "prostate": ((28, 70.0, None),)},
        secondary_prob=0.0, margin_mm=4.0, sparing=0.7, penumbra_mm=3.5, fov_scale=1.05),
    HospitalProfile(
        name="hospital_c", description="urology centre: mostly prostate, 5/7-field 15 MV IMRT, 78/39 or 60/20 "
                                       "(seminal vesicles often a second PTV), wide margins, smaller patients, "
                                       "scanner reading +25 HU with low noise",
        site_mix=(0.10, 0.15, 0.75), body_scale=0.95, hu_offset=25.0, noise_sd=7.0, vmat_prob=0.25,
        imrt_fields=(5, 7), vmat_arcs=(1,), start_gantry=0.0, energy_mv=(6.0, 6.0, 15.0),
        schemes={"head_neck": ((35, 70.0, 56.0),), "lung": ((30, 60.0, None),),
                 "prostate": ((39, 78.0, 70.0), (20, 60.0, 48.0))},
        secondary_prob=0.6, margin_mm=7.0, sparing=0.5, penumbra_mm=4.0, fov_scale=0.95),
    HospitalProfile(
        name="hospital_d", description="general centre: balanced mix, single-arc VMAT, hypofractionation "
                                       "(prostate 70/28, lung 55/20), scanner +10 HU",
        site_mix=(0.34, 0.33, 0.33), body_scale=1.03, hu_offset=10.0, noise_sd=15.0, vmat_prob=1.0,
        imrt_fields=(7,), vmat_arcs=(1,), start_gantry=0.0, energy_mv=(6.0, 6.0, 6.0),
        schemes={"head_neck": ((35, 70.0, 56.0), (30, 66.0, 54.0)), "lung": ((20, 55.0, None),),
                 "prostate": ((28, 70.0, None),)},
        secondary_prob=0.0, margin_mm=5.0, sparing=0.85, penumbra_mm=3.5, fov_scale=1.0),
)


def site_name(index: int) -> str:
    """hospital_a, hospital_b, ... (hospital_26, ... beyond z)."""
    return f"hospital_{string.ascii_lowercase[index]}" if index < 26 else f"hospital_{index}"


def hospital_profile(index: int, seed: int = 0) -> HospitalProfile:
    """The profile of the ``index``-th hospital: the four built-in ones, then random variations."""
    if index < len(HOSPITAL_PROFILES):
        return HOSPITAL_PROFILES[index]
    rng = np.random.default_rng([int(seed), int(index), 7919])
    mix = rng.dirichlet([0.6, 0.6, 0.6])
    base = HOSPITAL_PROFILES[int(rng.integers(len(HOSPITAL_PROFILES)))]
    return replace(
        base, name=site_name(index), description=f"random variation of {base.name}",
        site_mix=tuple(float(m) for m in mix), body_scale=float(rng.uniform(0.92, 1.1)),
        hu_offset=float(np.round(rng.uniform(-35, 35))), noise_sd=float(np.round(rng.uniform(6, 25), 1)),
        vmat_prob=float(rng.choice([0.0, 0.3, 0.7, 1.0])), imrt_fields=(int(rng.choice([5, 7, 9])),),
        vmat_arcs=(int(rng.choice([1, 2])),), start_gantry=float(rng.choice([0.0, 180.0, 20.0])),
        energy_mv=(6.0, 6.0, float(rng.choice([6.0, 10.0, 15.0]))), margin_mm=float(rng.choice([4.0, 5.0, 7.0])),
        sparing=float(np.round(rng.uniform(0.4, 1.0), 2)), penumbra_mm=float(rng.choice([3.0, 3.5, 4.0])),
        fov_scale=float(rng.uniform(0.95, 1.05)))


def _profile(p: HospitalProfile | str | None) -> HospitalProfile:
    if p is None:
        return HOSPITAL_PROFILES[0]
    if isinstance(p, HospitalProfile):
        return p
    for q in HOSPITAL_PROFILES:
        if q.name == p:
            return q
    raise ValueError(f"unknown hospital profile {p!r}; known: {', '.join(q.name for q in HOSPITAL_PROFILES)}")


# field of view across x/y and extent along z (mm) per tumour site
_FOV = {"head_neck": (320.0, 240.0), "lung": (500.0, 280.0), "prostate": (500.0, 220.0)}


def default_spacing(tumour_site: str, size: int | Sequence[int], profile: HospitalProfile | str | None = None
                    ) -> tuple[float, float, float]:
    """(x, y, z) spacing in mm so that the site's field of view fills a ``size`` grid."""
    prof = _profile(profile)
    nz, ny, nx = _shape(size)
    fov, ext = _FOV[tumour_site]
    fov *= prof.fov_scale
    return (round(fov / nx, 3), round(fov / ny, 3), round(ext / nz, 3))


def _shape(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, (int, np.integer)):
        return (int(size),) * 3
    s = tuple(int(v) for v in size)
    if len(s) != 3:
        raise ValueError(f"size must be an int or (z, y, x), got {size!r}")
    return s  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------------
class _Canvas:
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


def _sig(t):
    return 1.0 / (1.0 + np.exp(-t))


def _lumpy(cv: _Canvas, rng: np.random.Generator, c: Sequence[float], semi: Sequence[float], margin: float = 0.0,
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


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------
HU = {"air": -1000.0, "lung": -830.0, "fat": -95.0, "soft": 40.0, "muscle": 50.0, "brain": 33.0, "tumour": 55.0,
      "bone": 300.0, "cortical": 1100.0, "cartilage": 150.0, "urine": 8.0, "parotid": -15.0, "gas": -850.0,
      "couch": -250.0, "blood": 45.0}


@dataclass
class _Anatomy:
    hu: np.ndarray
    body: np.ndarray
    bone: np.ndarray
    masks: dict[str, np.ndarray]
    targets: list[tuple[str, np.ndarray, float]]  # (name, mask, Gy), primary first
    couch_y: float


def _body_common(cv: _Canvas, rng: np.random.Generator, cx, cy, ax, ay, p: float, fat_mm: float):
    body = cv.superellipse(cx, cy, ax, ay, p)
    inner = cv.superellipse(cx, cy, np.maximum(ax - fat_mm, 1.0), np.maximum(ay - fat_mm, 1.0), p)
    hu = np.full(cv.shape, HU["air"], np.float32)
    hu[body] = HU["fat"]
    hu[inner] = HU["muscle"]
    return body, inner, hu


def _spine(cv: _Canvas, yc: float, z0: float, z1: float, s: float, cord_r: float = 5.0,
           body_semi=(14.0, 11.0), canal_r: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Vertebral column with a spinal cord at (0, yc): returns (bone, cord)."""
    cord = cv.tube(0.0, yc, cord_r, cord_r * 0.9, z0, z1)
    canal = cv.tube(0.0, yc, canal_r * s, canal_r * s, z0, z1)
    vb = cv.tube(0.0, yc - (canal_r + body_semi[1] + 2) * s, body_semi[0] * s, body_semi[1] * s, z0, z1)
    arch = cv.tube(0.0, yc, (canal_r + 5) * s, (canal_r + 5) * s, z0, z1) & ~canal
    spinous = cv.tube(0.0, yc + (canal_r + 14) * s, 3.5 * s, 12 * s, z0, z1)
    trans = cv.tube(0.0, yc - 2 * s, (canal_r + 18) * s, 4.5 * s, z0, z1)
    bone = vb | arch | spinous | trans
    # intervertebral discs (soft) every ~20 mm in the vertebral bodies
    disc = (np.cos(2 * np.pi * cv.Z / (20.0 * s)) > 0.75) & vb
    return bone & ~disc & ~canal, cord


def _head_neck(cv: _Canvas, rng: np.random.Generator, prof: HospitalProfile, rx: tuple[float, float | None]
               ) -> _Anatomy:
    s = prof.body_scale * float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.2))
    Z = cv.Z
    zj = float(rng.uniform(-15, 15))  # chin / mandible level
    t = _sig((Z - (zj + 15)) / 10.0)  # 0 neck -> 1 head
    sh = _sig(((zj - 85 - rng.uniform(-10, 10)) - Z) / 10.0)  # shoulders at the bottom
    vertex = np.sqrt(np.clip(1.0 - (np.maximum(Z - (zj + 40), 0) / 150.0) ** 2, 0.05, 1.0))  # rounded cranium
    ax = s * (60 * (1 - t) + 77 * t * vertex + 85 * sh) * rng.uniform(0.95, 1.05)
    ay = s * (58 * (1 - t) + 96 * t * vertex + 25 * sh) * rng.uniform(0.95, 1.05)
    cyb = s * (8 * (1 - t) - 8 * t + 8 * sh)
    cxb = float(rng.normal(0, 3))
    fat = float(rng.uniform(4, 10)) * s
    body, inner, hu = _body_common(cv, rng, cxb, cyb, ax, ay, 2.0 + 0.6 * sh, fat)
    masks: dict[str, np.ndarray] = {}

    # spine, cord, brainstem, skull
    yc = 8 + 26 * s + float(rng.normal(0, 2))
    bone, cord = _spine(cv, yc, -1e4, zj + 32, s, cord_r=4.5)
    brainstem = cv.tube(0.0, yc - 8 * s, 12 * s, 11 * s, zj + 30, zj + 72)
    head = t > 0.5
    skull_out = cv.superellipse(cxb, cyb, np.maximum(ax - fat - 1, 1), np.maximum(ay - fat - 1, 1), 2.0)
    skull_in = cv.superellipse(cxb, cyb, np.maximum(ax - fat - 8 * s, 1), np.maximum(ay - fat - 8 * s, 1), 2.0)
    cranium = (Z > zj + 42) & head
    bone |= skull_out & ~skull_in & cranium
    brain = skull_in & cranium
    # skull base: a bony floor under the brain
    bone |= skull_out & (Z > zj + 34) & (Z <= zj + 42) & ~brainstem & (cv.Y > cyb - 40 * s)
    # mandible: a U of bone opening posteriorly
    ym = -12 * s
    mand_out = cv.tube(0.0, ym, 46 * s, 50 * s, zj - 12, zj + 16)
    mand_in = cv.tube(0.0, ym + 2, 38 * s, 42 * s, zj - 12, zj + 16)
    mandible = mand_out & ~mand_in & (cv.Y < ym + 12 * s) & body
    ramus = (cv.ellipsoid((41 * s, ym + 16 * s, zj + 22), (5 * s, 9 * s, 16))
             | cv.ellipsoid((-41 * s, ym + 16 * s, zj + 22), (5 * s, 9 * s, 16))) & body
    mandible |= ramus
    bone |= mandible

    # airway: pharynx -> larynx -> trachea (moves anterior going down)
    def yaw(z):
        return s * (-4 - 18 * _sig((zj - 30 - z) / 8.0))
    airway = cv.tube(0.0, yaw, 8 * s, 6 * s, -1e4, zj + 38) & body
    zl = zj - 48
    larynx = cv.ellipsoid((0.0, -26 * s, zl), (17 * s, 14 * s, 18 * s)) & body
    trachea_post = -22 * s + 8 * s
    vb_ant = yc - (8 + 11 + 2) * s - 11 * s
    ye = 0.5 * (trachea_post + vb_ant)
    esophagus = cv.tube(2.0 * s, ye, 7 * s, 5 * s, -1e4, zl - 12) & body
    parotid_c = [(sgn * 47 * s, 8 * s, zj + 27 + float(rng.normal(0, 3))) for sgn in (1, -1)]
    lp = cv.ellipsoid(parotid_c[0], (11 * s, 16 * s, 19 * s)) & inner & ~bone
    rp = cv.ellipsoid(parotid_c[1], (11 * s, 16 * s, 19 * s)) & inner & ~bone

    hu[brain] = HU["brain"]
    hu[larynx] = HU["cartilage"]
    hu[lp | rp] = HU["parotid"]
    hu[esophagus] = HU["soft"]
    hu[bone] = HU["bone"]
    hu[airway] = HU["air"]
    hu[cord | brainstem] = HU["brain"]

    # targets: primary (oropharynx / tonsil, lateralised) + elective nodes
    side = float(rng.choice([-1.0, 1.0]))
    c = (side * rng.uniform(0, 22) * s, rng.uniform(-16, 2) * s, zj + rng.uniform(-30, 12))
    semi = rng.uniform(13, 25, 3) * s
    gtv, lumps = _lumpy(cv, rng, c, semi)
    gtv &= inner & ~bone
    cord_prv = cv.tube(0.0, yc, 10.0, 10.0, -1e4, zj + 32) | cv.tube(0.0, yc - 8 * s, 15 * s, 14 * s, zj + 30, zj + 72)
    skin = cv.superellipse(cxb, cyb, np.maximum(ax - 5, 1), np.maximum(ay - 5, 1), 2.0 + 0.6 * sh)
    ptv1, _ = _lumpy(cv, rng, c, semi, margin=5.0, lumps=lumps)
    ptv1 &= skin & ~cord_prv
    hu[gtv & ~airway] = HU["tumour"]
    targets = [(f"PTV{rx[0]:g}", cv.ensure(ptv1, c), rx[0])]
    if rx[1] is not None:
        nodes = np.zeros(cv.shape, bool)
        sides = (1.0, -1.0) if rng.random() < 0.75 else (side,)
        for sg in sides:
            nodes |= cv.ellipsoid((sg * 36 * s, 2 * s, zj - 22 + rng.normal(0, 5)), (15 * s, 17 * s, rng.uniform(38, 50)))
        nodes |= cv.ellipsoid(c, np.asarray(semi) + 12.0)
        ptv2 = nodes & skin & ~cord_prv & ~ptv1
        targets.append((f"PTV{rx[1]:g}", cv.ensure(ptv2, (side * 36 * s, 2 * s, zj - 22)), rx[1]))

    masks.update(SpinalCord=cv.ensure(cord & body, (0, yc, zj)), Brainstem=cv.ensure(brainstem & body, (0, yc, zj + 50)),
                 LeftParotid=cv.ensure(lp, parotid_c[0]), RightParotid=cv.ensure(rp, parotid_c[1]),
                 Mandible=cv.ensure(mandible, (0, ym - 45 * s, zj)), Larynx=cv.ensure(larynx, (0, -26 * s, zl)),
                 Esophagus=cv.ensure(esophagus, (0, ye, zl - 40)))
    couch_y = float(np.max(cyb + ay)) + 6.0
    return _Anatomy(hu, body, bone, masks, targets, couch_y)


def _lung(cv: _Canvas, rng: np.random.Generator, prof: HospitalProfile, rx: tuple[float, float | None]) -> _Anatomy:
    s = prof.body_scale * float(np.clip(rng.normal(1.0, 0.07), 0.82, 1.25))
    Z = cv.Z
    ax = s * 165 * rng.uniform(0.93, 1.07) * (1 + 0.05 * Z / 140.0) + 0 * Z
    ay = s * 110 * rng.uniform(0.9, 1.1) + 0 * Z
    cxb, cyb = float(rng.normal(0, 4)), float(rng.normal(0, 4))
    fat = float(rng.uniform(8, 28)) * s
    body, inner, hu = _body_common(cv, rng, cxb, cyb, ax, ay, 2.4, fat)
    # ribcage
    rib_o = cv.superellipse(cxb, cyb, ax - fat - 4 * s, ay - fat - 4 * s, 2.4)
    rib_i = cv.superellipse(cxb, cyb, ax - fat - 12 * s, ay - fat - 12 * s, 2.4)
    phase = rng.uniform(0, 26)
    # ribs slope down anteriorly: an axial slice cuts them into arcs
    ribs = rib_o & ~rib_i & (np.sin(2 * np.pi * (Z + phase + 0.45 * (cv.Y - cyb)) / (26 * s)) > 0.1)
    ribs &= ~((np.abs(cv.X - cxb) < 30 * s) & (cv.Y < cyb))
    cavity = cv.superellipse(cxb, cyb, ax - fat - 14 * s, ay - fat - 14 * s, 2.4)
    y_post = cyb + ay - fat
    yc = float(np.min(y_post)) - 30 * s  # spinal canal
    bone, cord = _spine(cv, yc, -1e4, 1e4, s, cord_r=5.0, body_semi=(19.0, 16.0), canal_r=8.0)
    sternum = cv.tube(cxb, cyb - float(np.mean(ay)) + fat + 12 * s, 16 * s, 7 * s, -70, 1e4)
    bone |= ribs | sternum
    vb_ant = yc - (8 + 16 + 2) * s - 16 * s
    # mediastinum: oesophagus, trachea, bronchi, heart
    ye = vb_ant - 10 * s
    esophagus = cv.tube(6 * s, ye, 7 * s, 6 * s, -1e4, 1e4) & body
    zc = float(rng.uniform(-5, 25))  # carina
    ytr = ye - 20 * s
    trachea = cv.tube(0.0, ytr, 9 * s, 8 * s, zc, 1e4)
    bronchi = cv.segment((0, ytr, zc), (-45 * s, ytr + 8 * s, zc - 35), 6 * s) | \
        cv.segment((0, ytr, zc), (45 * s, ytr + 8 * s, zc - 40), 6 * s)
    zd_r, zd_l = float(rng.uniform(-95, -60)), 0.0
    zd_l = zd_r - float(rng.uniform(5, 15))
    hc = (22 * s + rng.normal(0, 4), cyb - 25 * s, zd_l + 45 + rng.normal(0, 5))
    heart = cv.ellipsoid(hc, np.array([58, 48, 58]) * s * rng.uniform(0.88, 1.12)) & inner
    medi_half = 32 * s * rng.uniform(0.9, 1.1)
    lungs = {}
    for name, sg, zd in (("RightLung", -1.0, zd_r), ("LeftLung", 1.0, zd_l)):
        xc = sg * 75 * s
        dome = zd + 30 * np.maximum(0.0, 1 - ((cv.X - xc) / (80 * s)) ** 2 - (cv.Y / (95 * s)) ** 2)
        cav_ax, cav_ay = ax - fat - 14 * s, ay - fat - 14 * s
        shape_ = ((cv.X - cxb - sg * 0.5 * cav_ax) / (0.56 * cav_ax)) ** 2 + ((cv.Y - cyb) / (0.97 * cav_ay)) ** 2 <= 1
        medi = ((cv.X - cxb) / medi_half) ** 2 + ((cv.Y - cyb + 0.2 * cav_ay) / (1.25 * cav_ay)) ** 2 <= 1
        lung = cavity & shape_ & (sg * (cv.X - cxb) > 0) & ~medi & (Z > dome)
        lung &= ~cv.ellipsoid((cxb, yc - 14 * s, 0.0), (42 * s, 36 * s, 1e4), floor=False)  # vertebra + muscles
        lung &= ~cv.ellipsoid(hc, np.array([66, 56, 64]) * s) & ~bone
        lungs[name] = lung
    lung_all = lungs["RightLung"] | lungs["LeftLung"]
    tex = cv.smooth_noise(6.0)
    hu[lung_all] = HU["lung"] + 35 * tex[lung_all]
    vessels = lung_all & (cv.smooth_noise(5.0) > 1.6)
    hu[vessels] = -150.0
    hu[heart] = HU["blood"]
    hu[esophagus] = HU["soft"]
    hu[trachea | (bronchi & (lung_all | inner))] = HU["air"]
    hu[bone] = HU["bone"]
    hu[cord] = HU["brain"]

    # tumour in one lung (sometimes central / hilar)
    side_name = "LeftLung" if rng.random() < 0.5 else "RightLung"
    sg = 1.0 if side_name == "LeftLung" else -1.0
    semi = rng.uniform(10, 28, 3) * np.array([1, 1, 1.2])
    if rng.random() < 0.25:
        c = np.array([sg * 55 * s, ye - 10 * s, zc - 5 + rng.normal(0, 8)])  # hilar
    else:
        dist = ndimage.distance_transform_edt(lungs[side_name], sampling=cv.spacing[::-1])
        cand = np.flatnonzero(dist > max(12.0, 0.6 * float(np.min(semi))))
        if cand.size == 0:
            cand = np.flatnonzero(lungs[side_name]) if lungs[side_name].any() else np.array([np.ravel_multi_index(
                (cv.shape[0] // 2, cv.shape[1] // 2, int(cv.shape[2] * (0.3 if sg < 0 else 0.7))), cv.shape)])
        k, j, i = np.unravel_index(int(rng.choice(cand)), cv.shape)
        c = np.array([cv.x[i], cv.y[j], cv.z[k]])
    gtv, lumps = _lumpy(cv, rng, c, semi)
    gtv &= inner & ~bone & ~trachea
    hu[gtv] = HU["tumour"] + 0.0
    m = float(rng.uniform(5, 8))
    ptv, _ = _lumpy(cv, rng, c, semi, margin=m, lumps=lumps)
    cord_prv = cv.tube(0.0, yc, 10.0, 10.0, -1e4, 1e4)
    ptv &= inner & ~cord_prv
    targets = [(f"PTV{rx[0]:g}", cv.ensure(ptv, c), rx[0])]
    masks = {"LeftLung": cv.ensure(lungs["LeftLung"] & ~gtv, (75 * s, 0, 0)),
             "RightLung": cv.ensure(lungs["RightLung"] & ~gtv, (-75 * s, 0, 0)),
             "Heart": cv.ensure(heart, hc), "Esophagus": cv.ensure(esophagus, (6 * s, ye, 0)),
             "SpinalCord": cv.ensure(cord & body, (0, yc, 0))}
    couch_y = float(cyb + np.max(ay)) + 6.0
    return _Anatomy(hu, body, bone, masks, targets, couch_y)


def _prostate(cv: _Canvas, rng: np.random.Generator, prof: HospitalProfile, rx: tuple[float, float | None]
              ) -> _Anatomy:
    s = prof.body_scale * float(np.clip(rng.normal(1.0, 0.07), 0.82, 1.25))
    Z = cv.Z
    ax = s * 178 * rng.uniform(0.93, 1.07) * (1 + 0.03 * Z / 110.0)
    ay = s * 118 * rng.uniform(0.9, 1.1) + 0 * Z
    cxb, cyb = float(rng.normal(0, 4)), float(rng.normal(-4, 4))
    fat = float(rng.uniform(12, 40)) * s
    body, inner, hu = _body_common(cv, rng, cxb, cyb, ax, ay, 2.3, fat)
    zf = float(rng.uniform(-30, -15))  # femoral heads level
    bone = np.zeros(cv.shape, bool)
    heads = {}
    for name, sg in (("LeftFemoralHead", 1.0), ("RightFemoralHead", -1.0)):
        hc = (sg * 90 * s, 5 * s, zf)
        r = 24 * s * rng.uniform(0.93, 1.07)
        head = cv.ellipsoid(hc, (r, r, r)) & inner
        heads[name] = cv.ensure(head, hc)
        neck = cv.segment(hc, (sg * 128 * s, 12 * s, zf - 32), 13 * s)
        shaft = cv.segment((sg * 128 * s, 12 * s, zf - 32), (sg * 122 * s, 15 * s, zf - 200), 14 * s)
        acet = cv.ellipsoid(hc, (r + 10, r + 10, r + 10)) & ~cv.ellipsoid(hc, (r + 2, r + 2, r + 2)) & \
            (sg * cv.X < 90 * s)
        ilium = cv.segment((sg * 88 * s, 10 * s, zf + 25), (sg * 112 * s, 45 * s, zf + 120), 11 * s)
        ischium = cv.ellipsoid((sg * 55 * s, 38 * s, zf - 32), (11 * s, 18 * s, 24 * s))
        ramus = cv.segment((sg * 18 * s, -68 * s, zf - 8), (sg * 78 * s, -22 * s, zf + 4), 8 * s)
        pubis = cv.ellipsoid((sg * 17 * s, -70 * s, zf - 12), (13 * s, 10 * s, 18 * s))
        bone |= (head | neck | shaft | acet | ilium | ischium | ramus | pubis)
    sacrum = cv.tube(0.0, lambda z: 95 * s - 0.25 * (z - zf), 42 * s, 13 * s, zf + 5, 1e4) | \
        cv.segment((0, 95 * s, zf + 5), (0, 80 * s, zf - 35), 9 * s)
    bone |= sacrum
    bone &= inner
    # pelvic organs
    pc = np.array([rng.normal(0, 2), -8 * s + rng.normal(0, 4), zf - 8 + rng.normal(0, 6)])
    psemi = np.array([22, 17, 20]) * rng.uniform(0.85, 1.3)
    prostate = cv.ellipsoid(pc, psemi)
    ry = pc[1] + psemi[1] + 16 * s
    rr = 17 * s * rng.uniform(0.9, 1.2)
    rect_y = lambda z: ry + 0.3 * np.maximum(z - pc[2], 0)
    rectum = cv.tube(0.0, rect_y, rr, rr * 0.9, pc[2] - 50, pc[2] + 45) & inner & ~bone
    fill = float(rng.uniform(0.7, 1.3))
    bsemi = np.array([45, 35, 30]) * s * fill
    bc = (float(rng.normal(0, 3)), pc[1] - 18 * s, pc[2] + psemi[2] + bsemi[2] - 6)
    bladder = cv.ellipsoid(bc, bsemi) & inner & ~prostate & ~bone
    sv = cv.ellipsoid((16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (17 * s, 7 * s, 9 * s)) | \
        cv.ellipsoid((-16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (17 * s, 7 * s, 9 * s))
    sv &= ~bladder & ~rectum
    fossa = cv.ellipsoid((35 * s, ry + 5, pc[2] - 25), (15 * s, 22 * s, 28 * s)) | \
        cv.ellipsoid((-35 * s, ry + 5, pc[2] - 25), (15 * s, 22 * s, 28 * s))
    hu[fossa & inner & ~bone] = HU["fat"]
    hu[prostate | sv] = HU["soft"]
    hu[bladder] = HU["urine"]
    hu[rectum] = HU["soft"]
    if rng.random() < 0.5:
        gas = cv.tube(0.0, rect_y, rr * 0.45, rr * 0.35, pc[2] - 20, pc[2] + 40) & rectum
        hu[gas] = HU["gas"]
    hu[bone] = HU["bone"]
    # targets: prostate PTV (smaller posterior margin), seminal vesicles optionally
    ptv1 = cv.ellipsoid(pc - np.array([0, 1.0, 0]), psemi + np.array([7, 6, 7])) & inner
    targets = [(f"PTV{rx[0]:g}", cv.ensure(ptv1, pc), rx[0])]
    if rx[1] is not None:
        ptv2 = (cv.ellipsoid((16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (23 * s, 13 * s, 15 * s)) |
                cv.ellipsoid((-16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (23 * s, 13 * s, 15 * s)))
        ptv2 &= inner & ~ptv1
        targets.append((f"PTV{rx[1]:g}", cv.ensure(ptv2, (16 * s, pc[1] + 14 * s, pc[2] + psemi[2])), rx[1]))
    masks = {"Rectum": cv.ensure(rectum, (0, ry, pc[2])), "Bladder": cv.ensure(bladder, bc), **heads}
    couch_y = float(cyb + np.max(ay)) + 6.0
    return _Anatomy(hu, body, bone, masks, targets, couch_y)


_ANATOMY = {"head_neck": _head_neck, "lung": _lung, "prostate": _prostate}


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
def make_plan(rng: np.random.Generator, tumour_site: str, prof: HospitalProfile, target_x_mm: float = 0.0,
              scheme: Scheme | None = None, targets: Mapping[str, float] | None = None) -> Plan:
    """The hospital's plan for a case: technique, beam arrangement, energy, prescription.

    Lung beams favour the tumour side (``target_x_mm`` > 0: patient left): IMRT fields spread over
    a 200 degree sector, VMAT partial arcs; other sites use equispaced fields / full arcs.
    """
    if scheme is None:
        opts = prof.schemes.get(tumour_site) or _DEFAULT_SCHEMES[tumour_site]
        scheme = opts[int(rng.integers(len(opts)))]
    fx, rx1, rx2 = scheme
    if targets is None:
        targets = {f"PTV{rx1:g}": rx1, **({f"PTV{rx2:g}": rx2} if rx2 is not None else {})}
    energy = float(prof.energy_mv[TUMOUR_SITES.index(tumour_site)])
    vmat = rng.random() < prof.vmat_prob
    sector = tumour_site == "lung"
    centre = 90.0 if target_x_mm >= 0 else 270.0  # gantry 90 = source at the patient's left
    if vmat:
        n_arcs = int(rng.choice(prof.vmat_arcs))
        if sector:
            arc = Beam(gantry=(centre - 100.0) % 360, gantry_stop=(centre + 100.0) % 360, energy_mv=energy)
        else:
            arc = Beam(gantry=181.0, gantry_stop=179.0, energy_mv=energy)
        beams = (arc,) * n_arcs
        technique = "VMAT"
    else:
        n = int(rng.choice(prof.imrt_fields))
        if sector:
            angles = centre - 100.0 + 200.0 * np.arange(n) / (n - 1)
        else:
            angles = prof.start_gantry + 360.0 * np.arange(n) / n
        beams = tuple(Beam(gantry=float(round(a % 360, 1)), energy_mv=energy) for a in angles)
        technique = "IMRT"
    return Plan(tumour_site=tumour_site, prescriptions=dict(targets), fractions=int(fx), technique=technique,
                beams=beams)


# --------------------------------------------------------------------------------------------
# dose
# --------------------------------------------------------------------------------------------
# OAR sparing: (initial beamlet fluence reduction, beam-weight penalty, path length (mm) for full effect,
#               optimisation goal: max dose as a fraction of the highest prescription, goal weight)
_SPARING: dict[str, tuple[float, float, float, float, float]] = {
    "SpinalCord": (0.6, 1.0, 8.0, 0.55, 1.0), "Brainstem": (0.5, 0.8, 15.0, 0.65, 0.8),
    "LeftParotid": (0.3, 0.5, 15.0, 0.35, 0.4), "RightParotid": (0.3, 0.5, 15.0, 0.35, 0.4),
    "Larynx": (0.2, 0.3, 20.0, 0.55, 0.3), "Esophagus": (0.2, 0.3, 12.0, 0.55, 0.3),
    "Mandible": (0.0, 0.1, 15.0, 0.95, 0.1), "Heart": (0.3, 0.6, 60.0, 0.35, 0.4),
    "LeftLung": (0.0, 0.5, 100.0, 0.3, 0.15), "RightLung": (0.0, 0.5, 100.0, 0.3, 0.15),
    "Rectum": (0.25, 0.5, 25.0, 0.75, 0.5), "Bladder": (0.1, 0.3, 50.0, 0.75, 0.3),
    "LeftFemoralHead": (0.3, 1.0, 30.0, 0.5, 0.5), "RightFemoralHead": (0.3, 1.0, 30.0, 0.5, 0.5),
}
_GOAL_VOXELS = 6000  # larger OARs are subsampled (every k-th voxel) for the optimisation


def _depth_dose_params(energy_mv: float) -> tuple[float, float, float]:
    """(mu per mm, build-up length mm, surface dose fraction) for a photon beam."""
    e = [4.0, 6.0, 10.0, 15.0, 18.0]
    mu = float(np.interp(energy_mv, e, [0.0055, 0.0048, 0.0041, 0.0036, 0.0034]))
    bu = float(np.interp(energy_mv, e, [3.5, 4.5, 7.0, 9.0, 10.0]))
    s0 = float(np.interp(energy_mv, e, [0.3, 0.3, 0.25, 0.2, 0.2]))
    return mu, bu, s0


def _depth_dose(depth: np.ndarray, energy_mv: float) -> np.ndarray:
    """Relative depth dose: build-up from the surface dose, then exp(-mu * depth)."""
    mu, bu, s0 = _depth_dose_params(energy_mv)
    out = np.exp(-np.float32(mu) * depth)
    out *= 1.0 - np.float32(1.0 - s0) * np.exp(-depth / np.float32(bu))
    return out


def _control_points(beams: Sequence[Beam], arc_step_deg: float) -> list[tuple[Beam, float]]:
    """Static control points with multiplicities (identical arcs are computed once)."""
    out: dict[tuple[float, float, float], float] = {}
    for b in B.expand_beams(beams, arc_step_deg):
        key = (round(b.gantry % 360.0, 3), round(b.couch, 3), round(b.energy_mv, 3))
        out[key] = out.get(key, 0.0) + 1.0
    return [(Beam(gantry=g, couch=c, energy_mv=e), w) for (g, c, e), w in out.items()]


def _d95(values: np.ndarray) -> float:
    return float(np.percentile(values, 5.0)) if values.size else 0.0


@dataclass
class _BeamState:
    beam: Beam
    direction: np.ndarray
    grid: B.BEVGrid
    fluence: np.ndarray  # un-blurred, on grid
    initial: np.ndarray  # painted aperture x beam weight (reference for the modulation limits)
    fi: np.ndarray  # flat BEV index of the optimisation voxels
    pu: np.ndarray
    pv: np.ndarray
    tdd: np.ndarray  # depth dose x inverse square at the optimisation voxels


def phantom_dose(ct_hu: np.ndarray, masks: Mapping[str, np.ndarray], plan: Plan, spacing: Sequence[float],
                 body: np.ndarray | None = None, *, margin_mm: float = 5.0, sparing: float = 1.0,
                 penumbra_mm: float = 3.5, scatter_fraction: float = 0.08, scatter_mm: float = 20.0,
                 sad_mm: float = 1000.0, arc_step_deg: float = 10.0, iterations: int = 10) -> np.ndarray:
    """Physics-inspired dose (Gy, float32, (z, y, x)) of ``plan`` on a CT; zero outside ``body``.

    Per static beam / arc control point: the field is the BEV projection of the targets dilated by
    ``margin_mm``; its initial fluence is painted with each target's prescription (relative to
    the highest), lowered for beamlets crossing OARs, and the beam weight is lowered for beams
    whose path crosses OARs (both scaled by ``sparing``). A few multiplicative (MLEM-like)
    beamlet updates then push target voxels towards their prescription and OAR voxels under
    their goals. Dose = sum over beams of penumbra-blurred fluence x depth dose
    (build-up, exp(-mu * radiological depth through the CT)) x inverse square, plus a low
    scatter term (``scatter_fraction`` x 3-D Gaussian of ``scatter_mm``). Finally the primary
    target's D95 is scaled to its prescription exactly.
    """
    hu = np.asarray(ct_hu, dtype=np.float32)
    shape = hu.shape
    if body is None:
        body = masks["Body"] if "Body" in masks else hu > -500
    body = np.asarray(body) > 0
    tnames = plan.targets  # highest prescription first
    rx = [float(plan.prescriptions[t]) for t in tnames]
    rx_max = rx[0]
    dose = np.zeros(shape, np.float32)
    idx = np.flatnonzero(body)
    if idx.size == 0:
        return dose
    pos_of = np.full(hu.size, -1, np.int64)
    pos_of[idx] = np.arange(idx.size)
    want_body = np.zeros(idx.size, np.float32)
    for t, r in zip(reversed(tnames), reversed(rx)):  # primary written last: it wins overlaps
        p = pos_of[np.flatnonzero(np.asarray(masks[t]) > 0)]
        want_body[p[p >= 0]] = r
    tpos = np.flatnonzero(want_body > 0)
    if tpos.size == 0:
        return dose
    prim = np.flatnonzero(want_body[tpos] == rx_max)  # primary voxels within tpos
    # distance (mm) to the nearest target voxel, in a box reaching 30 mm around the targets
    kk, jj, ii = np.unravel_index(idx[tpos], shape)
    reach = [int(math.ceil(30.0 / sp)) for sp in (spacing[2], spacing[1], spacing[0])]
    box = (slice(max(kk.min() - reach[0], 0), kk.max() + reach[0] + 1),
           slice(max(jj.min() - reach[1], 0), jj.max() + reach[1] + 1),
           slice(max(ii.min() - reach[2], 0), ii.max() + reach[2] + 1))
    tgrid = np.zeros(shape, bool)
    tgrid.ravel()[idx[tpos]] = True
    dist = np.full(shape, np.inf, np.float32)
    dist[box] = ndimage.distance_transform_edt(~tgrid[box], sampling=(spacing[2], spacing[1], spacing[0]))
    dist_body = dist.ravel()[idx]
    near_mm = 2.0 * penumbra_mm + 0.5 * max(float(v) for v in spacing)  # cannot be spared: no goal there
    # optimisation voxels: targets, then (subsampled) OARs outside the targets, then normal tissue
    sub = [tpos]
    limit, weight, oar_slices = [np.zeros(tpos.size, np.float32)], [np.ones(tpos.size, np.float32)], []
    start = tpos.size
    taken = want_body > 0
    for name, (gamma, kappa, length, goal, w) in _SPARING.items():
        if name not in masks:
            continue
        p = pos_of[np.flatnonzero(np.asarray(masks[name]) > 0)]
        p = p[(p >= 0)]
        p = p[want_body[p] == 0]
        if p.size == 0:
            continue
        taken[p] = True
        stride = int(math.ceil(p.size / _GOAL_VOXELS))
        p = p[::stride]
        sub.append(p)
        limit.append(np.full(p.size, goal * rx_max, np.float32))
        weight.append(np.where(dist_body[p] > near_mm, np.float32(w * sparing), np.float32(0.0)))
        oar_slices.append((slice(start, start + p.size), gamma, kappa, length, stride))
        start += p.size
    # normal tissue around the targets: no hot spots above the highest prescription
    p = np.flatnonzero(np.isfinite(dist_body) & ~taken)
    if p.size:
        p = p[::int(math.ceil(p.size / _GOAL_VOXELS))]
        sub.append(p)
        limit.append(np.full(p.size, rx_max, np.float32))
        weight.append(np.full(p.size, 0.5, np.float32))
    sub = np.concatenate(sub)
    limit, weight = np.concatenate(limit), np.concatenate(weight)
    nt = tpos.size
    want = want_body[tpos]
    rho = B.hu_to_density(hu)
    iso = B.target_centroid(np.asarray(masks[tnames[0]]) > 0, spacing)
    coords_sub = B.VoxelCoords(shape, spacing, iso, idx[sub])
    pixel = float(np.clip(min(spacing) / 2.0, 1.0, 4.0))
    sig_pen = penumbra_mm / pixel
    sig_vox = max(1.0, 0.6 * max(spacing) / pixel)
    vox_vol = float(np.prod(spacing))
    sad2 = np.float32(sad_mm ** 2)
    tsets = [np.flatnonzero(want == r) for r in rx]

    states: list[_BeamState] = []
    cps = _control_points(plan.beams, arc_step_deg)
    cache_depth = idx.size * len(cps) * 4 <= 256 * 2 ** 20  # keep body depths for the final pass
    depth_cache: list[np.ndarray] = []
    for beam, mult in cps:
        d = B.beam_direction(beam.gantry, beam.couch)
        pu, pv, r2 = B.bev_coordinates(coords_sub, d, sad_mm)
        grid, union_ap = B.aperture_from_points(pu[:nt], pv[:nt], spacing, margin_mm, pad_mm=3 * penumbra_mm,
                                                pixel_mm=pixel)
        paint = np.zeros(grid.shape, np.float32)
        for ts, r in zip(reversed(tsets), reversed(rx)):
            if ts.size:
                ap = B.aperture_from_points(pu[ts], pv[ts], spacing, margin_mm, grid=grid)[1]
                paint[ap] = r / rx_max
        mod = np.ones(grid.shape, np.float32)
        penalty = 0.0
        for sl, gamma, kappa, length, stride in oar_slices:
            path = grid.splat(pu[sl], pv[sl], vox_vol * stride / pixel ** 2)
            if not path.any():
                continue
            frac = np.clip(ndimage.gaussian_filter(path, sig_vox) / length, 0.0, 1.0).astype(np.float32)
            if gamma > 0:
                mod *= 1.0 - np.float32(sparing * gamma) * frac
            if union_ap.any():
                penalty += kappa * float(frac[union_ap].mean())
        bw = np.float32(mult * math.exp(-sparing * penalty))
        fluence, initial = paint * mod * bw, paint * bw
        depth_full = B.radiological_depth(rho, spacing, d).ravel()
        tdd = _depth_dose(depth_full[idx[sub]], beam.energy_mv) * (sad2 / r2)
        if cache_depth:
            depth_cache.append(depth_full[idx])
        states.append(_BeamState(beam, d, grid, fluence, initial, grid.flat_index(pu, pv), pu, pv, tdd))

    def blurred(st: _BeamState) -> np.ndarray:
        return ndimage.gaussian_filter(st.fluence, sig_pen, truncate=3.0)

    # fluence optimisation on the target / OAR voxels
    for _ in range(max(0, int(iterations))):
        contrib = [B.BEVGrid.sample(blurred(st), st.fi) * st.tdd for st in states]
        dsub = np.sum(contrib, axis=0)
        d95 = _d95(dsub[prim])
        if d95 <= 0:
            break
        g = np.float32(rx[0] / d95)  # keep the primary's D95 at its prescription (and caps relative)
        dsub *= g
        for st in states:
            st.fluence *= g
            st.initial *= g
        ratio = np.ones(sub.size, np.float32)
        ratio[:nt] = np.clip(want / np.maximum(dsub[:nt], 1e-6), 0.7, 1.4)
        ratio[nt:] = np.clip(limit[nt:] / np.maximum(dsub[nt:], 1e-6), 0.6, 1.0)
        # active set: targets always, OAR / normal-tissue voxels only while above their goal
        w_act = weight * ((ratio < 1.0) | (np.arange(sub.size) < nt))
        factors, fsum, fn = [], 0.0, 0
        for st, cb in zip(states, contrib):
            wc = w_act * cb
            num = ndimage.gaussian_filter(st.grid.splat(st.pu, st.pv, wc * ratio), sig_vox)
            den = ndimage.gaussian_filter(st.grid.splat(st.pu, st.pv, wc), sig_vox)
            f = np.ones(num.shape, np.float32)
            ok = den > 1e-6 * max(float(den.max()), 1e-30)
            f[ok] = np.clip(num[ok] / den[ok], 0.5, 2.0)
            factors.append(f)
            on = st.initial > 0
            fsum += float(f[on].sum())
            fn += int(on.sum())
        mean_f = np.float32(fsum / fn) if fn else np.float32(1.0)  # relative updates only: no drift
        for st, f in zip(states, factors):
            st.fluence *= f / mean_f
            # limited modulation: 0.2 .. 1.6 x the painted aperture fluence
            np.clip(st.fluence, 0.2 * st.initial, 1.6 * st.initial, out=st.fluence)

    # final dose on the whole body
    coords = B.VoxelCoords(shape, spacing, iso, idx)
    total = np.zeros(idx.size, np.float32)
    for n, st in enumerate(states):
        pu, pv, r2 = B.bev_coordinates(coords, st.direction, sad_mm)
        val = B.BEVGrid.sample(blurred(st), st.grid.flat_index(pu, pv))
        if not val.any():
            continue
        depth = depth_cache[n] if cache_depth else B.radiological_depth(rho, spacing, st.direction).ravel()[idx]
        val *= _depth_dose(depth, st.beam.energy_mv)
        val *= sad2 / r2
        total += val
    dose.ravel()[idx] = total
    if scatter_fraction > 0:
        sx, sy, sz = (float(s) for s in spacing)
        dose += np.float32(scatter_fraction) * ndimage.gaussian_filter(
            dose, (scatter_mm / sz, scatter_mm / sy, scatter_mm / sx), truncate=2.5)
        dose[~body] = 0.0
    d95 = _d95(dose.ravel()[idx[tpos[prim]]])
    if d95 > 0:
        dose *= np.float32(rx[0] / d95)
    return dose


# --------------------------------------------------------------------------------------------
# cases and sites
# --------------------------------------------------------------------------------------------
def synth_case(rng: np.random.Generator, tumour_site: str, size: int | Sequence[int] = 32,
               spacing: Sequence[float] | None = None, hospital_profile: HospitalProfile | str | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, Plan, np.ndarray]:
    """One phantom case: ``(ct_hu int16, masks {name: bool}, dose Gy float32, plan, possible_dose_mask)``.

    All arrays are (z, y, x) on the same grid of ``size`` (int: a cube) with ``spacing`` (x, y, z)
    mm (None: :func:`default_spacing`). Masks: the plan's PTVs, the tumour site's OARs (canonical
    ``case_io.OAR_NAMES``) and ``Body``; ``possible_dose_mask`` is the body.
    """
    if tumour_site not in TUMOUR_SITES:
        raise ValueError(f"tumour_site must be one of {', '.join(TUMOUR_SITES)}, got {tumour_site!r}")
    prof = _profile(hospital_profile)
    shape = _shape(size)
    spacing = default_spacing(tumour_site, shape, prof) if spacing is None else tuple(float(s) for s in spacing)
    opts = prof.schemes.get(tumour_site) or _DEFAULT_SCHEMES[tumour_site]
    fx, rx1, rx2 = opts[int(rng.integers(len(opts)))]
    if tumour_site == "prostate" and rx2 is not None and rng.random() >= prof.secondary_prob:
        rx2 = None
    cv = _Canvas(shape, spacing, rng)
    anat = _ANATOMY[tumour_site](cv, rng, prof, (rx1, rx2))
    # treatment couch: a carbon-fibre slab under the patient
    hu = anat.hu
    couch = (cv.Y >= anat.couch_y) & (cv.Y <= anat.couch_y + 12.0) & (np.abs(cv.X) < 260.0) & (hu <= -900)
    couch = np.broadcast_to(couch, shape)
    hu[couch] = HU["couch"]
    # bone: cancellous inside, cortical rim
    if anat.bone.any():
        core = ndimage.binary_erosion(anat.bone)
        rim = anat.bone & ~core
        hu[rim] = HU["cortical"]
        hu[core] = HU["bone"] + 60.0 * cv.smooth_noise(8.0)[core]
    soft = anat.body & (hu > -300) & (hu < 200)
    hu[soft] += 12.0 * cv.smooth_noise(12.0)[soft]
    # scanner: resolution blur, calibration offset, noise
    hu = ndimage.gaussian_filter(hu, 0.5)
    hu += np.float32(prof.hu_offset)
    hu += rng.normal(0.0, prof.noise_sd, shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    tx = float(np.mean(cv.x[np.nonzero(anat.targets[0][1])[2]]))
    plan = make_plan(rng, tumour_site, prof, target_x_mm=tx, scheme=(fx, rx1, rx2),
                     targets={n: r for n, _, r in anat.targets})
    masks = {n: m for n, m, _ in anat.targets}
    masks.update(anat.masks)
    masks["Body"] = anat.body.copy()
    for k in masks:
        masks[k] = np.ascontiguousarray(masks[k] & anat.body)
    dose = phantom_dose(ct, masks, plan, spacing, anat.body, margin_mm=prof.margin_mm, sparing=prof.sparing,
                        penumbra_mm=prof.penumbra_mm)
    return ct, masks, dose, plan, anat.body.copy()


def _allocate(mix: Sequence[float], n: int, rng: np.random.Generator) -> list[str]:
    """Tumour sites for n cases in proportion to ``mix`` (largest remainder), shuffled."""
    p = np.asarray(mix, float) / float(np.sum(mix))
    counts = np.floor(p * n).astype(int)
    rem = p * n - counts
    for i in np.argsort(-rem, kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    sites = [TUMOUR_SITES[i] for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(sites)
    return sites


def write_synthetic_sites(out_dir: str | Path, n_sites: int = 3, cases_per_site: int = 4, size: int = 32,
                          seed: int = 0) -> list[Path]:
    """Write ``n_sites`` phantom hospitals under ``out_dir`` and return their site files.

    Layout: ``out_dir/<site>.yaml`` (loads with ``config.load_site_config``),
    ``out_dir/<site>/cases/<site>_NNN/`` case folders (``case_io.save_case``) and
    ``out_dir/<site>/profile.yaml`` describing the hospital. Deterministic for ``seed``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for si in range(int(n_sites)):
        prof = hospital_profile(si, seed)
        name = site_name(si)
        prof = replace(prof, name=name)
        sites = _allocate(prof.site_mix, int(cases_per_site), np.random.default_rng([int(seed), si, 104729]))
        case_root = out_dir / name / "cases"
        for ci, tsite in enumerate(sites):
            rng = np.random.default_rng([int(seed), si, ci])
            spacing = default_spacing(tsite, size, prof)
            ct, masks, dose, plan, pdm = synth_case(rng, tsite, size, spacing, prof)
            shape = ct.shape
            origin = tuple(-(n - 1) / 2.0 * sp for n, sp in zip(shape[::-1], spacing))
            save_case(case_root / f"{name}_{ci:03d}", ct, plan, masks, dose=dose, possible_dose_mask=pdm,
                      spacing=spacing, origin=origin)
        prof_d = asdict(prof)
        prof_d["schemes"] = {k: [list(v) for v in vs] for k, vs in prof.schemes.items()}
        prof_d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof_d.items()}
        prof_d["cases"] = {t: sites.count(t) for t in TUMOUR_SITES}
        (out_dir / name / "profile.yaml").write_text(yaml.safe_dump(prof_d, sort_keys=False), encoding="utf-8")
        site = {
            "name": name,
            "data_dir": f"{name}/cases",
            "heldout": {"fraction": 0.25, "seed": int(seed)},
            "device": "auto",
            "training": {"batch_size": 2, "optimizer": "adamw", "lr": 1.0e-3, "vae_epochs": 2,
                         "diffusion_epochs": 2, "seed": int(seed) + si},
            "privacy": {"enabled": False},
        }
        header = (f"# Synthetic phantom hospital ({name}): {prof.description}.\n"
                  f"# Written by addiff_core.synth.write_synthetic_sites(seed={seed}, size={size}).\n")
        p = out_dir / f"{name}.yaml"
        p.write_text(header + yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
        paths.append(p)
    return paths
