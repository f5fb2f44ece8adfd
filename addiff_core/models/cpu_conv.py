"""Batch-1 3D convolutions on the CPU at oneDNN speed.

ATen (``ConvParams::use_mkldnn``) sends a batch-1 3D convolution with ``C * D * H <= 20480`` to
its slow im2col kernel: every layer below full resolution here, and batch 1 is common (predict,
evaluation, OpenKBP sites, DP microbatches; the cost: BENCHMARKS.md, "Differential privacy").
A batch of 2 (the sample and a stride-0 copy) selects oneDNN; only the first output is used, so
results are the convolution's own. Nothing in torch, MONAI or Opacus exposes the choice.
"""
from __future__ import annotations

import types

import torch
from torch import nn

SLOW3D_MAX_CDH = 20480  # ATen: N * C * D * H > 20480 selects oneDNN for batch 1
# the copy pays off only from these sizes on (BENCHMARKS.md, "Differential privacy")
MIN_VOXELS, MIN_CHANNEL_VOXELS = 512, 8192


def _uses_slow3d(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    if not (x.dim() == 5 and x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    voxels = x.shape[2] * x.shape[3] * x.shape[4]
    return (conv.groups == 1 and x.shape[1] * x.shape[2] * x.shape[3] <= SLOW3D_MAX_CDH
            and not (conv.kernel_size[-1] > 3 and conv.kernel_size[-2] > 3)
            and voxels >= MIN_VOXELS and x.shape[1] * voxels >= MIN_CHANNEL_VOXELS)


def _conv_forward(self: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _uses_slow3d(self, x):
        return nn.Conv3d._conv_forward(self, x.expand(2, *x.shape[1:]), weight, bias)[:1]
    return nn.Conv3d._conv_forward(self, x, weight, bias)


def fast_batch1_convs(model: nn.Module) -> nn.Module:
    """Patch every ``nn.Conv3d`` of ``model`` in place (its type, weights and state dict stay as
    they are, so Opacus and checkpoints see plain Conv3d layers); returns ``model``."""
    for m in model.modules():
        if type(m) is nn.Conv3d:
            m._conv_forward = types.MethodType(_conv_forward, m)
    return model
