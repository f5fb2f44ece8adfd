"""The phantom's dose: a physics-inspired model of a plan's beams on the CT (:func:`phantom_dose`).

Per beam / control point: the targets' BEV field plus margin, fluence painted with each target's
prescription and lowered for beamlets and beams crossing OARs (the hospital's ``sparing``); a few
MLEM-like beamlet updates; dose = penumbra-blurred fluence x depth dose x inverse square + a low
scatter term, the primary target's D95 scaled to its prescription.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .. import beams as B
from ..case_io import Beam, Plan

# OAR sparing: (initial beamlet fluence reduction, beam-weight penalty, path length (mm) for full effect,
#               optimisation goal: max dose as a fraction of the highest prescription, goal weight)
SPARING: dict[str, tuple[float, float, float, float, float]] = {
    "SpinalCord": (0.6, 1.0, 8.0, 0.55, 1.0), "Brainstem": (0.5, 0.8, 15.0, 0.65, 0.8),
    "LeftParotid": (0.3, 0.5, 15.0, 0.35, 0.4), "RightParotid": (0.3, 0.5, 15.0, 0.35, 0.4),
    "Larynx": (0.2, 0.3, 20.0, 0.55, 0.3), "Esophagus": (0.2, 0.3, 12.0, 0.55, 0.3),
    "Mandible": (0.0, 0.1, 15.0, 0.95, 0.1), "Heart": (0.3, 0.6, 60.0, 0.35, 0.4),
    "LeftLung": (0.0, 0.5, 100.0, 0.3, 0.15), "RightLung": (0.0, 0.5, 100.0, 0.3, 0.15),
    "Rectum": (0.25, 0.5, 25.0, 0.75, 0.5), "Bladder": (0.1, 0.3, 50.0, 0.75, 0.3),
    "LeftFemoralHead": (0.3, 1.0, 30.0, 0.5, 0.5), "RightFemoralHead": (0.3, 1.0, 30.0, 0.5, 0.5),
}
GOAL_VOXELS = 6000  # larger OARs are subsampled (every k-th voxel) for the optimisation


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


@dataclass
class _Voxels:
    """The body voxels the dose is computed on, and the optimisation's subset of them."""

    idx: np.ndarray  # flat indices of the body voxels
    tpos: np.ndarray  # target voxels: positions in idx
    prim: np.ndarray  # primary-target voxels: positions in tpos
    want_body: np.ndarray  # prescription (Gy) of each body voxel, 0 outside the targets
    want: np.ndarray  # prescription (Gy) of each target voxel
    sub: np.ndarray | None = None  # optimisation voxels (positions in idx): targets, OARs, normal tissue
    limit: np.ndarray | None = None  # their dose goal (Gy)
    weight: np.ndarray | None = None  # their goal weight
    oar_slices: list | None = None  # (slice of sub, gamma, kappa, path length, subsampling stride) per OAR

    @property
    def nt(self) -> int:
        return self.tpos.size


@dataclass
class _Beamlets:
    """How the beams are sampled: BEV pixel size, penumbra and voxel blurs (in pixels)."""

    spacing: tuple[float, float, float]
    margin_mm: float
    sparing: float
    sad_mm: float
    pixel: float
    sig_pen: float
    sig_vox: float
    vox_vol: float
    sad2: np.float32


def _target_voxels(masks: Mapping[str, np.ndarray], plan: Plan, body: np.ndarray, n: int
                   ) -> tuple[_Voxels | None, np.ndarray]:
    """(the body and target voxels, or None when there is no body or no target; the position in
    the body voxels of every grid voxel, -1 outside)."""
    tnames = plan.targets  # highest prescription first
    rx = [float(plan.prescriptions[t]) for t in tnames]
    idx = np.flatnonzero(body)
    if idx.size == 0:
        return None, np.zeros(0, np.int64)
    pos_of = np.full(n, -1, np.int64)
    pos_of[idx] = np.arange(idx.size)
    want_body = np.zeros(idx.size, np.float32)
    for t, r in zip(reversed(tnames), reversed(rx)):  # primary written last: it wins overlaps
        p = pos_of[np.flatnonzero(np.asarray(masks[t]) > 0)]
        want_body[p[p >= 0]] = r
    tpos = np.flatnonzero(want_body > 0)
    if tpos.size == 0:
        return None, pos_of
    prim = np.flatnonzero(want_body[tpos] == rx[0])  # primary voxels within tpos
    return _Voxels(idx, tpos, prim, want_body, want_body[tpos]), pos_of


