"""The lung phantom: chest with ribs, sternum and spine, mediastinum (oesophagus, trachea,
bronchi, heart), two lungs with domed bases and vessels; a peripheral or hilar tumour PTV."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from .body import HU, Anatomy, body_common, spine
from .canvas import Canvas, lumpy
from .hospitals import HospitalProfile


def _outline(cv: Canvas, rng: np.random.Generator, prof: HospitalProfile) -> SimpleNamespace:
    g = SimpleNamespace()
    s = g.s = prof.body_scale * float(np.clip(rng.normal(1.0, 0.07), 0.82, 1.25))
    Z = cv.Z
    g.ax = s * 165 * rng.uniform(0.93, 1.07) * (1 + 0.05 * Z / 140.0) + 0 * Z
    g.ay = s * 110 * rng.uniform(0.9, 1.1) + 0 * Z
    g.cxb, g.cyb = float(rng.normal(0, 4)), float(rng.normal(0, 4))
    g.fat = float(rng.uniform(8, 28)) * s
    g.body, g.inner, g.hu = body_common(cv, g.cxb, g.cyb, g.ax, g.ay, 2.4, g.fat)
    return g


def _chest_wall(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace) -> None:
    """Ribcage (ribs slope down anteriorly: an axial slice cuts them into arcs), thoracic cavity,
    spine and cord, sternum."""
    s, cxb, cyb, ax, ay, fat = g.s, g.cxb, g.cyb, g.ax, g.ay, g.fat
    rib_o = cv.superellipse(cxb, cyb, ax - fat - 4 * s, ay - fat - 4 * s, 2.4)
    rib_i = cv.superellipse(cxb, cyb, ax - fat - 12 * s, ay - fat - 12 * s, 2.4)
    phase = rng.uniform(0, 26)
    ribs = rib_o & ~rib_i & (np.sin(2 * np.pi * (cv.Z + phase + 0.45 * (cv.Y - cyb)) / (26 * s)) > 0.1)
    ribs &= ~((np.abs(cv.X - cxb) < 30 * s) & (cv.Y < cyb))
    g.cavity = cv.superellipse(cxb, cyb, ax - fat - 14 * s, ay - fat - 14 * s, 2.4)
    y_post = cyb + ay - fat
    g.yc = float(np.min(y_post)) - 30 * s  # spinal canal
    bone, g.cord = spine(cv, g.yc, -1e4, 1e4, s, cord_r=5.0, body_semi=(19.0, 16.0), canal_r=8.0)
    sternum = cv.tube(cxb, cyb - float(np.mean(ay)) + fat + 12 * s, 16 * s, 7 * s, -70, 1e4)
    g.bone = bone | ribs | sternum


def _mediastinum(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace) -> None:
    """Oesophagus, trachea, bronchi, heart; the diaphragm levels and the mediastinum's width."""
    s = g.s
    vb_ant = g.yc - (8 + 16 + 2) * s - 16 * s
    g.ye = ye = vb_ant - 10 * s
    g.esophagus = cv.tube(6 * s, ye, 7 * s, 6 * s, -1e4, 1e4) & g.body
    g.zc = zc = float(rng.uniform(-5, 25))  # carina
    ytr = ye - 20 * s
    g.trachea = cv.tube(0.0, ytr, 9 * s, 8 * s, zc, 1e4)
    g.bronchi = cv.segment((0, ytr, zc), (-45 * s, ytr + 8 * s, zc - 35), 6 * s) | \
        cv.segment((0, ytr, zc), (45 * s, ytr + 8 * s, zc - 40), 6 * s)
    g.zd_r = float(rng.uniform(-95, -60))
    g.zd_l = g.zd_r - float(rng.uniform(5, 15))
    g.hc = (22 * s + rng.normal(0, 4), g.cyb - 25 * s, g.zd_l + 45 + rng.normal(0, 5))
    g.heart = cv.ellipsoid(g.hc, np.array([58, 48, 58]) * s * rng.uniform(0.88, 1.12)) & g.inner
    g.medi_half = 32 * s * rng.uniform(0.9, 1.1)


