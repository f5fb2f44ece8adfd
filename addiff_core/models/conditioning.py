"""ConditionEncoder: planning inputs -> spatial map on the latent grid + context tokens.

A Conv3d stack over the 17-channel planning volume gives the spatial map (concatenated by the
denoiser) and, pooled, structure tokens; MLPs give beam, plan and constraint tokens; a small
pre-LN transformer (hand-written q/k/v with a key padding mask, Opacus-friendly) fuses them. The
denoiser gets only the always-valid tokens (plan, register, structure), which read the masked
beams/constraints: padded rows never act as keys, so they cannot change the output, and zero
beams give no NaN.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..contract import BEAM_FEATURES, CONSTRAINT_FEATURES, N_CONSTRAINT_STRUCTS, N_OARS, TECHNIQUES, TUMOUR_SITES
from .vae import ResBlock3D, conv_block

COND_KEYS = ("ct", "targets", "oars", "beam_plate")
COND_IN_CHANNELS = 1 + 1 + N_OARS + 1  # 17
N_TECHNIQUES = len(TECHNIQUES)
N_REGISTERS = 2
FUSION_LAYERS = 2


def condition_volume(batch: dict) -> torch.Tensor:
    """The 17-channel input volume [ct, targets, oars(14), beam_plate] (N, 17, S, S, S)."""
    return torch.cat([batch[k].float() for k in COND_KEYS], dim=1)


def decoder_anatomy_volume(batch: dict, mode: str) -> torch.Tensor | None:
    """What a VAE decoder with ``decoder_anatomy`` ``mode`` reads: the planning volume, the CT
    alone, or nothing (None)."""
    if mode == "planning":
        return condition_volume(batch)
    if mode == "ct":
        return batch["ct"].float()
    return None


def decoder_anatomy_channels(mode: str) -> int:
    return {"planning": COND_IN_CHANNELS, "ct": 1}.get(mode, 0)


def token_grid(latent_size: int) -> int:
    """Side G of the pooled grid giving G^3 structure tokens."""
    return max(1, min(4 if latent_size >= 8 else 2, latent_size))


class MaskedAttention(nn.Module):
    """Multi-head self-attention from Linear layers; ``valid`` (N, T) bool masks the keys."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"context_dim {dim} must be divisible by num_heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(n, t, h, d // h).transpose(1, 2)  # (N, H, T, d/h)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) * (d // h) ** -0.5
        scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = scores.softmax(dim=-1)
        attn = attn * valid[:, None, None, :].to(attn.dtype)  # exact zeros on padded keys
        y = (attn @ v).transpose(1, 2).reshape(n, t, d)
        return self.out(y)


class FusionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), valid)
        return x + self.mlp(self.norm2(x))


def _mlp(cin: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, dim), nn.SiLU(), nn.Linear(dim, dim))


class ConditionEncoder(nn.Module):
    """forward(batch) -> (spatial (N, cond_channels, L, L, L), context (N, T, context_dim)).

    T = 1 (plan) + N_REGISTERS + G^3 structure tokens, G = token_grid(cfg.latent_size).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = tuple(cfg.vae_channels)
        g = cfg.norm_groups
        d = cfg.context_dim
        self.latent_size = cfg.latent_size
        self.grid = token_grid(cfg.latent_size)
        self.n_struct_tokens = self.grid ** 3

        # (a) structure encoder
        layers: list[nn.Module] = [conv_block(COND_IN_CHANNELS, ch[0], g)]
        for i in range(1, len(ch)):
            layers.append(conv_block(ch[i - 1], ch[i], g, stride=2))
        layers.append(ResBlock3D(ch[-1], g))
        self.structure = nn.Sequential(*layers)
        self.to_spatial = nn.Conv3d(ch[-1], cfg.cond_channels, 1)
        self.pool = nn.AdaptiveAvgPool3d(self.grid)
        self.struct_proj = nn.Linear(ch[-1], d)
        self.struct_pos = nn.Embedding(self.n_struct_tokens, d)

        # (b) beams, (c) plan, (d) constraints, registers
        self.beam_mlp = _mlp(BEAM_FEATURES, d)
        self.beam_technique = nn.Embedding(N_TECHNIQUES, d)
        self.site_emb = nn.Embedding(len(TUMOUR_SITES), d)
        self.plan_technique = nn.Embedding(N_TECHNIQUES, d)
        self.plan_nbeams = nn.Linear(1, d)
        self.constraint_mlp = _mlp(CONSTRAINT_FEATURES, d)
        self.constraint_struct = nn.Embedding(N_CONSTRAINT_STRUCTS, d)
        self.registers = nn.Embedding(N_REGISTERS, d)

        self.fusion = nn.ModuleList([FusionBlock(d, cfg.num_heads) for _ in range(FUSION_LAYERS)])
        self.norm_out = nn.LayerNorm(d)

    @property
    def num_context_tokens(self) -> int:
        return 1 + N_REGISTERS + self.n_struct_tokens

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = condition_volume(batch)
        n, dev = x.shape[0], x.device
        feat = self.structure(x)
        spatial = self.to_spatial(feat)

        idx = torch.arange(self.n_struct_tokens, device=dev).expand(n, -1)
        struct_tok = self.struct_proj(self.pool(feat).flatten(2).transpose(1, 2)) + self.struct_pos(idx)

        technique = batch["technique"].long().reshape(n).clamp(0, N_TECHNIQUES - 1)
        site = batch["tumour_site"].long().reshape(n).clamp(0, len(TUMOUR_SITES) - 1)

        beam_mask = batch["beam_mask"].bool()
        beams = torch.where(beam_mask[..., None], batch["beams"].float(), 0.0)
        beam_tok = self.beam_mlp(beams) + self.beam_technique(technique)[:, None, :]

        nbeams = beam_mask.float().sum(1, keepdim=True) / beam_mask.shape[1]
        plan_tok = (self.site_emb(site) + self.plan_technique(technique) + self.plan_nbeams(nbeams))[:, None, :]

        c_mask = batch["constraint_mask"].bool()
        cons = torch.where(c_mask[..., None], batch["constraints"].float(), 0.0)
        c_struct = torch.where(c_mask, batch["constraint_struct"].long(), 0).clamp(0, N_CONSTRAINT_STRUCTS - 1)
        cons_tok = self.constraint_mlp(cons) + self.constraint_struct(c_struct)

        reg_idx = torch.arange(N_REGISTERS, device=dev).expand(n, -1)
        reg_tok = self.registers(reg_idx)

        tokens = torch.cat([plan_tok, reg_tok, struct_tok, beam_tok, cons_tok], dim=1)
        n_fixed = self.num_context_tokens
        valid = torch.cat([torch.ones(n, n_fixed, dtype=torch.bool, device=dev), beam_mask, c_mask], dim=1)
        for blk in self.fusion:
            tokens = blk(tokens, valid)
        context = self.norm_out(tokens[:, :n_fixed])
        return spatial, context
