"""LightweightVAE3D: the first stage of ADDiff-Dose (dose volume <-> small latent grid).

Opacus-friendly: Conv3d + GroupNorm + SiLU, strided convs down, nearest upsampling + conv up (no
ConvTranspose, no BatchNorm). The decoder output stays linear: a softplus only approaches the
exact zeros outside the beams with a vanishing gradient, blurring the low dose;
``diffusion.sample`` clamps at 0 instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LOGVAR_INIT = -10.0  # residual VAE: the posterior's initial log-variance (std 0.007 on a dose of ~1)


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


def space_to_channel(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C * r^3, D/r, H/r, W/r): each r^3 block's voxels become channels
    (a 3D pixel-unshuffle; torch ships only the 2D one)."""
    n, c, d, h, w = x.shape
    x = x.reshape(n, c, d // r, r, h // r, r, w // r, r)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, c * r ** 3, d // r, h // r, w // r)


def channel_to_space(x: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`space_to_channel`."""
    n, c, d, h, w = x.shape
    x = x.reshape(n, c // r ** 3, r, r, r, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, c // r ** 3, d * r, h * r, w * r)


class LightweightVAE3D(nn.Module):
    """Dose (N, in_channels, S, S, S) <-> latent (N, cfg.latent_channels, S/d, S/d, S/d), d = cfg.downsample.

    One stride-2 conv (+ residual block) per extra ``cfg.vae_channels`` entry, mirrored up.
    ``cfg.residual_latent`` (DC-AE): each latent channel starts as its share's mean dose and the
    decoder adds it back, the learned paths zero-initialised, so the latent carries the dose.
    ``cfg.decoder_anatomy`` "ct"/"planning" add anatomy skips to the decoder (which then ignores
    its latent, issue #24); ``cfg.latent_dropout``: P(decode z = 0) per training case.
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
        self.anatomy_mode = cfg.decoder_anatomy if condition_channels > 0 else "none"

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
        self.residual = bool(cfg.residual_latent)
        if self.residual:
            if (self.downsample ** 3 * in_channels) % lc:
                raise ValueError(f"residual_latent: latent_channels ({lc}) must divide the "
                                 f"{self.downsample ** 3 * in_channels} voxels of a latent cell")
            self._start_as_shortcut()

    @property
    def uses_anatomy(self) -> bool:
        """Whether the decoder reads anatomy besides its latent (``anatomy_mode`` is not "none")."""
        return self.anatomy_mode != "none"

    @torch.no_grad()
    def _start_as_shortcut(self) -> None:
        """The learned residuals start at zero and the posterior narrow (std e^(LOGVAR_INIT/2)),
        so the untrained VAE is the block-average codec, not that codec plus noise."""
        lc = self.latent_channels
        self.to_out.weight.zero_()
        self.to_out.bias.zero_()
        self.to_moments.weight[:lc].zero_()
        self.to_moments.bias[:lc].zero_()
        self.to_moments.bias[lc:].fill_(LOGVAR_INIT)

    def _down_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Each latent channel = the mean of its share of the latent cell's voxels."""
        s = space_to_channel(x, self.downsample)
        return s.reshape(s.shape[0], self.latent_channels, -1, *s.shape[2:]).mean(2)

    def _up_shortcut(self, z: torch.Tensor) -> torch.Tensor:
        """Each voxel gets its latent channel's value back (the inverse of ``_down_shortcut``
        for a dose constant over each share)."""
        rep = self.downsample ** 3 * self.in_channels // self.latent_channels
        return channel_to_space(z.repeat_interleave(rep, dim=1), self.downsample)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_moments(self.encoder(x))
        mu, logvar = h.chunk(2, dim=1)
        if self.residual:
            mu = mu + self._down_shortcut(x)
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
        out = self.to_out(h)
        return out + self._up_shortcut(z) if self.residual else out

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
