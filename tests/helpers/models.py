"""The tiny model configuration of the tests (one definition) and a fake batch of sample tensors.

``TINY_MODEL``: the smallest useful ADDiff-Dose / U-Net on a 16^3 grid (seconds on one CPU core);
``tiny_cfg(kind, size)``: the same with more DDIM steps and the constraint hinge on (model and
diffusion tests). ``configs/tiny.yaml`` (helpers.federation.TINY) is a different, 32^3 model:
the federation tests need a file that travels in the run config.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from addiff_core.config import GridConfig, ModelConfig
from addiff_core.contract import B_MAX, BEAM_FEATURES, C_MAX, CONSTRAINT_FEATURES, OAR_NAMES, TARGET_STRUCT, TUMOUR_SITES

TINY_MODEL = ModelConfig(grid=GridConfig(size=16), vae_channels=(8, 16), unet_channels=(16, 16),
                         attention_levels=(False, True), cond_channels=8, context_dim=16, num_heads=2,
                         norm_groups=4, sample_steps=2)


def tiny_site_model() -> dict:
    """``TINY_MODEL`` as the ``model:`` section of a site file (plain YAML types)."""
    return {"grid": {"size": TINY_MODEL.grid.size}, "vae_channels": list(TINY_MODEL.vae_channels),
            "unet_channels": list(TINY_MODEL.unet_channels), "attention_levels": list(TINY_MODEL.attention_levels),
            "cond_channels": TINY_MODEL.cond_channels, "context_dim": TINY_MODEL.context_dim,
            "num_heads": TINY_MODEL.num_heads, "norm_groups": TINY_MODEL.norm_groups,
            "sample_steps": TINY_MODEL.sample_steps}


def tiny_cfg(kind: str = "diffusion", size: int = 16) -> ModelConfig:
    return dataclasses.replace(TINY_MODEL, kind=kind, grid=GridConfig(size=size), sample_steps=5,
                               constraint_weight=0.5)


def _ball(s: int, centre, radius) -> torch.Tensor:
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float32),) * 3, indexing="ij")
    return (((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius ** 2).float()


def fake_batch(n: int = 2, s: int = 16, seed: int = 0, n_beams: int = 5, constraints: bool = True) -> dict:
    """A batch following docs/ARCHITECTURE.md "Sample tensors" (stacked along a new dim 0)."""
    g = torch.Generator().manual_seed(seed)
    c = (s - 1) / 2
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float32),) * 3, indexing="ij")
    body = ((((y - c) / (0.45 * s)) ** 2 + ((x - c) / (0.45 * s)) ** 2) <= 1).float()
    target = _ball(s, (c, c, c), s / 6)
    cord = _ball(s, (c, c + s / 3, c), s / 10)
    parotid = _ball(s, (c, c, c - s / 4), s / 8)
    r2 = (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2
    dose = torch.exp(-r2 / (2 * (s / 5) ** 2)) * body

    out = {k: [] for k in ("ct", "dose", "has_dose", "targets", "target_primary", "oars", "oar_present", "body",
                           "beam_plate", "beams", "beam_mask", "technique", "tumour_site", "constraints",
                           "constraint_struct", "constraint_mask", "rx")}
    for i in range(n):
        amp = 1.0 + 0.1 * i
        out["ct"].append(((torch.rand(1, s, s, s, generator=g) * 0.2 - 1) * (1 - body) + body * 0.1 * i)[None][0])
        out["dose"].append((dose * amp)[None])
        out["has_dose"].append(torch.tensor(True))
        out["targets"].append(target[None])
        out["target_primary"].append(target[None])
        oars = torch.zeros(len(OAR_NAMES), s, s, s)
        oars[OAR_NAMES.index("SpinalCord")] = cord
        oars[OAR_NAMES.index("LeftParotid")] = parotid
        out["oars"].append(oars)
        present = torch.zeros(len(OAR_NAMES), dtype=torch.bool)
        present[[OAR_NAMES.index("SpinalCord"), OAR_NAMES.index("LeftParotid")]] = True
        out["oar_present"].append(present)
        out["body"].append(body[None])
        out["beam_plate"].append((torch.rand(1, s, s, s, generator=g) * body)[None][0])
        beams = torch.zeros(B_MAX, BEAM_FEATURES)
        bm = torch.zeros(B_MAX, dtype=torch.bool)
        for b in range(n_beams):
            ang = 2 * math.pi * b / max(n_beams, 1)
            beams[b] = torch.tensor([math.sin(ang), math.cos(ang), 0.0, 1.0, 0.6, 0.0])
            bm[b] = True
        out["beams"].append(beams)
        out["beam_mask"].append(bm)
        out["technique"].append(torch.tensor(0))
        out["tumour_site"].append(torch.tensor(i % len(TUMOUR_SITES)))
        cons = torch.zeros(C_MAX, CONSTRAINT_FEATURES)
        cs = torch.zeros(C_MAX, dtype=torch.long)
        cm = torch.zeros(C_MAX, dtype=torch.bool)
        if constraints:
            rows = [(0, 0.5, 0.0, OAR_NAMES.index("SpinalCord")),   # Dmax <= 0.5
                    (1, 0.3, 0.0, OAR_NAMES.index("LeftParotid")),  # Dmean <= 0.3
                    (2, 0.4, 0.2, OAR_NAMES.index("LeftParotid")),  # V(0.4) <= 20%
                    (3, 0.95, 0.95, TARGET_STRUCT)]                    # D95(target) >= 0.95
            for r, (kind, thr, lim, st) in enumerate(rows):
                cons[r, kind] = 1.0
                cons[r, 4] = thr
                cons[r, 5] = lim
                cs[r] = st
                cm[r] = True
        out["constraints"].append(cons)
        out["constraint_struct"].append(cs)
        out["constraint_mask"].append(cm)
        out["rx"].append(torch.tensor(70.0))
    return {k: torch.stack(v) for k, v in out.items()}


def reinit_zero_params(module: nn.Module, seed: int = 0) -> None:
    """MONAI zero-initialises some output convs; give them small values so every grad is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
