"""Statistics a DP site may compute without touching its private cases: on synthetic phantoms.

``diffusion.latent_scale`` scales latents to unit variance. A DP site must not compute it on its
cases (an un-noised statistic would leave with its weights, outside epsilon), so it encodes a few
deterministic phantoms (one per tumour site, the same everywhere) with the global VAE it received;
an approximation when real doses differ (docs/PRIVACY.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .case_io import load_case, save_case
from .contract import TUMOUR_SITES
from .config import GridConfig
from .preprocessing import case_to_sample

PHANTOM_SEED = 20261201


def phantom_batches(grid: GridConfig, seed: int = PHANTOM_SEED) -> list[dict[str, torch.Tensor]]:
    """One batch (of one sample) per tumour site: synthetic phantoms on the model grid."""
    from .synth import default_spacing, synth_case  # heavy to import; only DP sites need it

    rng = np.random.default_rng(seed)
    batches = []
    with tempfile.TemporaryDirectory(prefix="addiff-phantoms-") as tmp:
        for site in TUMOUR_SITES:
            spacing = default_spacing(site, grid.size)
            ct, masks, dose, plan, body = synth_case(rng, site, grid.size, spacing)
            case_dir = Path(tmp) / site
            save_case(case_dir, ct, plan, masks, dose=dose, possible_dose_mask=body, spacing=spacing,
                      origin=tuple(-(n - 1) / 2.0 * sp for n, sp in zip(ct.shape[::-1], spacing)))
            sample, _ = case_to_sample(load_case(case_dir, require_dose=True), grid)
            batches.append({k: v[None] for k, v in sample.items()})
    return batches


def calibrate_on_phantoms(model: torch.nn.Module, grid: GridConfig) -> float:
    """Set ``diffusion.latent_scale`` from the phantoms (only while it is 0: a scale the global
    model already carries is kept). Returns the scale in use."""
    from .diffusion import calibrate_latent_scale
    from .training import to_device

    device = next(model.parameters()).device
    if float(model.diffusion.latent_scale) > 0:
        return float(model.diffusion.latent_scale)
    return calibrate_latent_scale(model, (to_device(b, device) for b in phantom_batches(grid)))
