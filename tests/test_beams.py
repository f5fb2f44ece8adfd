"""addiff_core.beams: IEC directions, BEV apertures, radiological depth, beam plate."""
from __future__ import annotations

import time

import numpy as np
import pytest

from addiff_core.beams import (aperture_mask, beam_direction, beam_plate, bev_basis, expand_beams, hu_to_density,
                               radiological_depth, target_centroid)
from addiff_core.case_io import Beam

N = 24
SP = (4.0, 4.0, 4.0)  # (x, y, z) mm


def _grid(n=N):
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
    return z, y, x


def _sphere(c=(12, 12, 12), r=3.0, n=N):
    z, y, x = _grid(n)
    return (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r ** 2


# --------------------------------------------------------------------------------------------
# directions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gantry,expected", [(0, (0, 1, 0)), (90, (-1, 0, 0)), (180, (0, -1, 0)), (270, (1, 0, 0))])
def test_beam_direction_cardinal_gantry_angles(gantry, expected):
    # IEC 61217, head-first supine, LPS: gantry 0 = source anterior -> beam travels posterior (+y);
    # gantry 90 = source at the patient's left -> beam travels to the right (-x)
    np.testing.assert_allclose(beam_direction(gantry, 0.0), expected, atol=1e-12)


def test_beam_direction_couch_rotation_and_unit_norm():
    # couch 90: the patient's feet point to where the source is at gantry 90 -> beam travels superior
    np.testing.assert_allclose(beam_direction(90, 90), (0, 0, 1), atol=1e-12)
    np.testing.assert_allclose(beam_direction(270, 90), (0, 0, -1), atol=1e-12)
    # the couch does not move a beam from the ceiling
    np.testing.assert_allclose(beam_direction(0, 45), (0, 1, 0), atol=1e-12)
    for g, c in [(33, 0), (123, 17), (301, -40)]:
        d = beam_direction(g, c)
        assert abs(np.linalg.norm(d) - 1) < 1e-12
        u, v = bev_basis(d)
        np.testing.assert_allclose([u @ d, v @ d, u @ v, u @ u, v @ v], [0, 0, 0, 1, 1], atol=1e-12)


def test_expand_beams_samples_arcs():
    arc = Beam(gantry=181.0, gantry_stop=179.0)
    cps = expand_beams([arc], 10.0)
    assert len(cps) == 37 and all(not b.is_arc for b in cps)
    assert expand_beams([Beam(0.0), Beam(90.0)]) == [Beam(0.0), Beam(90.0)]


# --------------------------------------------------------------------------------------------
# aperture
# --------------------------------------------------------------------------------------------
def test_aperture_contains_target_and_is_bounded():
    target = _sphere((10, 13, 12), 3.0)
    margin = 5.0
    for gantry, along in [(0, "y"), (90, "x")]:
        ap = aperture_mask(target, SP, gantry, margin_mm=margin)
        assert ap[target].all(), "the field must cover the target"
        z, y, x = _grid()
        c = target_centroid(target, SP) / np.array(SP)  # (x, y, z) in voxels
        lateral = (x - c[0]) if along == "y" else (y - c[1])
        r = np.sqrt(lateral ** 2 + (z - c[2]) ** 2) * SP[0]
        # target radius 12 mm + margin + half a voxel + divergence slack
        assert r[ap].max() <= 12.0 + margin + 0.5 * 4.0 * np.sqrt(2) + 1.0
        assert ap.sum() < 0.25 * ap.size
        # without divergence the whole ray is in the field: columns through the volume along the beam
        par = aperture_mask(target, SP, gantry, margin_mm=margin, sad_mm=None)
        axis = 1 if along == "y" else 2
        assert par[target].all() and par.any(axis=axis).sum() == par.all(axis=axis).sum() > 0


def test_aperture_margin_grows_the_field_and_empty_target():
    target = _sphere((12, 12, 12), 3.0)
    small = aperture_mask(target, SP, 40, margin_mm=0.0)
    large = aperture_mask(target, SP, 40, margin_mm=8.0)
    assert small.sum() < large.sum() and not (small & ~large).any()
    assert not aperture_mask(np.zeros((N, N, N), bool), SP, 0).any()


# --------------------------------------------------------------------------------------------
# radiological depth
# --------------------------------------------------------------------------------------------
def test_radiological_depth_in_water_axis_aligned():
    rho = np.ones((N, N, N), np.float32)
    sp = (2.0, 3.0, 4.0)
    d = radiological_depth(rho, sp, beam_direction(0))  # +y
    np.testing.assert_allclose(d[5, :, 7], (np.arange(N) + 0.5) * 3.0, rtol=1e-5)
    d = radiological_depth(rho, sp, beam_direction(90))  # -x: enters at the last column
    np.testing.assert_allclose(d[5, 7, ::-1], (np.arange(N) + 0.5) * 2.0, rtol=1e-5)
    d = radiological_depth(rho, sp, (0, 0, -1.0))
    np.testing.assert_allclose(d[::-1, 3, 3], (np.arange(N) + 0.5) * 4.0, rtol=1e-5)


def test_radiological_depth_increases_along_oblique_beam():
    rho = np.ones((N, N, N), np.float32)
    d = beam_direction(35)
    depth = radiological_depth(rho, SP, d)
    # march along the central ray through the volume centre
    c = np.array([N / 2, N / 2, N / 2]) * SP[0]
    prev = -1.0
    for t in np.arange(-30, 31, 6.0):
        x, y, z = (c + t * d) / SP[0]
        v = depth[int(round(z)), int(round(y)), int(round(x))]
        assert v > prev
        prev = v
    # central voxel: about its geometric distance from the entry face (beam enters through y = 0)
    k = N // 2
    geometric = (k + 0.5) * SP[1] / d[1]
    assert abs(depth[k, k, k] - geometric) < 0.1 * geometric


def test_radiological_depth_larger_behind_bone_than_lung():
    hu = np.zeros((N, N, N), np.float32)
    hu[:, 4:10, :8] = 1000.0  # bone slab upstream of the left half
    hu[:, 4:10, 16:] = -800.0  # lung slab upstream of the right half
    depth = radiological_depth(hu_to_density(hu), SP, beam_direction(0))
    behind = 15
    assert depth[12, behind, 3] > depth[12, behind, 12] > depth[12, behind, 20]
    # water-equivalent: bone ~1.6, lung ~0.2 over 6 voxels of 4 mm
    assert depth[12, behind, 3] - depth[12, behind, 12] == pytest.approx(0.6 * 24, rel=0.15)
    assert depth[12, behind, 12] - depth[12, behind, 20] == pytest.approx(0.8 * 24, rel=0.15)


# --------------------------------------------------------------------------------------------
# beam plate
# --------------------------------------------------------------------------------------------
def test_beam_plate_zero_off_beam_positive_in_target():
    target = _sphere((12, 12, 12), 3.0)
    plate = beam_plate(target, SP, [Beam(0.0), Beam(90.0)])
    assert plate.dtype == np.float32 and plate.shape == target.shape
    assert (plate[target] > 1.5).all()  # both beams cross the target (inverse square ~1 there)
    assert plate[2, 2, 2] == 0.0 and plate[12, 2, 2] == 0.0  # far from both beams
    assert plate[20, 12, 12] == 0.0  # above the target, outside both fields
    # along one beam only: 1 beam there, inverse square larger near the source
    assert 0.9 < plate[12, 2, 12] < 1.1 and plate[12, 2, 12] > plate[12, 21, 12] > 0.0  # +y beam only
    assert plate.max() < 2.2


def test_beam_plate_differs_for_different_beams_and_accepts_arcs():
    target = _sphere((12, 12, 12), 3.0)
    a = beam_plate(target, SP, [Beam(float(g)) for g in (0, 72, 144, 216, 288)])
    b = beam_plate(target, SP, [Beam(float(g)) for g in (0, 40, 80, 120, 160, 200, 240, 280, 320)])
    assert np.abs(a - b).max() > 0.5
    arc = [Beam(gantry=181.0, gantry_stop=179.0)]
    np.testing.assert_allclose(beam_plate(target, SP, arc), beam_plate(target, SP, expand_beams(arc)))
    assert not beam_plate(np.zeros((N, N, N), bool), SP, [Beam(0.0)]).any()


def test_beam_plate_is_fast_on_small_grids():
    target = _sphere((16, 16, 16), 4.0, n=32)
    beams = [Beam(float(g)) for g in range(0, 360, 40)]
    beam_plate(target, SP, beams)
    t0 = time.process_time()
    beam_plate(target, SP, beams)
    assert time.process_time() - t0 < 0.5
