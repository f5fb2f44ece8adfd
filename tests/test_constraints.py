"""Clinical constraints: defaults per site, plan overrides, evaluation on hand-made doses."""
from __future__ import annotations

import math

import numpy as np
import pytest

from addiff_core.case_io import Beam, Plan
from addiff_core.contract import OAR_NAMES, TUMOUR_SITES
from addiff_core.constraints import TARGET, Constraint, constraints_for_plan, default_constraints, evaluate_constraint
from addiff_core.contract import C_MAX as MAX_CONSTRAINTS

RX = {"head_neck": {"PTV70": 70.0, "PTV56": 56.0}, "lung": {"PTV": 60.0}, "prostate": {"PTV": 78.0}}


def make_plan(site: str = "head_neck", overrides: dict | None = None, rx: dict | None = None) -> Plan:
    return Plan(tumour_site=site, prescriptions=dict(rx or RX[site]), fractions=30, technique="IMRT",
                beams=(Beam(0.0),), constraints=dict(overrides or {}))


def by_key(cs: list[Constraint]) -> dict[str, Constraint]:
    return {c.key: c for c in cs}


# --------------------------------------------------------------------------------------------
# Constraint
# --------------------------------------------------------------------------------------------
def test_constraint_labels_and_keys():
    assert Constraint("SpinalCord", "Dmax", 45).label == "SpinalCord Dmax <= 45 Gy"
    assert Constraint("SpinalCord", "Dmax", 45).key == "SpinalCord Dmax"
    c = Constraint("LeftLung", "Vx", 20.0, 0.3)
    assert (c.label, c.key) == ("LeftLung V20Gy <= 30%", "LeftLung V20")
    t = Constraint(TARGET, "Dmin_pct", 66.5, 0.95)
    assert (t.label, t.key) == ("PTV D95 >= 66.5 Gy", "__target__ D95")
    assert Constraint("Heart", "Dmean", 26, label="custom").label == "custom"


@pytest.mark.parametrize("args", [
    ("Heart", "Dmin", 26.0),              # unknown kind
    ("Heart", "Vx", 30.0, 0.0),           # Vx needs a fraction in (0, 1]
    ("Heart", "Vx", 30.0, 46.0),          # a percentage, not a fraction
    ("Heart", "Dmax", 30.0, 0.5),         # limit unused for Dmax
    ("Heart", "Dmax", -1.0),
    ("Heart", "Dmax", float("nan")),
])
def test_constraint_rejects_bad_values(args):
    with pytest.raises(ValueError):
        Constraint(*args)


# --------------------------------------------------------------------------------------------
# defaults
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", TUMOUR_SITES)
def test_defaults_are_canonical_and_end_with_target_d95(site):
    cs = default_constraints(site, RX[site])
    assert 1 < len(cs) <= MAX_CONSTRAINTS
    assert all(c.structure in OAR_NAMES or c.structure == TARGET for c in cs)
    assert len({c.key for c in cs}) == len(cs)
    rx = max(RX[site].values())
    t = cs[-1]
    assert (t.structure, t.kind, t.limit) == (TARGET, "Dmin_pct", 0.95)
    assert t.threshold_gy == pytest.approx(0.95 * rx)
    assert t.label.startswith("PTV D95 >= 95% Rx")


def test_head_neck_values():
    k = by_key(default_constraints("head_neck", RX["head_neck"]))
    assert k["SpinalCord Dmax"].threshold_gy == 45
    assert k["Brainstem Dmax"].threshold_gy == 54
    assert k["LeftParotid Dmean"].threshold_gy == k["RightParotid Dmean"].threshold_gy == 26
    assert k["Mandible Dmax"].threshold_gy == 73.5
    assert k["Larynx Dmean"].threshold_gy == 45
    assert k["__target__ D95"].threshold_gy == pytest.approx(66.5)  # highest prescription (70 Gy)


def test_lung_values():
    k = by_key(default_constraints("lung", RX["lung"]))
    assert (k["LeftLung V20"].limit, k["RightLung V20"].limit) == (0.30, 0.30)
    assert k["Heart Dmean"].threshold_gy == 26
    assert k["Esophagus Dmean"].threshold_gy == 34
    assert k["SpinalCord Dmax"].threshold_gy == 50


def test_prostate_vx_scale_with_prescription():
    k78 = by_key(default_constraints("prostate", {"PTV": 78.0}))
    assert k78["Rectum V70"].limit == 0.20 and k78["Bladder V70"].limit == 0.35
    assert k78["LeftFemoralHead Dmax"].threshold_gy == 50
    k60 = by_key(default_constraints("prostate", {"PTV": 60.0}))
    assert k60["Rectum V53.8"].threshold_gy == pytest.approx(53.8)  # 70 * 60 / 78, to 0.1 Gy
    assert k60["Rectum V53.8"].limit == 0.20
    assert k60["LeftFemoralHead Dmax"].threshold_gy == 50  # absolute dose, not scaled