def _lungs(cv: Canvas, g: SimpleNamespace) -> dict[str, np.ndarray]:
    s, cxb, cyb = g.s, g.cxb, g.cyb
    lungs = {}
    for name, sg, zd in (("RightLung", -1.0, g.zd_r), ("LeftLung", 1.0, g.zd_l)):
        xc = sg * 75 * s
        dome = zd + 30 * np.maximum(0.0, 1 - ((cv.X - xc) / (80 * s)) ** 2 - (cv.Y / (95 * s)) ** 2)
        cav_ax, cav_ay = g.ax - g.fat - 14 * s, g.ay - g.fat - 14 * s
        shape_ = ((cv.X - cxb - sg * 0.5 * cav_ax) / (0.56 * cav_ax)) ** 2 + ((cv.Y - cyb) / (0.97 * cav_ay)) ** 2 <= 1
        medi = ((cv.X - cxb) / g.medi_half) ** 2 + ((cv.Y - cyb + 0.2 * cav_ay) / (1.25 * cav_ay)) ** 2 <= 1
        lung = g.cavity & shape_ & (sg * (cv.X - cxb) > 0) & ~medi & (cv.Z > dome)
        lung &= ~cv.ellipsoid((cxb, g.yc - 14 * s, 0.0), (42 * s, 36 * s, 1e4), floor=False)  # vertebra + muscles
        lung &= ~cv.ellipsoid(g.hc, np.array([66, 56, 64]) * s) & ~g.bone
        lungs[name] = lung
    return lungs


def _paint(cv: Canvas, g: SimpleNamespace, lungs: dict[str, np.ndarray]) -> None:
    hu = g.hu
    lung_all = lungs["RightLung"] | lungs["LeftLung"]
    tex = cv.smooth_noise(6.0)
    hu[lung_all] = HU["lung"] + 35 * tex[lung_all]
    vessels = lung_all & (cv.smooth_noise(5.0) > 1.6)
    hu[vessels] = -150.0
    hu[g.heart] = HU["blood"]
    hu[g.esophagus] = HU["soft"]
    hu[g.trachea | (g.bronchi & (lung_all | g.inner))] = HU["air"]
    hu[g.bone] = HU["bone"]
    hu[g.cord] = HU["brain"]


def _tumour_centre(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace, lungs: dict[str, np.ndarray]):
    """(centre, semi-axes) of a tumour in one lung: deep in it, or (a quarter of the time) hilar."""
    side_name = "LeftLung" if rng.random() < 0.5 else "RightLung"
    sg = 1.0 if side_name == "LeftLung" else -1.0
    semi = rng.uniform(10, 28, 3) * np.array([1, 1, 1.2])
    if rng.random() < 0.25:
        return np.array([sg * 55 * g.s, g.ye - 10 * g.s, g.zc - 5 + rng.normal(0, 8)]), semi  # hilar
    dist = ndimage.distance_transform_edt(lungs[side_name], sampling=cv.spacing[::-1])
    cand = np.flatnonzero(dist > max(12.0, 0.6 * float(np.min(semi))))
    if cand.size == 0:
        cand = np.flatnonzero(lungs[side_name]) if lungs[side_name].any() else np.array([np.ravel_multi_index(
            (cv.shape[0] // 2, cv.shape[1] // 2, int(cv.shape[2] * (0.3 if sg < 0 else 0.7))), cv.shape)])
    k, j, i = np.unravel_index(int(rng.choice(cand)), cv.shape)
    return np.array([cv.x[i], cv.y[j], cv.z[k]]), semi


def lung(cv: Canvas, rng: np.random.Generator, prof: HospitalProfile, rx: tuple[float, float | None]) -> Anatomy:
    g = _outline(cv, rng, prof)
    _chest_wall(cv, rng, g)
    _mediastinum(cv, rng, g)
    lungs = _lungs(cv, g)
    _paint(cv, g, lungs)
    c, semi = _tumour_centre(cv, rng, g, lungs)
    s, yc, body = g.s, g.yc, g.body
    gtv, lumps = lumpy(cv, rng, c, semi)
    gtv &= g.inner & ~g.bone & ~g.trachea
    g.hu[gtv] = HU["tumour"] + 0.0
    m = float(rng.uniform(5, 8))
    ptv, _ = lumpy(cv, rng, c, semi, margin=m, lumps=lumps)
    ptv &= g.inner & ~cv.tube(0.0, yc, 10.0, 10.0, -1e4, 1e4)  # minus the cord PRV
    targets = [(f"PTV{rx[0]:g}", cv.ensure(ptv, c), rx[0])]
    masks = {"LeftLung": cv.ensure(lungs["LeftLung"] & ~gtv, (75 * s, 0, 0)),
             "RightLung": cv.ensure(lungs["RightLung"] & ~gtv, (-75 * s, 0, 0)),
             "Heart": cv.ensure(g.heart, g.hc), "Esophagus": cv.ensure(g.esophagus, (6 * s, g.ye, 0)),
             "SpinalCord": cv.ensure(g.cord & body, (0, yc, 0))}
    couch_y = float(g.cyb + np.max(g.ay)) + 6.0
    return Anatomy(g.hu, body, g.bone, masks, targets, couch_y)
