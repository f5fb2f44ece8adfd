"""Generated GDP-HMM data in exactly the challenge's layout (tests only).

Per plan ``np.savez_compressed(path, data_dict)`` as DICOM2NPZ.py writes it (``arr_0`` a pickled
dict: ``img``, one 0/1 array per structure, ``dose`` + ``dose_scale``, ``isVMAT``, ``angle_list``,
``isocenter`` (a list of float32 scalars, as spatial_crop_dict leaves it), ``angle_plate``,
``beam_plate``, ``origin``/``spacing``/``direction``/``size``, ``all_mask``), a ``PTV_DICT.json``
and a ``meta_data.csv`` (PID, PlanID, isVMAT, cohort, site, phase, npz_path) with two tumour
sites (1 head and neck, 2 lung) crossed with two cohorts, IMRT and VMAT plans.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

SHAPE = (16, 20, 24)  # (z, y, x)
SPACING = (2.5, 2.5, 2.0)  # (x, y, z), DICOM2NPZ.py's img_spac
DOSE_SCALE = 2.5e-4
IMRT_ANGLES = np.arange(0, 360, 40, dtype=np.float32)  # nine fields
VMAT_ANGLES = np.mod(np.arange(181, 181 + 356, 4), 360).astype(np.float32)  # one arc's control points

# plan id, patient, tumour site (1 H&N, 2 lung), cohort, VMAT?, phase
PLANS = (
    ("HNC_001+9Ag+MOS_25934", "HNC_001", 1, 1, False, "train"),
    ("HNC_001+A4Ac+MOS_25934", "HNC_001", 1, 1, True, "train"),
    ("LUNG_004+imrt+MOS_11111", "LUNG_004", 2, 1, False, "valid"),
    ("0617-259694+2Ac+MOS_33896", "0617-259694", 2, 2, True, "train"),
    ("0617-259694+imrt+MOS_33896", "0617-259694", 2, 2, False, "train"),
    ("HNC_002+A4Ac+MOS_22222", "HNC_002", 1, 2, True, "valid"),
)

PTV_DICT = {
    "HNC_001": {"PTV_High": {"OPTName": "PTV70OPT", "PDose": 70, "RingName": "RingPTV70"},
                "PTV_Low": {"MinusName": "PTV56-PTV63", "OPTName": "PTV56OPT", "PDose": 56,
                            "RingName": "RingPTV56", "StructName": "PTV56"}},
    "HNC_002": {"PTV_High": {"OPTName": "PTVHighOPT", "PDose": 66, "RingName": "RingPTV70"}},
    "0617-259694": {"PTV_High": {"OPTName": "PTVHighOPT", "StructName": "PTV", "PDose": 60}},
    "LUNG_004": {"PTV_High": {"OPTName": "PTVHighOPT", "StructName": "PTV", "PDose": 50}},
}


def _ball(centre, radius) -> np.ndarray:
    z, y, x = np.indices(SHAPE)
    c = np.asarray(centre, dtype=float)
    return ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= radius ** 2


def plan_dict(patient: str, tumour_site: int, vmat: bool, seed: int) -> dict:
    """One plan's ``arr_0`` dict."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    body = (((y - 10) / 9.0) ** 2 + ((x - 12) / 11.0) ** 2) <= 1.0
    img = np.where(body, 40 + rng.normal(0, 20, SHAPE), -1000).astype(np.int16)
    centre = (8 + rng.integers(-1, 2), 10 + rng.integers(-1, 2), 12 + rng.integers(-2, 3))
    high = PTV_DICT[patient]["PTV_High"]
    d: dict = {}
    ptv = _ball(centre, 3.5)
    d[high["OPTName"]] = (ptv & _ball(centre, 3.0)).astype(np.uint8)
    if "StructName" in high:
        d[high["StructName"]] = ptv.astype(np.uint8)
    if tumour_site == 1:
        d["PTV70"] = ptv.astype(np.uint8)
        low = PTV_DICT[patient].get("PTV_Low")
        if low:
            ring = _ball(centre, 5.5) & ~ptv & body
            d[low["StructName"]] = ring.astype(np.uint8)
            d[low["OPTName"]] = (ring & ~_ball(centre, 4.0)).astype(np.uint8)
        d["BrainStem"] = _ball((3, 12, 12), 2).astype(np.uint8)
        d["BrainStem_03"] = _ball((3, 12, 12), 3).astype(np.uint8)
        d["SpinalCord"] = ((np.abs(y - 15) <= 1) & (np.abs(x - 12) <= 1)).astype(np.uint8)
        d["SpinalCord_05"] = ((np.abs(y - 15) <= 2) & (np.abs(x - 12) <= 2)).astype(np.uint8)
        d["Parotids"] = (_ball((8, 8, 5), 2) | _ball((8, 8, 19), 2)).astype(np.uint8)
        d["Larynx"] = _ball((12, 7, 12), 1.5).astype(np.uint8)
        d["Larynx-PTV"] = (d["Larynx"] & ~ptv).astype(np.uint8)
    else:
        d["Lungs"] = ((_ball((8, 9, 6), 4) | _ball((8, 9, 18), 4)) & ~ptv).astype(np.uint8)
        d["Heart"] = _ball((10, 7, 12), 2).astype(np.uint8)
        d["SpinalCord"] = ((np.abs(y - 16) <= 1) & (np.abs(x - 12) <= 1)).astype(np.uint8)
    d["Esophagus"] = _ball((8, 14, 12), 1.2).astype(np.uint8)
    d["Body"] = body.astype(np.uint8)
    r2 = ((z - centre[0]) * 2.0) ** 2 + ((y - centre[1]) * 2.5) ** 2 + ((x - centre[2]) * 2.5) ** 2
    gy = high["PDose"] * 1.04 * np.exp(-r2 / (2 * 14.0 ** 2)) * (1 + rng.normal(0, 0.01, SHAPE))
    gy = np.clip(gy, 0, None) * body
    d["all_mask"] = sorted(d)
    d["img"] = img
    d["dose"] = np.rint(gy / DOSE_SCALE).astype(np.uint32)
    d["dose_scale"] = DOSE_SCALE
    d["isVMAT"] = vmat
    d["angle_list"] = VMAT_ANGLES if vmat else IMRT_ANGLES
    d["isocenter"] = [np.float32(c) for c in centre]  # spatial_crop_dict: float32 scalars in a list
    d["angle_plate"] = np.zeros(SHAPE[1:], np.uint8)
    d["beam_plate"] = np.zeros(SHAPE, np.float32)
    d["origin"] = [-30.0, -25.0, 100.0]
    d["spacing"] = SPACING
    d["direction"] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    d["size"] = SHAPE
    return d


