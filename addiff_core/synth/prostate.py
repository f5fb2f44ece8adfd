"""The prostate phantom: pelvis (femoral heads and shafts, acetabula, ilia, ischia, pubic rami,
sacrum), prostate, seminal vesicles, rectum (sometimes with gas), bladder; a prostate PTV and
optionally a seminal-vesicle PTV."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .body import HU, Anatomy, body_common
from .canvas import Canvas
from .hospitals import HospitalProfile


def _outline(cv: Canvas, rng: np.random.Generator, prof: HospitalProfile) -> SimpleNamespace:
    g = SimpleNamespace()
    s = g.s = prof.body_scale * float(np.clip(rng.normal(1.0, 0.07), 0.82, 1.25))
    Z = cv.Z
    g.ax = s * 178 * rng.uniform(0.93, 1.07) * (1 + 0.03 * Z / 110.0)
    g.ay = s * 118 * rng.uniform(0.9, 1.1) + 0 * Z
    g.cxb, g.cyb = float(rng.normal(0, 4)), float(rng.normal(-4, 4))
    g.fat = float(rng.uniform(12, 40)) * s
    g.body, g.inner, g.hu = body_common(cv, g.cxb, g.cyb, g.ax, g.ay, 2.3, g.fat)
    return g


def _pelvis(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace) -> None:
    """g.bone (pelvis, femurs, sacrum, inside the body), g.heads (the femoral heads), g.zf."""
    s = g.s
    zf = g.zf = float(rng.uniform(-30, -15))  # femoral heads level
    bone = np.zeros(cv.shape, bool)
    g.heads = {}
    for name, sg in (("LeftFemoralHead", 1.0), ("RightFemoralHead", -1.0)):
        hc = (sg * 90 * s, 5 * s, zf)
        r = 24 * s * rng.uniform(0.93, 1.07)
        head = cv.ellipsoid(hc, (r, r, r)) & g.inner
        g.heads[name] = cv.ensure(head, hc)
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
    bone &= g.inner
    g.bone = bone


def _organs(cv: Canvas, rng: np.random.Generator, g: SimpleNamespace) -> None:
    """Prostate, rectum, bladder, seminal vesicles, ischiorectal fat; then the HU of all."""
    s, inner, bone, hu = g.s, g.inner, g.bone, g.hu
    pc = g.pc = np.array([rng.normal(0, 2), -8 * s + rng.normal(0, 4), g.zf - 8 + rng.normal(0, 6)])
    psemi = g.psemi = np.array([22, 17, 20]) * rng.uniform(0.85, 1.3)
    prostate = cv.ellipsoid(pc, psemi)
    ry = g.ry = pc[1] + psemi[1] + 16 * s
    rr = 17 * s * rng.uniform(0.9, 1.2)
    rect_y = lambda z: ry + 0.3 * np.maximum(z - pc[2], 0)  # noqa: E731
    g.rectum = rectum = cv.tube(0.0, rect_y, rr, rr * 0.9, pc[2] - 50, pc[2] + 45) & inner & ~bone
    fill = float(rng.uniform(0.7, 1.3))
    bsemi = np.array([45, 35, 30]) * s * fill
    g.bc = (float(rng.normal(0, 3)), pc[1] - 18 * s, pc[2] + psemi[2] + bsemi[2] - 6)
    g.bladder = cv.ellipsoid(g.bc, bsemi) & inner & ~prostate & ~bone
    sv = cv.ellipsoid((16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (17 * s, 7 * s, 9 * s)) | \
        cv.ellipsoid((-16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (17 * s, 7 * s, 9 * s))
    sv &= ~g.bladder & ~rectum
    fossa = cv.ellipsoid((35 * s, ry + 5, pc[2] - 25), (15 * s, 22 * s, 28 * s)) | \
        cv.ellipsoid((-35 * s, ry + 5, pc[2] - 25), (15 * s, 22 * s, 28 * s))
    hu[fossa & inner & ~bone] = HU["fat"]
    hu[prostate | sv] = HU["soft"]
    hu[g.bladder] = HU["urine"]
    hu[rectum] = HU["soft"]
    if rng.random() < 0.5:
        gas = cv.tube(0.0, rect_y, rr * 0.45, rr * 0.35, pc[2] - 20, pc[2] + 40) & rectum
        hu[gas] = HU["gas"]
    hu[bone] = HU["bone"]


def _targets(cv: Canvas, g: SimpleNamespace, rx: tuple[float, float | None]) -> list:
    """The prostate PTV (smaller posterior margin) and optionally the seminal vesicles'."""
    s, pc, psemi = g.s, g.pc, g.psemi
    ptv1 = cv.ellipsoid(pc - np.array([0, 1.0, 0]), psemi + np.array([7, 6, 7])) & g.inner
    targets = [(f"PTV{rx[0]:g}", cv.ensure(ptv1, pc), rx[0])]
    if rx[1] is not None:
        ptv2 = (cv.ellipsoid((16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (23 * s, 13 * s, 15 * s)) |
                cv.ellipsoid((-16 * s, pc[1] + 14 * s, pc[2] + psemi[2] + 2), (23 * s, 13 * s, 15 * s)))
        ptv2 &= g.inner & ~ptv1
        targets.append((f"PTV{rx[1]:g}", cv.ensure(ptv2, (16 * s, pc[1] + 14 * s, pc[2] + psemi[2])), rx[1]))
    return targets


def prostate(cv: Canvas, rng: np.random.Generator, prof: HospitalProfile, rx: tuple[float, float | None]
             ) -> Anatomy:
    g = _outline(cv, rng, prof)
    _pelvis(cv, rng, g)
    _organs(cv, rng, g)
    targets = _targets(cv, g, rx)
    masks = {"Rectum": cv.ensure(g.rectum, (0, g.ry, g.pc[2])), "Bladder": cv.ensure(g.bladder, g.bc), **g.heads}
    couch_y = float(g.cyb + np.max(g.ay)) + 6.0
    return Anatomy(g.hu, g.body, g.bone, masks, targets, couch_y)
