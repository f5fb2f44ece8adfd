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

    Encoder (dose only): stem conv at full resolution, then one stride-2 conv (+ one residual
    block) per extra entry of ``cfg.vae_channels``; 1x1 conv to (mu, logvar).

    Decoder: with ``cfg.anatomy_decoder`` it is a U-Net over the planning volume (``anatomy``,
    ``condition_channels`` channels at full resolution: CT, targets, OARs, beam plate) whose
    bottleneck also receives the latent: an anatomy encoder mirrors the dose encoder's levels and
    its features join the decoder at every level (concatenated skips), so body outline and beam
    edges need not pass through the latent. Without it, the decoder mirrors the encoder on the
    latent alone (the original design). Up-sampling is nearest + conv at every level.

    ``cfg.latent_dropout``: in training, each case decodes z = 0 with this probability, so that
    z = 0 decodes to a plausible dose from the anatomy alone (a regression the diffusion refines).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 1, condition_channels: int = 0):
        super().__init__()
        ch = tuple(cfg.vae_channels)
        g = cfg.norm_groups
        lc = cfg.latent_channels
        self.in_channels = in_channels
        self.latent_channels = lc
        self.downsample = cfg.downsample
        self.latent_dropout = float(cfg.latent_dropout)
        self.uses_anatomy = bool(cfg.anatomy_decoder and condition_channels > 0)

        enc: list[nn.Module] = [conv_block(in_channels, ch[0], g)]
        for i in range(1, len(ch)):
            enc += [conv_block(ch[i - 1], ch[i], g, stride=2), ResBlock3D(ch[i], g)]
        self.encoder = nn.Sequential(*enc)
        self.to_moments = nn.Conv3d(ch[-1], 2 * lc, 1)

        skip = ch if self.uses_anatomy else (0,) * len(ch)  # channels joining each decoder level
        if self.uses_anatomy:
            anat: list[nn.Module] = [conv_block(condition_channels, ch[0], g)]
            anat += [conv_block(ch[i - 1], ch[i], g, stride=2) for i in range(1, len(ch))]
            self.anatomy = nn.ModuleList(anat)
        self.bottleneck = conv_block(lc + skip[-1], ch[-1], g)
        self.up = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.up.append(nn.ModuleDict({
                "res": ResBlock3D(ch[i], g),
                "up": nn.Upsample(scale_factor=2, mode="nearest"),
                "conv": conv_block(ch[i] + skip[i - 1], ch[i - 1], g),
            }))
        self.to_out = nn.Conv3d(ch[0], in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_moments(self.encoder(x))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _anatomy_features(self, anatomy: torch.Tensor | None) -> list[torch.Tensor]:
        if not self.uses_anatomy:
            return []
        if anatomy is None:
            raise ValueError("this VAE's decoder reads the planning volume: pass anatomy=condition_volume(batch)")
        feats, h = [], anatomy
        for block in self.anatomy:
            h = block(h)
            feats.append(h)
        return feats

    def decode(self, z: torch.Tensor, anatomy: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised dose from latent ``z``; ``anatomy`` (N, condition_channels, S, S, S) is
        required when the decoder is anatomy-aware."""
        skips = self._anatomy_features(anatomy)
        h = torch.cat([z, skips[-1]], dim=1) if skips else z
        h = self.bottleneck(h)
        for k, level in enumerate(self.up):
            h = level["up"](level["res"](h))
            if skips:
                h = torch.cat([h, skips[len(skips) - 2 - k]], dim=1)
            h = level["conv"](h)
        return self.to_out(h)

    def forward(self, x: torch.Tensor, anatomy: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon, mu, logvar); in train mode z is sampled with the reparameterisation trick and
        dropped to 0 per case with probability ``latent_dropout``; z = mu in eval."""
        mu, logvar = self.encode(x)
        z = mu
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            if self.latent_dropout > 0:
                keep = (torch.rand(z.shape[0], device=z.device) >= self.latent_dropout).to(z.dtype)
                z = z * keep.reshape(-1, *([1] * (z.ndim - 1)))
        return self.decode(z, anatomy), mu, logvar
