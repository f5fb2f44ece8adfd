"""Models: ADDiff-Dose (VAE + conditional latent denoiser) and the direct U-Net baseline.

State-dict prefixes are the units that travel in federation: ``vae.``, ``diffusion.`` (ADDiffDose)
and ``unet.`` (DoseRegressor). Noise schedulers live in ``addiff_core.diffusion``, never in a module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .conditioning import ConditionEncoder, decoder_anatomy_channels
from .denoiser import LatentDenoiser
from .unet_baseline import DoseUNet
from .vae import LightweightVAE3D
from .cpu_conv import fast_batch1_convs
from ..contract import STAGES

__all__ = [
    "ADDiffDose", "DiffusionStage", "DoseRegressor", "LightweightVAE3D", "ConditionEncoder",
    "LatentDenoiser", "DoseUNet", "build_model", "count_parameters", "stage_prefix", "STAGES",
]



class DiffusionStage(nn.Module):
    """The ``diffusion.`` unit: condition encoder + latent denoiser + ``latent_scale`` buffer.

    ``latent_scale`` (scalar) multiplies the VAE's mu to give unit-variance latents; 0.0 means
    not calibrated yet (see ``diffusion.calibrate_latent_scale``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cond = ConditionEncoder(cfg)
        self.denoiser = LatentDenoiser(cfg)
        self.register_buffer("latent_scale", torch.zeros(1))  # 1 element: survives array round trips

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        spatial, context = self.cond(batch)
        return self.denoiser(z_t, timesteps, spatial, context)


class ADDiffDose(nn.Module):
    """Children: ``vae`` (LightweightVAE3D) and ``diffusion`` (DiffusionStage). Use the functions
    of ``addiff_core.diffusion`` (vae_loss, diffusion_loss, sample) to train / predict."""

    kind = "diffusion"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = LightweightVAE3D(cfg, in_channels=1, condition_channels=decoder_anatomy_channels(cfg.decoder_anatomy))
        self.diffusion = DiffusionStage(cfg)

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        """The denoiser's output for latent z_t: x0, v or epsilon as ``cfg.prediction_type`` says
        (what an Opacus GradSampleModule wrapper calls)."""
        return self.diffusion(z_t, timesteps, batch)


class DoseRegressor(nn.Module):
    """Child ``unet`` (DoseUNet). forward(batch) -> normalised dose (N, 1, S, S, S)."""

    kind = "unet"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = DoseUNet(cfg)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.unet(batch)


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.kind == "diffusion":
        return fast_batch1_convs(ADDiffDose(cfg))
    if cfg.kind == "unet":
        return fast_batch1_convs(DoseRegressor(cfg))
    raise ValueError(f"unknown model kind {cfg.kind!r} (expected 'diffusion' or 'unet')")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def stage_prefix(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    return stage + "."