def _distance_to_targets(vox: _Voxels, shape: tuple[int, ...], spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every body voxel to the nearest target voxel, in a box reaching 30 mm
    around the targets (inf beyond)."""
    kk, jj, ii = np.unravel_index(vox.idx[vox.tpos], shape)
    reach = [int(math.ceil(30.0 / sp)) for sp in (spacing[2], spacing[1], spacing[0])]
    box = (slice(max(kk.min() - reach[0], 0), kk.max() + reach[0] + 1),
           slice(max(jj.min() - reach[1], 0), jj.max() + reach[1] + 1),
           slice(max(ii.min() - reach[2], 0), ii.max() + reach[2] + 1))
    tgrid = np.zeros(shape, bool)
    tgrid.ravel()[vox.idx[vox.tpos]] = True
    dist = np.full(shape, np.inf, np.float32)
    dist[box] = ndimage.distance_transform_edt(~tgrid[box], sampling=(spacing[2], spacing[1], spacing[0]))
    return dist.ravel()[vox.idx]


def _goal_voxels(vox: _Voxels, masks: Mapping[str, np.ndarray], pos_of: np.ndarray, dist_body: np.ndarray,
                 near_mm: float, sparing: float, rx_max: float) -> None:
    """The optimisation voxels: targets, then (subsampled) OARs outside the targets, then normal
    tissue around the targets; with their goals and weights (``vox.sub`` etc.)."""
    taken = vox.want_body > 0
    sub = [vox.tpos]
    limit, weight, oar_slices = [np.zeros(vox.nt, np.float32)], [np.ones(vox.nt, np.float32)], []
    start = vox.nt
    for name, (gamma, kappa, length, goal, w) in SPARING.items():
        if name not in masks:
            continue
        p = pos_of[np.flatnonzero(np.asarray(masks[name]) > 0)]
        p = p[(p >= 0)]
        p = p[vox.want_body[p] == 0]
        if p.size == 0:
            continue
        taken[p] = True
        stride = int(math.ceil(p.size / GOAL_VOXELS))
        p = p[::stride]
        sub.append(p)
        limit.append(np.full(p.size, goal * rx_max, np.float32))
        weight.append(np.where(dist_body[p] > near_mm, np.float32(w * sparing), np.float32(0.0)))
        oar_slices.append((slice(start, start + p.size), gamma, kappa, length, stride))
        start += p.size
    # normal tissue around the targets: no hot spots above the highest prescription
    p = np.flatnonzero(np.isfinite(dist_body) & ~taken)
    if p.size:
        p = p[::int(math.ceil(p.size / GOAL_VOXELS))]
        sub.append(p)
        limit.append(np.full(p.size, rx_max, np.float32))
        weight.append(np.full(p.size, 0.5, np.float32))
    vox.sub, vox.limit, vox.weight, vox.oar_slices = np.concatenate(sub), np.concatenate(limit), \
        np.concatenate(weight), oar_slices


def _field(pu: np.ndarray, pv: np.ndarray, vox: _Voxels, bl: _Beamlets, rx: list[float], penumbra_mm: float):
    """(BEV grid, aperture of all targets, fluence painted with each target's prescription
    relative to the highest) of one beam."""
    tsets = [np.flatnonzero(vox.want == r) for r in rx]
    grid, union_ap = B.aperture_from_points(pu[:vox.nt], pv[:vox.nt], bl.spacing, bl.margin_mm,
                                            pad_mm=3 * penumbra_mm, pixel_mm=bl.pixel)
    paint = np.zeros(grid.shape, np.float32)
    for ts, r in zip(reversed(tsets), reversed(rx)):
        if ts.size:
            ap = B.aperture_from_points(pu[ts], pv[ts], bl.spacing, bl.margin_mm, grid=grid)[1]
            paint[ap] = r / rx[0]
    return grid, union_ap, paint


def _oar_sparing(grid: B.BEVGrid, union_ap: np.ndarray, pu: np.ndarray, pv: np.ndarray, vox: _Voxels,
                 bl: _Beamlets) -> tuple[np.ndarray, float]:
    """(fluence modulation lowering beamlets that cross OARs, beam-weight penalty of the OAR
    path through the aperture)."""
    mod = np.ones(grid.shape, np.float32)
    penalty = 0.0
    for sl, gamma, kappa, length, stride in vox.oar_slices:
        path = grid.splat(pu[sl], pv[sl], bl.vox_vol * stride / bl.pixel ** 2)
        if not path.any():
            continue
        frac = np.clip(ndimage.gaussian_filter(path, bl.sig_vox) / length, 0.0, 1.0).astype(np.float32)
        if gamma > 0:
            mod *= 1.0 - np.float32(bl.sparing * gamma) * frac
        if union_ap.any():
            penalty += kappa * float(frac[union_ap].mean())
    return mod, penalty


def _beam_states(plan: Plan, vox: _Voxels, bl: _Beamlets, rx: list[float], rho: np.ndarray, coords_sub,
                 penumbra_mm: float, arc_step_deg: float) -> tuple[list[_BeamState], list[np.ndarray] | None]:
    """Every control point's field, initial fluence and depth dose at the optimisation voxels;
    and the radiological depth of every body voxel per beam when it fits in 256 MB (else None)."""
    states: list[_BeamState] = []
    cps = _control_points(plan.beams, arc_step_deg)
    cache_depth = vox.idx.size * len(cps) * 4 <= 256 * 2 ** 20  # keep body depths for the final pass
    depth_cache: list[np.ndarray] = []
    for beam, mult in cps:
        d = B.beam_direction(beam.gantry, beam.couch)
        pu, pv, r2 = B.bev_coordinates(coords_sub, d, bl.sad_mm)
        grid, union_ap, paint = _field(pu, pv, vox, bl, rx, penumbra_mm)
        mod, penalty = _oar_sparing(grid, union_ap, pu, pv, vox, bl)
        bw = np.float32(mult * math.exp(-bl.sparing * penalty))
        fluence, initial = paint * mod * bw, paint * bw
        depth_full = B.radiological_depth(rho, bl.spacing, d).ravel()
        tdd = _depth_dose(depth_full[vox.idx[vox.sub]], beam.energy_mv) * (bl.sad2 / r2)
        if cache_depth:
            depth_cache.append(depth_full[vox.idx])
        states.append(_BeamState(beam, d, grid, fluence, initial, grid.flat_index(pu, pv), pu, pv, tdd))
    return states, (depth_cache if cache_depth else None)


def _blurred(st: _BeamState, bl: _Beamlets) -> np.ndarray:
    return ndimage.gaussian_filter(st.fluence, bl.sig_pen, truncate=3.0)


def _update_factors(states: list[_BeamState], contrib: list[np.ndarray], ratio: np.ndarray, w_act: np.ndarray,
                    bl: _Beamlets) -> tuple[list[np.ndarray], np.float32]:
    """Per beam, the multiplicative beamlet update (MLEM-like: the goal-weighted dose ratio
    back-projected), and the mean factor over the open beamlets (the updates are relative)."""
    factors, fsum, fn = [], 0.0, 0
    for st, cb in zip(states, contrib):
        wc = w_act * cb
        num = ndimage.gaussian_filter(st.grid.splat(st.pu, st.pv, wc * ratio), bl.sig_vox)
        den = ndimage.gaussian_filter(st.grid.splat(st.pu, st.pv, wc), bl.sig_vox)
        f = np.ones(num.shape, np.float32)
        ok = den > 1e-6 * max(float(den.max()), 1e-30)
        f[ok] = np.clip(num[ok] / den[ok], 0.5, 2.0)
        factors.append(f)
        on = st.initial > 0
        fsum += float(f[on].sum())
        fn += int(on.sum())
    return factors, (np.float32(fsum / fn) if fn else np.float32(1.0))  # relative updates only: no drift


def _optimise(states: list[_BeamState], vox: _Voxels, bl: _Beamlets, rx: list[float], iterations: int) -> None:
    """Fluence optimisation on the target / OAR voxels: the primary's D95 kept at its prescription,
    targets pushed towards theirs, OAR / normal-tissue voxels under their goals while above them."""
    nt, n_sub = vox.nt, vox.sub.size
    for _ in range(max(0, int(iterations))):
        contrib = [B.BEVGrid.sample(_blurred(st, bl), st.fi) * st.tdd for st in states]
        dsub = np.sum(contrib, axis=0)
        d95 = _d95(dsub[vox.prim])
        if d95 <= 0:
            break
        g = np.float32(rx[0] / d95)  # keep the primary's D95 at its prescription (and caps relative)
        dsub *= g
        for st in states:
            st.fluence *= g
            st.initial *= g
        ratio = np.ones(n_sub, np.float32)
        ratio[:nt] = np.clip(vox.want / np.maximum(dsub[:nt], 1e-6), 0.7, 1.4)
        ratio[nt:] = np.clip(vox.limit[nt:] / np.maximum(dsub[nt:], 1e-6), 0.6, 1.0)
        # active set: targets always, OAR / normal-tissue voxels only while above their goal
        w_act = vox.weight * ((ratio < 1.0) | (np.arange(n_sub) < nt))
        factors, mean_f = _update_factors(states, contrib, ratio, w_act, bl)
        for st, f in zip(states, factors):
            st.fluence *= f / mean_f
            # limited modulation: 0.2 .. 1.6 x the painted aperture fluence
            np.clip(st.fluence, 0.2 * st.initial, 1.6 * st.initial, out=st.fluence)


def _body_dose(states: list[_BeamState], vox: _Voxels, bl: _Beamlets, coords, rho: np.ndarray,
               depth_cache: list[np.ndarray] | None) -> np.ndarray:
    """Dose at every body voxel: per beam, blurred fluence x depth dose x inverse square."""
    total = np.zeros(vox.idx.size, np.float32)
    for n, st in enumerate(states):
        pu, pv, r2 = B.bev_coordinates(coords, st.direction, bl.sad_mm)
        val = B.BEVGrid.sample(_blurred(st, bl), st.grid.flat_index(pu, pv))
        if not val.any():
            continue
        depth = depth_cache[n] if depth_cache is not None else \
            B.radiological_depth(rho, bl.spacing, st.direction).ravel()[vox.idx]
        val *= _depth_dose(depth, st.beam.energy_mv)
        val *= bl.sad2 / r2
        total += val
    return total


def phantom_dose(ct_hu: np.ndarray, masks: Mapping[str, np.ndarray], plan: Plan, spacing: Sequence[float],
                 body: np.ndarray | None = None, *, margin_mm: float = 5.0, sparing: float = 1.0,
                 penumbra_mm: float = 3.5, scatter_fraction: float = 0.08, scatter_mm: float = 20.0,
                 sad_mm: float = 1000.0, arc_step_deg: float = 10.0, iterations: int = 10) -> np.ndarray:
    """Physics-inspired dose (Gy, float32, (z, y, x)) of ``plan`` on a CT (the module docstring says how).

    Args:
        ct_hu: CT (z, y, x) in HU; masks: structure -> mask; plan: beams and prescriptions.
        spacing: (x, y, z) mm; body: where dose may be (None: ``Body``, else CT > -500 HU).
        margin_mm: field margin around the targets; sparing: how hard OARs are spared (0: not).
        penumbra_mm: fluence blur; scatter_fraction, scatter_mm: the scatter term's weight and
            Gaussian width; sad_mm: source-axis distance; arc_step_deg: arc sampling.
        iterations: fluence-optimisation updates.
    """
    hu = np.asarray(ct_hu, dtype=np.float32)
    shape = hu.shape
    if body is None:
        body = masks["Body"] if "Body" in masks else hu > -500
    body = np.asarray(body) > 0
    rx = [float(plan.prescriptions[t]) for t in plan.targets]  # highest prescription first
    dose = np.zeros(shape, np.float32)
    vox, pos_of = _target_voxels(masks, plan, body, hu.size)
    if vox is None:
        return dose
    near_mm = 2.0 * penumbra_mm + 0.5 * max(float(v) for v in spacing)  # cannot be spared: no goal there
    _goal_voxels(vox, masks, pos_of, _distance_to_targets(vox, shape, spacing), near_mm, sparing, rx[0])
    rho = B.hu_to_density(hu)
    iso = B.target_centroid(np.asarray(masks[plan.targets[0]]) > 0, spacing)
    pixel = float(np.clip(min(spacing) / 2.0, 1.0, 4.0))
    bl = _Beamlets(spacing=spacing, margin_mm=margin_mm, sparing=sparing, sad_mm=sad_mm, pixel=pixel,
                   sig_pen=penumbra_mm / pixel, sig_vox=max(1.0, 0.6 * max(spacing) / pixel),
                   vox_vol=float(np.prod(spacing)), sad2=np.float32(sad_mm ** 2))
    states, depth_cache = _beam_states(plan, vox, bl, rx, rho, B.VoxelCoords(shape, spacing, iso, vox.idx[vox.sub]),
                                       penumbra_mm, arc_step_deg)
    _optimise(states, vox, bl, rx, iterations)
    dose.ravel()[vox.idx] = _body_dose(states, vox, bl, B.VoxelCoords(shape, spacing, iso, vox.idx), rho, depth_cache)
    if scatter_fraction > 0:
        sx, sy, sz = (float(s) for s in spacing)
        dose += np.float32(scatter_fraction) * ndimage.gaussian_filter(
            dose, (scatter_mm / sz, scatter_mm / sy, scatter_mm / sx), truncate=2.5)
        dose[~body] = 0.0
    d95 = _d95(dose.ravel()[vox.idx[vox.tpos[vox.prim]]])
    if d95 > 0:
        dose *= np.float32(rx[0] / d95)
    return dose
