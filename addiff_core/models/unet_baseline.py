"""DoseUNet: direct-regression baseline (MONAI BasicUNet, GroupNorm, interpolation upsampling).

Input: the same 17 channels as the structure encoder ([ct, targets, oars(14), beam_plate]); the
beam geometry reaches it through the beam plate. Output: normalised dose (N, 1, S, S, S), linear
(clamp at 0 when reporting). BasicUNet downsamples 4 times, so the input is zero-padded to a
multiple of 16 and the output cropped back.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from ..config import ModelConfig
from .conditioning import COND_IN_CHANNELS, condition_volume

MULTIPLE = 16


def baseline_features(cfg: ModelConfig) -> tuple[int, ...]:
    b = cfg.unet_channels[0]
    return (b, b, 2 * b, 4 * b, 8 * b, b)


class DoseUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        feats = baseline_features(cfg)
        g = cfg.norm_groups
        if any(f % g for f in feats):
            raise ValueError(f"norm_groups {g} must divide the baseline U-Net widths {feats}")
        self.net = BasicUNet(
            spatial_dims=3, in_channels=COND_IN_CHANNELS, out_channels=1, features=feats,
            act="swish", norm=("group", {"num_groups": g}), upsample="nontrainable",
        )

    def forward(self, batch: dict) -> torch.Tensor:
        x = condition_volume(batch)
        size = x.shape[2:]
        pad = [(-s) % MULTIPLE for s in size]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        y = self.net(x)
        return y[:, :, : size[0], : size[1], : size[2]]
