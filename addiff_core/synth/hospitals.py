"""Phantom hospitals: who they are (case mix, patient build, scanner, planning habits, linac),
the grid a case is drawn on, and how a hospital plans a case (:func:`make_plan`)."""
from __future__ import annotations

import string
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from ..case_io import Beam, Plan
from ..contract import TUMOUR_SITES

# -- hospitals -------------------------------------------------------------------------------------
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


DEFAULT_SCHEMES: dict[str, tuple[Scheme, ...]] = {
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


def as_profile(p: HospitalProfile | str | None) -> HospitalProfile:
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
    prof = as_profile(profile)
    nz, ny, nx = grid_shape(size)
    fov, ext = _FOV[tumour_site]
    fov *= prof.fov_scale
    return (round(fov / nx, 3), round(fov / ny, 3), round(ext / nz, 3))


def grid_shape(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, (int, np.integer)):
        return (int(size),) * 3
    s = tuple(int(v) for v in size)
    if len(s) != 3:
        raise ValueError(f"size must be an int or (z, y, x), got {size!r}")
    return s  # type: ignore[return-value]


# -- plans -----------------------------------------------------------------------------------------
def make_plan(rng: np.random.Generator, tumour_site: str, prof: HospitalProfile, target_x_mm: float = 0.0,
              scheme: Scheme | None = None, targets: Mapping[str, float] | None = None) -> Plan:
    """The hospital's plan for a case: technique, beam arrangement, energy, prescription.

    Args:
        rng: the case's generator; tumour_site, prof: what is planned, by which hospital.
        target_x_mm: the target's side (> 0: patient left): lung beams favour it (a 200 degree
            sector, partial arcs); other sites get equispaced fields / full arcs.
        scheme: (fractions, primary Gy, secondary Gy) (None: drawn from the profile);
        targets: target -> Gy, overriding the scheme's.
    """
    if scheme is None:
        opts = prof.schemes.get(tumour_site) or DEFAULT_SCHEMES[tumour_site]
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
