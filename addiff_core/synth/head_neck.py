"""The head & neck phantom: neck, head and shoulders, spine, skull and mandible, airway, larynx,
oesophagus, parotids; a lateralised oropharynx PTV and elective nodal PTV."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .body import HU, Anatomy, body_common, spine
from .canvas import Canvas, lumpy, sig
from .hospitals import HospitalProfile


def _outline(cv: Canvas, rng: np.random.Generator, prof: HospitalProfile) -> SimpleNamespace:
    """Patient build, chin level, the neck -> head -> shoulders outline; body, inner, HU."""
    g = SimpleNamespace()
    s = g.s = prof.body_scale * float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.2))
    Z = cv.Z
    zj = g.zj = float(rng.uniform(-15, 15))  # chin / mandible level
    t = g.t = sig((Z - (zj + 15)) / 10.0)  # 0 neck -> 1 head
    sh = g.sh = sig(((zj - 85 - rng.uniform(-10, 10)) - Z) / 10.0)  # shoulders at the bottom
    vertex = np.sqrt(np.clip(1.0 - (np.maximum(Z - (zj + 40), 0) / 150.0) ** 2, 0.05, 1.0))  # rounded cranium
    g.ax = s * (60 * (1 - t) + 77 * t * vertex + 85 * sh) * rng.uniform(0.95, 1.05)
    g.ay = s * (58 * (1 - t) + 96 * t * vertex + 25 * sh) * rng.uniform(0.95, 1.05)
    g.cyb = s * (8 * (1 - t) - 8 * t + 8 * sh)
    g.cxb = float(rng.normal(0, 3))
    g.fat = float(rng.uniform(4, 10)) * s
    g.body, g.inner, g.hu = body_common(cv, g.cxb, g.cyb, g.ax, g.ay, 2.0 + 0.6 * sh, g.fat)
    return g


def _skeleton(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace) -> None:
    """Spine and cord, brainstem, skull (cranium and base), brain, mandible: g.bone etc."""
    s, zj, Z = g.s, g.zj, cv.Z
    g.yc = 8 + 26 * s + float(rng.normal(0, 2))
    bone, g.cord = spine(cv, g.yc, -1e4, zj + 32, s, cord_r=4.5)
    g.brainstem = cv.tube(0.0, g.yc - 8 * s, 12 * s, 11 * s, zj + 30, zj + 72)
    head = g.t > 0.5
    skull_out = cv.superellipse(g.cxb, g.cyb, np.maximum(g.ax - g.fat - 1, 1), np.maximum(g.ay - g.fat - 1, 1), 2.0)
    skull_in = cv.superellipse(g.cxb, g.cyb, np.maximum(g.ax - g.fat - 8 * s, 1), np.maximum(g.ay - g.fat - 8 * s, 1),
                               2.0)
    cranium = (Z > zj + 42) & head
    bone |= skull_out & ~skull_in & cranium
    g.brain = skull_in & cranium
    # skull base: a bony floor under the brain
    bone |= skull_out & (Z > zj + 34) & (Z <= zj + 42) & ~g.brainstem & (cv.Y > g.cyb - 40 * s)
    # mandible: a U of bone opening posteriorly
    g.ym = ym = -12 * s
    mand_out = cv.tube(0.0, ym, 46 * s, 50 * s, zj - 12, zj + 16)
    mand_in = cv.tube(0.0, ym + 2, 38 * s, 42 * s, zj - 12, zj + 16)
    mandible = mand_out & ~mand_in & (cv.Y < ym + 12 * s) & g.body
    ramus = (cv.ellipsoid((41 * s, ym + 16 * s, zj + 22), (5 * s, 9 * s, 16))
             | cv.ellipsoid((-41 * s, ym + 16 * s, zj + 22), (5 * s, 9 * s, 16))) & g.body
    g.mandible = mandible | ramus
    g.bone = bone | g.mandible


def _soft_organs(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace) -> None:
    """Airway (pharynx -> larynx -> trachea), larynx, oesophagus, parotids; then the HU of all."""
    s, zj = g.s, g.zj

    def yaw(z):  # the airway moves anterior going down
        return s * (-4 - 18 * sig((zj - 30 - z) / 8.0))
    g.airway = cv.tube(0.0, yaw, 8 * s, 6 * s, -1e4, zj + 38) & g.body
    g.zl = zj - 48
    g.larynx = cv.ellipsoid((0.0, -26 * s, g.zl), (17 * s, 14 * s, 18 * s)) & g.body
    trachea_post = -22 * s + 8 * s
    vb_ant = g.yc - (8 + 11 + 2) * s - 11 * s
    g.ye = 0.5 * (trachea_post + vb_ant)
    g.esophagus = cv.tube(2.0 * s, g.ye, 7 * s, 5 * s, -1e4, g.zl - 12) & g.body
    g.parotid_c = [(sgn * 47 * s, 8 * s, zj + 27 + float(rng.normal(0, 3))) for sgn in (1, -1)]
    g.lp = cv.ellipsoid(g.parotid_c[0], (11 * s, 16 * s, 19 * s)) & g.inner & ~g.bone
    g.rp = cv.ellipsoid(g.parotid_c[1], (11 * s, 16 * s, 19 * s)) & g.inner & ~g.bone
    hu = g.hu
    hu[g.brain] = HU["brain"]
    hu[g.larynx] = HU["cartilage"]
    hu[g.lp | g.rp] = HU["parotid"]
    hu[g.esophagus] = HU["soft"]
    hu[g.bone] = HU["bone"]
    hu[g.airway] = HU["air"]
    hu[g.cord | g.brainstem] = HU["brain"]


def _targets(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace, rx: tuple[float, float | None]) -> list:
    """Primary (oropharynx / tonsil, lateralised) PTV and, with a second prescription, the
    elective nodes; the GTV is painted into the HU."""
    s, zj = g.s, g.zj
    side = float(rng.choice([-1.0, 1.0]))
    c = (side * rng.uniform(0, 22) * s, rng.uniform(-16, 2) * s, zj + rng.uniform(-30, 12))
    semi = rng.uniform(13, 25, 3) * s
    gtv, lumps = lumpy(cv, rng, c, semi)
    gtv &= g.inner & ~g.bone
    cord_prv = cv.tube(0.0, g.yc, 10.0, 10.0, -1e4, zj + 32) | cv.tube(0.0, g.yc - 8 * s, 15 * s, 14 * s, zj + 30,
                                                                         zj + 72)
    skin = cv.superellipse(g.cxb, g.cyb, np.maximum(g.ax - 5, 1), np.maximum(g.ay - 5, 1), 2.0 + 0.6 * g.sh)
    ptv1, _ = lumpy(cv, rng, c, semi, margin=5.0, lumps=lumps)
    ptv1 &= skin & ~cord_prv
    g.hu[gtv & ~g.airway] = HU["tumour"]
    targets = [(f"PTV{rx[0]:g}", cv.ensure(ptv1, c), rx[0])]
    if rx[1] is not None:
        nodes = np.zeros(cv.shape, bool)
        sides = (1.0, -1.0) if rng.random() < 0.75 else (side,)
        for sg in sides:
            nodes |= cv.ellipsoid((sg * 36 * s, 2 * s, zj - 22 + rng.normal(0, 5)), (15 * s, 17 * s, rng.uniform(38, 50)))
        nodes |= cv.ellipsoid(c, np.asarray(semi) + 12.0)
        ptv2 = nodes & skin & ~cord_prv & ~ptv1
        targets.append((f"PTV{rx[1]:g}", cv.ensure(ptv2, (side * 36 * s, 2 * s, zj - 22)), rx[1]))
    return targets


def head_neck(cv: Canvas, rng: np.random.Generator, prof: HospitalProfile, rx: tuple[float, float | None]
              ) -> Anatomy:
    g = _outline(cv, rng, prof)
    _skeleton(cv, rng, g)
    _soft_organs(cv, rng, g)
    targets = _targets(cv, rng, g, rx)
    s, zj, yc, body = g.s, g.zj, g.yc, g.body
    masks = dict(SpinalCord=cv.ensure(g.cord & body, (0, yc, zj)),
                 Brainstem=cv.ensure(g.brainstem & body, (0, yc, zj + 50)),
                 LeftParotid=cv.ensure(g.lp, g.parotid_c[0]), RightParotid=cv.ensure(g.rp, g.parotid_c[1]),
                 Mandible=cv.ensure(g.mandible, (0, g.ym - 45 * s, zj)), Larynx=cv.ensure(g.larynx, (0, -26 * s, g.zl)),
                 Esophagus=cv.ensure(g.esophagus, (0, g.ye, g.zl - 40)))
    couch_y = float(np.max(g.cyb + g.ay)) + 6.0
    return Anatomy(g.hu, body, g.bone, masks, targets, couch_y)
