"""LightweightVAE3D: the first stage of ADDiff-Dose (dose volume <-> small latent grid).

Opacus-friendly by construction: Conv3d + GroupNorm + SiLU only, strided Conv3d to go down and
``nn.Upsample`` (nearest) + Conv3d to go up (no ConvTranspose, no BatchNorm).

The decoder output is left linear (no softplus): the dose is mostly exactly 0 outside the beams
and a softplus can only approach 0 with vanishing gradient there, which blurs the low-dose
region; non-negativity is enforced where it matters (``diffusion.sample`` clamps at 0).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _groups(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` that is <= ``groups`` (GroupNorm needs one)."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


def conv_block(cin: int, cout: int, groups: int, stride: int = 1) -> nn.Sequential:
    """Conv3d(3x3x3) -> GroupNorm -> SiLU. ``stride=2`` halves every axis of an even size."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(_groups(cout, groups), cout),
        nn.SiLU(),
    )


class ResBlock3D(nn.Module):
    """Light pre-activation residual block: GN-SiLU-Conv-GN-SiLU-Conv + identity."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        g = _groups(channels, groups)
        self.body = nn.Sequential(
            nn.GroupNorm(g, channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
            nn.GroupNorm(g, channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LightweightVAE3D(nn.Module):
    """Dose (N, in_channels, S, S, S) <-> latent (N, cfg.latent_channels, S/d, S/d, S/d), d = cfg.downsample.

    Encoder: stem conv at full resolution, then one stride-2 conv (+ one residual block) per extra
    entry of ``cfg.vae_channels``; 1x1 conv to (mu, logvar). The decoder mirrors it with
    nearest upsampling + conv. No residual blocks at full resolution (cost at 128^3).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 1):
        super().__init__()
        ch = tuple(cfg.vae_channels)
        g = cfg.norm_groups
        lc = cfg.latent_channels
        self.in_channels = in_channels
        self.latent_channels = lc
        self.downsample = cfg.downsample

        enc: list[nn.Module] = [conv_block(in_channels, ch[0], g)]
        for i in range(1, len(ch)):
            enc += [conv_block(ch[i - 1], ch[i], g, stride=2), ResBlock3D(ch[i], g)]
        self.encoder = nn.Sequential(*enc)
        self.to_moments = nn.Conv3d(ch[-1], 2 * lc, 1)

        dec: list[nn.Module] = [conv_block(lc, ch[-1], g)]
        for i in range(len(ch) - 1, 0, -1):
            dec += [ResBlock3D(ch[i], g), nn.Upsample(scale_factor=2, mode="nearest"),
                    conv_block(ch[i], ch[i - 1], g)]
        self.decoder = nn.Sequential(*dec)
        self.to_out = nn.Conv3d(ch[0], in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_moments(self.encoder(x))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.decoder(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon, mu, logvar); samples z with the reparameterisation trick in train mode, z = mu in eval."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar
