"""The OpenKBP dose score written independently of ``addiff_core`` (tests/test_metrics.py,
tests/test_regions.py)."""
from __future__ import annotations

import math

import numpy as np


def readme_dose_score(pred: np.ndarray, ref: np.ndarray, pdm: np.ndarray) -> float:
    """The official dose score as ../shared/openkbp-sample/README.md words it, written
    independently of addiff_core: the prediction is multiplied by the possible-dose mask, then
    (sum of |pred - ref| over ALL voxels) / (number of possible-dose-mask voxels)."""
    masked = (np.asarray(pred, np.float64) * (np.asarray(pdm) != 0)).ravel().tolist()
    return math.fsum(abs(p - r) for p, r in zip(masked, np.asarray(ref, np.float64).ravel().tolist())) \
        / int(np.count_nonzero(pdm))
