"""Pure loss functions: KL, masked L1, clinical dose-volume hinge, on normalised dose (Gy / rx).

Every mean is ``sum / max(n, 1)`` (Opacus' Poisson sampling makes empty batches). Per-sample
reductions keep each sample's gradient its own (what Opacus' ``loss_reduction="mean"`` assumes);
``masked_l1(..., reduction="global")`` couples samples: fine without DP only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import CONSTRAINT_KINDS, DMAX, DMEAN, DMIN_PCT, TARGET_STRUCT, VX

_BIG = 1e4


def _batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
    return per_sample.sum() / max(per_sample.shape[0], 1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) averaged per element ("mean"), or per sample ("none": (N,))."""
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())
    if reduction == "none":
        return kl.flatten(1).mean(1)
    if reduction == "mean":
        return kl.sum() / max(kl.numel(), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              reduction: str = "global") -> torch.Tensor:
    """Mean |pred - target| over mask voxels.

    reduction: "global": sum over the batch / max(n voxels, 1); "sample": per-sample masked mean,
    then sum / max(N, 1) (DP-friendly); "none": per-sample masked means (N,).
    """
    m = mask.to(pred.dtype).expand_as(pred)
    err = (pred - target).abs() * m
    if reduction == "global":
        return err.sum() / m.sum().clamp_min(1.0)
    per = err.flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    if reduction == "none":
        return per
    if reduction == "sample":
        return _batch_mean(per)
    raise ValueError(f"unknown reduction {reduction!r}")


def _structure_masks(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N_CONSTRAINT_STRUCTS, V) bool masks [oars (N_OARS), target_primary] and (N, N_CONSTRAINT_STRUCTS)
    bool presence, indexed like ``constraint_struct``."""
    oars = batch["oars"].flatten(2) > 0.5
    tp = batch["target_primary"].flatten(2) > 0.5
    masks = torch.cat([oars, tp], dim=1)
    present = torch.cat([batch["oar_present"].bool(), tp.any(-1)], dim=1)
    return masks, present


def _smooth_max(d: torch.Tensor, m: torch.Tensor, nvox: torch.Tensor, top_frac: float) -> torch.Tensor:
    """Mean of the top ``top_frac`` voxels of each row inside its mask (at least one voxel)."""
    k = torch.ceil(nvox * top_frac).clamp_min(1).long()
    kmax = int(k.max())
    vals = torch.where(m, d, torch.full_like(d, -_BIG)).topk(kmax, dim=1).values
    keep = torch.arange(kmax, device=d.device)[None, :] < k[:, None]
    return torch.where(keep, vals, torch.zeros_like(vals)).sum(1) / k.to(d.dtype)


def _quantile(d: torch.Tensor, m: torch.Tensor, nvox: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated q-quantile of each row's masked voxels (gradient to two voxels)."""
    s = torch.where(m, d, torch.full_like(d, _BIG)).sort(dim=1).values
    pos = q.clamp(0, 1) * (nvox - 1).clamp_min(0)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (nvox - 1).clamp_min(0).long())
    frac = (pos - lo.to(pos.dtype))
    v_lo = s.gather(1, lo[:, None])[:, 0]
    v_hi = s.gather(1, hi[:, None])[:, 0]
    return v_lo * (1 - frac) + v_hi * frac


def constraint_hinge(dose_norm: torch.Tensor, batch: dict, reduction: str = "mean",
                     temperature: float = 0.02, top_frac: float = 0.02) -> torch.Tensor:
    """Squared hinge on the violated dose-volume constraints of a normalised dose, averaged per
    sample over its active ones (``constraint_mask`` rows whose structure is present; 0 if none).
    Dmax: mean of the top ``top_frac`` voxels - thr; Dmean: mean - thr; Vx: sigmoid((d - thr) /
    ``temperature``) fraction - limit; Dmin_pct: thr - the (1 - limit)-quantile.

    Args:
        dose_norm: (N, 1, S, S, S); batch: a collated batch (``constraints``, masks).
        reduction: "mean" (sum / max(N, 1)) or "none" ((N,)).
        temperature, top_frac: the soft V_x and the smooth maximum.

    Returns:
        the loss, with a grad_fn whenever ``dose_norm`` has one (zero when nothing is active).
    """
    n = dose_norm.shape[0]
    zero = dose_norm.sum() * 0.0
    per_sample = zero.expand(n).clone()
    if n == 0:
        return zero if reduction == "mean" else per_sample

    masks, present = _structure_masks(batch)
    struct = batch["constraint_struct"].long().clamp(0, TARGET_STRUCT)
    active = batch["constraint_mask"].bool() & present.gather(1, struct)
    if not bool(active.any()):
        return zero if reduction == "mean" else per_sample

    ni, ci = active.nonzero(as_tuple=True)
    cons = batch["constraints"].to(dose_norm.dtype)[ni, ci]  # (P, CONSTRAINT_FEATURES)
    nk = len(CONSTRAINT_KINDS)
    kind = cons[:, :nk].argmax(1)
    thr, lim = cons[:, nk], cons[:, nk + 1]
    d_all = dose_norm.flatten(1)[ni]  # (P, V)
    m_all = masks[ni, struct[ni, ci]]  # (P, V)
    nvox = m_all.sum(1).to(dose_norm.dtype)

    viol = torch.zeros_like(thr)
    for k in (DMAX, DMEAN, VX, DMIN_PCT):
        sel = (kind == k).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        d, m, nv, t, lm = d_all[sel], m_all[sel], nvox[sel].clamp_min(1), thr[sel], lim[sel]
        if k == DMAX:
            v = _smooth_max(d, m, nv, top_frac) - t
        elif k == DMEAN:
            v = (d * m).sum(1) / nv - t
        elif k == VX:
            v = (torch.sigmoid((d - t[:, None]) / temperature) * m).sum(1) / nv - lm
        else:
            v = t - _quantile(d, m, nv, 1.0 - lm)
        viol = viol.index_put((sel,), v)
    h = F.relu(viol).pow(2)

    sums = torch.zeros(n, dtype=h.dtype, device=h.device).index_add(0, ni, h)
    counts = torch.zeros(n, dtype=h.dtype, device=h.device).index_add(0, ni, torch.ones_like(h))
    per_sample = sums / counts.clamp_min(1.0) + zero
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return _batch_mean(per_sample)
    raise ValueError(f"unknown reduction {reduction!r}")
