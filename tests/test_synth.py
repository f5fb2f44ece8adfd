"""addiff_core.synth: non-IID phantom hospitals with a physics-inspired dose."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk

from addiff_core import case_io
from addiff_core.case_io import Beam
from addiff_core.contract import OAR_NAMES
from addiff_core.config import load_site_config
from addiff_core.synth import (HOSPITAL_PROFILES, default_spacing, hospital_profile, make_plan, phantom_dose,
                               synth_case, write_synthetic_sites)

SIZE = 32
REQUIRED_OARS = {
    "head_neck": {"SpinalCord", "Brainstem", "LeftParotid", "RightParotid"},
    "lung": {"LeftLung", "RightLung", "Heart", "Esophagus", "SpinalCord"},
    "prostate": {"Rectum", "Bladder", "LeftFemoralHead", "RightFemoralHead"},
}


def _case(seed: int, site: str = "head_neck", profile=HOSPITAL_PROFILES[0], size: int = SIZE):
    return synth_case(np.random.default_rng(seed), site, size, None, profile)


def _d95(dose, mask):
    return float(np.percentile(dose[mask], 5))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The 3-site x 4-case 32^3 demo set, written once (and timed in process CPU-seconds: the
    suite's parallel workers share the cores, so wall time says more about them than about it)."""
    out = tmp_path_factory.mktemp("synth")
    t0 = time.process_time()
    files = write_synthetic_sites(out, n_sites=3, cases_per_site=4, size=SIZE, seed=0)
    return out, files, time.process_time() - t0


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["head_neck", "lung", "prostate"])
def test_case_arrays_masks_and_plan(site):
    ct, masks, dose, plan, pdm = _case(3, site)
    assert ct.shape == dose.shape == pdm.shape == (SIZE,) * 3
    assert ct.dtype == np.int16 and dose.dtype == np.float32 and pdm.dtype == bool
    assert ct.min() >= -1024 and ct.max() > 300  # air and bone
    body = masks["Body"]
    np.testing.assert_array_equal(pdm, body)
    for name, m in masks.items():
        assert m.dtype == bool and m.shape == ct.shape, name
        assert m.any(), f"{name} is empty"
        assert not (m & ~body).any(), f"{name} leaves the body"
    oars = set(masks) - set(plan.prescriptions) - {"Body"}
    assert oars <= set(OAR_NAMES)
    assert REQUIRED_OARS[site] <= oars
    assert plan.tumour_site == site and set(plan.prescriptions) <= set(masks)
    # dose: Gy, zero outside the body, primary D95 = prescription, conformal to the target
    assert not dose[~body].any() and dose.min() >= 0
    primary = masks[plan.targets[0]]
    assert _d95(dose, primary) == pytest.approx(plan.max_prescription, rel=0.01)
    assert dose.max() < 1.3 * plan.max_prescription
    assert np.median(dose[body & ~primary]) < 0.5 * plan.max_prescription
    # soft tissue ~40 HU inside the body
    assert -60 < np.median(ct[body & (ct > -200) & (ct < 200)]) < 120


def test_secondary_target_towards_its_prescription_and_cord_spared():
    ct, masks, dose, plan, _ = _case(5, "head_neck")
    assert len(plan.targets) == 2
    lo = plan.targets[1]
    d95_lo = _d95(dose, masks[lo])
    assert 0.9 * plan.prescriptions[lo] <= d95_lo <= 1.2 * plan.prescriptions[lo]
    assert np.median(dose[masks[lo]]) < 0.97 * plan.max_prescription
    assert dose[masks["SpinalCord"]].max() < 0.85 * plan.max_prescription
    assert dose[masks["SpinalCord"]].mean() < dose[masks[plan.targets[0]]].mean() / 2


def test_deterministic_for_a_seed():
    a, b, c = _case(11, "lung"), _case(11, "lung"), _case(12, "lung")
    for x, y in [(a[0], b[0]), (a[2], b[2]), (a[4], b[4])]:
        assert x.tobytes() == y.tobytes()
    assert a[1].keys() == b[1].keys() and all(a[1][k].tobytes() == b[1][k].tobytes() for k in a[1])
    assert a[3] == b[3]
    assert a[0].tobytes() != c[0].tobytes() and a[2].tobytes() != c[2].tobytes()