def write_dataset(root: str | Path, plans=PLANS, ptv_dict=None) -> Path:
    """The challenge's layout under ``root``: ``data/<plan>.npz``, ``meta_files/meta_data.csv`` and
    ``meta_files/PTV_DICT.json``. Returns ``root``."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "meta_files").mkdir(exist_ok=True)
    rows = []
    for i, (plan, patient, site, cohort, vmat, phase) in enumerate(plans):
        np.savez_compressed(root / "data" / f"{plan}.npz", plan_dict(patient, site, vmat, seed=i))
        folder = "HaN" if site == 1 else "Lung"
        rows.append({"PID": patient, "PlanID": plan.split("+")[1], "isVMAT": str(vmat).upper(), "cohort": cohort,
                     "site": site, "phase": phase,
                     "npz_path": f"/pct_ids/users/z004b27b/data/GDP-HMM_Challenge/{folder}/{phase}/{plan}.npz"})
    with open(root / "meta_files" / "meta_data.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "meta_files" / "PTV_DICT.json").write_text(json.dumps(ptv_dict or PTV_DICT, indent=4), encoding="utf-8")
    return root


def replace_plan(root: Path, plan: str, **changes) -> Path:
    """Rewrite ``root/data/<plan>.npz`` with keys changed (a value of None removes the key)."""
    patient, site, _, vmat = next((p[1], p[2], p[3], p[4]) for p in PLANS if p[0] == plan)
    d = plan_dict(patient, site, vmat, seed=[p[0] for p in PLANS].index(plan))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path = root / "data" / f"{plan}.npz"
    np.savez_compressed(path, d)
    return path
