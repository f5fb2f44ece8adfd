"""Metric 1 of the GDP-HMM challenge (AAPM 2025): the MAE in the 5 Gy isodose and the body.

Transcribed from the challenge's ``evaluation.ipynb`` cell "MAE for a batch of data (Metric 1 on
challenge leaderboard)" (fork sunyu0410/GDP-HMM_AAPMChallenge at 72ef3f01; the README of
RiqiangGao/GDP-HMM_AAPMChallenge at be990a67, "Evaluation Methods", replaced its first
``ref_dose > 5`` by this mask). Per plan::

    ref_dose   = data_dict['dose'] * data_dict['dose_scale']
    norm_scale = PDose(PTV_High) / (np.percentile(ref_dose[PTVHigh.astype('bool')], 3) + 1e-5)
    ref_dose   = ref_dose * norm_scale                       # D97 of PTV-High = its prescription
    isodose_5Gy_mask     = ((ref_dose > 5) | (prediction > 5)) & (Body > 0)
    isodose_ref_5Gy_mask = (ref_dose > 5) & (Body > 0)
    error = np.sum(np.abs(ref_dose - prediction)[isodose_5Gy_mask > 0]) / np.sum(isodose_ref_5Gy_mask)

The leaderboard value is the mean over plans. ``PTVHigh`` is ``PTVHighOPT`` for head-and-neck
plans and ``PTV`` for lung (recorded per case in ``CASE/gdp_hmm.yaml``, ``normalisation``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

ISODOSE_GY = 5.0
"""The challenge's dose threshold (Gy), on the reference and on the prediction."""
D97_PERCENTILE = 3.0
NORM_EPS = 1e-5
METRIC_KEY = "gdp_hmm_mae_gy"
"""The per-case metric ``evaluate`` adds for cases imported from GDP-HMM."""
INFO_FILE = "gdp_hmm.yaml"
"""Written into each case by ``data import-gdp-hmm`` (importer.py): where it came from, how it
was normalised."""


def d97_scale(dose_gy: np.ndarray, ptv_high: np.ndarray, pdose_gy: float) -> float:
    """The challenge's normalisation factor: ``PDose / (3rd percentile of the dose in PTV-High +
    1e-5)`` (data_loader.py ``MyDataset.__getitem__``; evaluation.ipynb)."""
    values = np.asarray(dose_gy)[np.asarray(ptv_high).astype(bool)]
    if values.size == 0:
        raise ValueError("the PTV-High structure used for the D97 normalisation is empty")
    return float(pdose_gy) / (float(np.percentile(values, D97_PERCENTILE)) + NORM_EPS)


def challenge_mae(pred_gy: np.ndarray, ref_gy: np.ndarray, body: np.ndarray,
                  ptv_high: np.ndarray | None = None, pdose_gy: float | None = None) -> float:
    """One plan's leaderboard MAE (Gy), the module docstring's formula; nan when no body voxel of
    the reference exceeds 5 Gy.

    Args:
        pred_gy, ref_gy, body: prediction, reference dose and body mask on one grid.
        ptv_high, pdose_gy: normalise the reference to D97(PTV-High) = PDose first, as the
            challenge does to ``dose * dose_scale`` (None: as given).
    """
    pred = np.asarray(pred_gy, dtype=np.float64)
    ref = np.asarray(ref_gy, dtype=np.float64)
    if pred.shape != ref.shape or np.shape(body) != ref.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, reference {ref.shape}, body {np.shape(body)}")
    if ptv_high is not None and pdose_gy is not None:
        ref = ref * d97_scale(ref, ptv_high, pdose_gy)
    inside = np.asarray(body) > 0
    union = ((ref > ISODOSE_GY) | (pred > ISODOSE_GY)) & inside
    ref_region = (ref > ISODOSE_GY) & inside
    n = int(ref_region.sum())
    return float(np.abs(ref - pred)[union].sum() / n) if n else math.nan


def normalisation_of(info: Any) -> tuple[str, float] | None:
    """(structure, PDose in Gy) of a ``gdp_hmm.yaml`` mapping's ``normalisation``; None if it is
    not shaped as the importer writes it."""
    norm = info.get("normalisation") if isinstance(info, Mapping) else None
    if not isinstance(norm, Mapping):
        return None
    name, pdose = norm.get("structure"), norm.get("pdose_gy")
    if not isinstance(name, str) or isinstance(pdose, bool) or not isinstance(pdose, (int, float)):
        return None
    if not math.isfinite(float(pdose)) or not 0 < float(pdose) <= 150:
        return None
    return name, float(pdose)


def case_challenge_metrics(case: Any, pred_gy: np.ndarray) -> dict[str, float]:
    """``{METRIC_KEY: value}`` for a case imported from GDP-HMM (it holds :data:`INFO_FILE`),
    ``{}`` for any other case. ``case`` is a ``case_io.Case`` with its reference dose;
    ``pred_gy`` the prediction on its CT grid in Gy.

    Raises:
        CaseError: the case's gdp_hmm.yaml is unreadable, or names a structure the case lacks.
    """
    import os

    from ..case_io import BODY_NAME, read_case_yaml
    from ..errors import CaseError

    if not os.path.lexists(case.path / INFO_FILE):
        return {}
    norm = normalisation_of(read_case_yaml(case.path, INFO_FILE))
    if norm is None:
        raise CaseError(case.path, INFO_FILE, "normalisation must map structure to a mask name and pdose_gy to "
                                              "a dose in (0, 150] Gy (as data import-gdp-hmm writes it)")
    name, pdose = norm
    for needed in (name, BODY_NAME):
        if needed not in case.masks:
            raise CaseError(case.path, INFO_FILE, f"names {needed[:64]} but masks/{needed[:64]}.nii.gz is missing")
    ref = case.array("dose")
    value = challenge_mae(pred_gy, ref, case.array(BODY_NAME), case.array(name), pdose)
    return {METRIC_KEY: value}
