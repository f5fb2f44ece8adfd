"""What each part of ADDiff-Dose contributes (issue #24): the MAE of decoding the sampled latent,
z = 0, the reference dose's own latent (oracle) and another case's (shuffled). If the decoder
ignored its latent, z = 0 would score like the sample; if the VAE were no autoencoder, the oracle
would not beat it. MAEs are on the model grid in the ``body``, in units of the prescription, of
the latent path itself; with a plan normalisation (``cfg.plan_normalisation``) the MAEs of every
decode normalised as the model's predictions are come beside them (``CaseProbe.mae_plan_normalised``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import diffusion as diff
from .config import ModelConfig
from .plan_normalisation import plan_normalised

VARIANTS = ("sampled", "zero", "oracle", "shuffled")


@dataclass(frozen=True)
class CaseProbe:
    """One case: MAE of each decoded latent and the spread of several samples."""

    case_id: str
    mae: dict[str, float]  # VARIANTS -> MAE (normalised dose) inside the evaluation region
    mae_plan_normalised: dict[str, float] | None  # the same after cfg.plan_normalisation (None: "none")
    spread: float  # mean voxel std of the samples / mean reference dose, inside the region (nan: 1 sample)
    mean_of_samples: float  # MAE of the samples' mean (nan: 1 sample)


def _region_mae(pred: torch.Tensor, ref: torch.Tensor, region: torch.Tensor) -> float:
    inside = region > 0.5
    return float((pred - ref).abs()[inside].mean()) if bool(inside.any()) else float("nan")


@torch.no_grad()
def probe_cases(model: torch.nn.Module, samples: list[dict[str, torch.Tensor]], cfg: ModelConfig,
                case_ids: list[str] | None = None, *, num_samples: int = 4, steps: int | None = None,
                seed: int = 0) -> list[CaseProbe]:
    """Probe every case of ``samples`` (model-grid sample dicts with a reference ``dose``).

    Args:
        model: a trained ADDiff-Dose (``build_model`` of kind ``diffusion``).
        samples: unbatched sample dicts (``SampleDataset`` items); at least two for ``shuffled``.
        cfg: the model's config (sampler steps, prediction type).
        case_ids: names for the rows (default: case 1, 2, ...).
        num_samples: samples for the spread (1: no spread); the ``sampled`` MAE is of sample 1.
        steps: DDIM steps (default ``cfg.sample_steps``).
        seed: sampling seed of case i is ``seed + i`` (as ``training.evaluate``).

    Raises:
        ValueError: for a U-Net model (no latent) or fewer than two cases.
    """
    m = diff.unwrap(model)
    if not hasattr(m, "vae"):
        raise ValueError("the latent probe needs an ADDiff-Dose model (kind: diffusion), not the U-Net")
    if len(samples) < 2:
        raise ValueError("the latent probe needs at least two cases (the shuffled latent is another case's)")
    m.eval()
    dev = next(m.parameters()).device
    batches = [{k: v[None].to(dev) for k, v in s.items()} for s in samples]
    latents = [diff.encode_dose(m, b["dose"]) for b in batches]
    rows = []
    for i, b in enumerate(batches):
        region, ref = b["body"].float(), b["dose"]
        stack = diff.sample_doses(m, b, cfg, steps=steps, seed=seed + i, num_samples=num_samples)
        decoded = {  # each as a prediction: >= 0, zero outside the region (the sample already is)
            "sampled": stack[0],
            "zero": diff.decoded_dose(m, torch.zeros_like(latents[i]), b),
            "oracle": diff.decoded_dose(m, latents[i], b),
            "shuffled": diff.decoded_dose(m, latents[(i + 1) % len(batches)], b),
        }
        mae = {k: _region_mae(v, ref, region) for k, v in decoded.items()}
        mae_plan_normalised = None
        if cfg.plan_normalisation != "none":
            mae_plan_normalised = {k: _region_mae(plan_normalised(v, b, cfg.plan_normalisation), ref, region)
                                   for k, v in decoded.items()}
        spread = mean_mae = float("nan")
        mean, std = diff.mean_and_std(stack)
        if std is not None:
            inside = region > 0.5
            spread = float(std[inside].mean() / ref[inside].mean().clamp_min(1e-8))
            mean_mae = _region_mae(mean, ref, region)
        rows.append(CaseProbe(case_ids[i] if case_ids else f"case {i + 1}", mae, mae_plan_normalised, spread, mean_mae))
    return rows


def summarise(rows: list[CaseProbe]) -> dict[str, float]:
    """Mean of each variant's MAE and of the spread over the cases, and the two ratios the issue
    asks for: ``oracle / sampled`` (the latent carries the dose when small) and
    ``min(zero, shuffled) / sampled`` (the diffusion decides the prediction when large)."""
    out = {k: float(np.nanmean([r.mae[k] for r in rows])) for k in VARIANTS}
    for key in ("spread", "mean_of_samples"):
        vals = [getattr(r, key) for r in rows]
        out[key] = float(np.nanmean(vals)) if any(np.isfinite(v) for v in vals) else float("nan")
    out["oracle_over_sampled"] = out["oracle"] / out["sampled"]
    out["bypass_over_sampled"] = min(out["zero"], out["shuffled"]) / out["sampled"]
    if rows and all(r.mae_plan_normalised is not None for r in rows):  # the prediction as the model ships it
        norm = {k: float(np.nanmean([r.mae_plan_normalised[k] for r in rows])) for k in VARIANTS}
        out.update({f"{k}_plan_normalised": v for k, v in norm.items()})
        out["bypass_over_sampled_plan_normalised"] = min(norm["zero"], norm["shuffled"]) / norm["sampled"]
    return out