def test_dose_changes_when_the_beams_change():
    ct, masks, dose, plan, pdm = _case(2, "prostate", HOSPITAL_PROFILES[2])
    sp = default_spacing("prostate", SIZE, HOSPITAL_PROFILES[2])
    five = dataclasses.replace(plan, technique="IMRT", beams=tuple(Beam(float(g)) for g in (0, 72, 144, 216, 288)))
    lateral = dataclasses.replace(plan, technique="IMRT", beams=(Beam(90.0), Beam(270.0)))
    arc = dataclasses.replace(plan, technique="VMAT", beams=(Beam(181.0, gantry_stop=179.0),))
    doses = [phantom_dose(ct, masks, p, sp, pdm) for p in (five, lateral, arc)]
    primary = masks[plan.targets[0]]
    for d in doses:
        assert _d95(d, primary) == pytest.approx(plan.max_prescription, rel=0.01)
    rx = plan.max_prescription
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(doses[i] - doses[j])[pdm].mean() > 0.02 * rx
    # two lateral fields: the entrance paths (left/right of the target) get more than anterior tissue
    d = doses[1]
    k, j, i = (int(round(v)) for v in np.argwhere(primary).mean(axis=0))
    assert d[k, j, 2:i - 4].mean() > 3 * d[k, 2:j - 4, i].mean()
    # energy matters: 15 MV penetrates more than 6 MV (less entrance dose for the same target dose)
    e6 = dataclasses.replace(lateral, beams=(Beam(90.0, energy_mv=6.0), Beam(270.0, energy_mv=6.0)))
    e15 = dataclasses.replace(lateral, beams=(Beam(90.0, energy_mv=15.0), Beam(270.0, energy_mv=15.0)))
    d6, d15 = (phantom_dose(ct, masks, p, sp, pdm) for p in (e6, e15))
    assert d6[k, j, 2:i - 4].max() > d15[k, j, 2:i - 4].max()


# --------------------------------------------------------------------------------------------
# hospitals
# --------------------------------------------------------------------------------------------
def test_hospitals_differ_in_planning_and_scanner():
    a, b, c = HOSPITAL_PROFILES[:3]
    assert len({a.hu_offset, b.hu_offset, c.hu_offset}) == 3
    assert len({np.argmax(p.site_mix) for p in (a, b, c)}) == 3
    # beam arrangements
    def arrangements(prof, site):
        rng = np.random.default_rng(0)
        return Counter((p.technique, len(p.beams)) for p in (make_plan(rng, site, prof) for _ in range(40)))
    pa, pb, pc = arrangements(a, "prostate"), arrangements(b, "prostate"), arrangements(c, "prostate")
    assert pa.most_common(1)[0][0][0] == "IMRT" and pb.most_common(1)[0][0][0] == "VMAT"
    assert {n for (t, n) in pc if t == "IMRT"} <= {5, 7} and {n for (t, n) in pa if t == "IMRT"} <= {7, 9}
    # measured scanner offset: median HU of the heart of the same phantom patient at A, B, C
    hearts = []
    for prof in (a, b, c):
        ct, masks, *_ = synth_case(np.random.default_rng(4), "lung", SIZE, None, prof)
        hearts.append(float(np.median(ct[masks["Heart"]])))
    assert hearts[1] - hearts[0] == pytest.approx(b.hu_offset - a.hu_offset, abs=12)
    assert hearts[2] - hearts[0] == pytest.approx(c.hu_offset - a.hu_offset, abs=12)
    # field of view fits the body: 300-520 mm across
    for site in ("head_neck", "lung", "prostate"):
        sp = default_spacing(site, SIZE, a)
        assert 300 <= sp[0] * SIZE <= 520 and sp[0] == sp[1]
    # beyond the built-in hospitals: random but deterministic profiles
    assert hospital_profile(7, seed=1) == hospital_profile(7, seed=1) != hospital_profile(7, seed=2)


def test_demo_set_is_written_fast_and_loads(demo):
    out, files, seconds = demo
    assert seconds < 15.0, f"3 x 4 cases at 32^3 took {seconds:.1f} CPU-s (2.6 measured on a quiet 2-core machine)"
    assert [f.name for f in files] == ["hospital_a.yaml", "hospital_b.yaml", "hospital_c.yaml"]
    mixes = []
    for f in files:
        cfg = load_site_config(f)
        assert cfg.name == f.stem and cfg.data_dir == (out / f.stem / "cases").resolve()
        assert cfg.heldout.fraction == 0.25 and not cfg.privacy.enabled and cfg.device == "auto"
        cases = case_io.list_cases(cfg.data_dir)
        assert len(cases) == 4
        sites = []
        for c in cases:
            case = case_io.load_case(c, require_dose=True)
            assert case.possible_dose_mask is not None and "Body" in case.masks
            dose = case.array("dose")
            primary = case.array(case.plan.targets[0])
            assert _d95(dose, primary) == pytest.approx(case.plan.max_prescription, rel=0.01)
            for name, img in case.masks.items():
                assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 1}, name
            sites.append(case.plan.tumour_site)
        mixes.append(Counter(sites).most_common(1)[0][0])
    assert mixes == ["head_neck", "lung", "prostate"]


def test_written_sites_are_deterministic(tmp_path):
    a = write_synthetic_sites(tmp_path / "a", n_sites=1, cases_per_site=1, size=16, seed=3)
    b = write_synthetic_sites(tmp_path / "b", n_sites=1, cases_per_site=1, size=16, seed=3)
    c = write_synthetic_sites(tmp_path / "c", n_sites=1, cases_per_site=1, size=16, seed=4)

    def arrays(files):
        case = case_io.list_cases(load_site_config(files[0]).data_dir)[0]
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(case / n))).tobytes()
                for n in ("ct.nii.gz", "dose.nii.gz")] + [(case / "plan.yaml").read_text()]

    assert arrays(a) == arrays(b)
    assert arrays(a)[0] != arrays(c)[0]
