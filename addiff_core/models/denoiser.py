"""LatentDenoiser: MONAI DiffusionModelUNet over [z_t, spatial condition] with cross-attention.

MONAI 1.6's cross-attention (CrossAttentionBlock/SABlock inside SpatialTransformer) is built from
nn.Linear + LayerNorm, so Opacus can compute per-sample gradients; flash attention is off
(``use_flash_attention=False``) and the U-Net has no gradient checkpointing path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet

from ..config import ModelConfig


class LatentDenoiser(nn.Module):
    """forward(z_t, timesteps, spatial, context) -> (N, latent_channels, L, L, L): what
    ``cfg.prediction_type`` names (the clean latent x0 by default, or v, or the noise epsilon)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if len(cfg.attention_levels) != len(cfg.unet_channels):
            raise ValueError("attention_levels must have one entry per unet_channels level")
        head_channels = tuple(max(1, c // cfg.num_heads) for c in cfg.unet_channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=cfg.latent_channels + cfg.cond_channels,
            out_channels=cfg.latent_channels,
            channels=tuple(cfg.unet_channels),
            attention_levels=tuple(cfg.attention_levels),
            num_res_blocks=1,
            num_head_channels=head_channels,
            norm_num_groups=cfg.norm_groups,
            with_conditioning=True,
            cross_attention_dim=cfg.context_dim,
            use_flash_attention=False,
        )

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor, spatial: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(z_t.shape[0])
        return self.unet(torch.cat([z_t, spatial], dim=1), timesteps=timesteps, context=context)