def test_defaults_reject_bad_input():
    with pytest.raises(ValueError, match="tumour_site"):
        default_constraints("brain", {"PTV": 60})
    with pytest.raises(ValueError):
        default_constraints("lung", {})


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------
def test_no_overrides_gives_defaults():
    assert constraints_for_plan(make_plan("lung")) == default_constraints("lung", RX["lung"])


def test_overrides_replace_add_and_remove():
    plan = make_plan("head_neck", {
        "SpinalCord Dmax": 40,            # replace in place
        "mandible dmax": None,            # remove (case-insensitive)
        "LeftParotid V30": 0.5,           # add
        "PTV70 D98": 65,                  # target by its name
        "PTV D95": 67,                    # target alias replaces the default D95
    })
    cs = constraints_for_plan(plan)
    k = by_key(cs)
    defaults = default_constraints("head_neck", RX["head_neck"])
    assert cs[0] == Constraint("SpinalCord", "Dmax", 40.0)
    assert "Mandible Dmax" not in k
    assert k["LeftParotid V30"] == Constraint("LeftParotid", "Vx", 30.0, 0.5)
    assert k["__target__ D98"] == Constraint(TARGET, "Dmin_pct", 65.0, 0.98)
    assert k["__target__ D95"].threshold_gy == 67.0
    assert len(cs) == len(defaults) - 1 + 2


@pytest.mark.parametrize("overrides, match", [
    ({"Spinal Cord Dmax": 40}, "cannot read key"),
    ({"Cord Dmax": 40}, "unknown structure"),
    ({"SpinalCord Dmin": 40}, "cannot read key"),
    ({"SpinalCord Dmax": "forty"}, "must be a number"),
    ({"SpinalCord Dmax": True}, "must be a number"),
    ({"SpinalCord Dmax": -5}, "dose in Gy"),
    ({"SpinalCord Dmax": 4500}, "dose in Gy"),     # cGy
    ({"LeftLung V20": 30}, "fraction"),           # percent instead of fraction
    ({"Heart V5": None}, "none with that key"),
    ({"SpinalCord D95": 40}, "target only"),
    ({"PTV Dmax": 75}, "only D<x>"),
    ({"PTV D0": 75}, r"x in \(0, 100\]"),
    ({5: 40}, "must be a string"),
])
def test_bad_overrides_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        constraints_for_plan(make_plan("head_neck", overrides))


def test_too_many_constraints_rejected():
    overrides = {f"Heart V{x}": 0.5 for x in range(5, 65, 5)}
    with pytest.raises(ValueError, match="at most 16"):
        constraints_for_plan(make_plan("lung", overrides))


# --------------------------------------------------------------------------------------------
# evaluation (10-voxel structure with doses 0..9 Gy inside a larger array)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def ten():
    dose = np.full((4, 5), 100.0)
    mask = np.zeros((4, 5), bool)
    mask[:2] = True
    dose[mask] = np.arange(10.0)
    return dose, mask


@pytest.mark.parametrize("c, value, met", [
    (Constraint("SpinalCord", "Dmax", 9.0), 9.0, True),
    (Constraint("SpinalCord", "Dmax", 8.9), 9.0, False),
    (Constraint("Heart", "Dmean", 4.5), 4.5, True),
    (Constraint("Heart", "Dmean", 4.4), 4.5, False),
    (Constraint("LeftLung", "Vx", 7.0, 0.3), 0.3, True),     # voxels 7, 8, 9 receive >= 7 Gy
    (Constraint("LeftLung", "Vx", 7.0, 0.29), 0.3, False),
    (Constraint(TARGET, "Dmin_pct", 0.9, 0.9), 0.9, True),   # D90 = 10th percentile of 0..9 = 0.9
    (Constraint(TARGET, "Dmin_pct", 1.0, 0.9), 0.9, False),
    (Constraint(TARGET, "Dmin_pct", 4.5, 0.5), 4.5, True),   # D50 = median
])
def test_evaluate_constraint_by_hand(ten, c, value, met):
    dose, mask = ten
    v, ok = evaluate_constraint(dose, mask, c)
    assert v == pytest.approx(value, abs=1e-12)
    assert ok is met


def test_target_d95_at_exactly_95_percent_passes():
    dose = np.full(20, 70.0 * 0.95)
    v, ok = evaluate_constraint(dose, np.ones(20, bool), default_constraints("lung", {"PTV": 70.0})[-1])
    assert ok and v == pytest.approx(66.5)


def test_evaluate_empty_mask_is_nan_and_not_met(ten):
    dose, _ = ten
    v, ok = evaluate_constraint(dose, np.zeros_like(dose, bool), Constraint("Heart", "Dmean", 26.0))
    assert math.isnan(v) and ok is False
