"""What every phantom anatomy shares: tissue HU values, what an anatomy is (:class:`Anatomy`),
the body outline with its fat layer, and the spine."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .canvas import Canvas

HU = {"air": -1000.0, "lung": -830.0, "fat": -95.0, "soft": 40.0, "muscle": 50.0, "brain": 33.0, "tumour": 55.0,
      "bone": 300.0, "cortical": 1100.0, "cartilage": 150.0, "urine": 8.0, "parotid": -15.0, "gas": -850.0,
      "couch": -250.0, "blood": 45.0}


@dataclass
class Anatomy:
    hu: np.ndarray
    body: np.ndarray
    bone: np.ndarray
    masks: dict[str, np.ndarray]
    targets: list[tuple[str, np.ndarray, float]]  # (name, mask, Gy), primary first
    couch_y: float


def body_common(cv: Canvas, cx, cy, ax, ay, p: float, fat_mm: float):
    """(body, inner (body minus the fat layer), HU: air, fat, muscle) of a superellipse outline."""
    body = cv.superellipse(cx, cy, ax, ay, p)
    inner = cv.superellipse(cx, cy, np.maximum(ax - fat_mm, 1.0), np.maximum(ay - fat_mm, 1.0), p)
    hu = np.full(cv.shape, HU["air"], np.float32)
    hu[body] = HU["fat"]
    hu[inner] = HU["muscle"]
    return body, inner, hu


def spine(cv: Canvas, yc: float, z0: float, z1: float, s: float, cord_r: float = 5.0,
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
