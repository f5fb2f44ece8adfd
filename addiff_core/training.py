"""Local training and evaluation: the plain functions the command line and the federation call.

ADDiff-Dose trains in two stages (``train_vae_epoch``, then ``train_diffusion_epoch`` with the VAE
frozen), the baseline with ``train_unet_epoch``; the caller freezes what is outside the stage
(``set_trainable``) before building the stage's optimiser. ``evaluate`` scores held-out cases on
their CT grids in Gy.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import diffusion as diff
from .case_io import load_case
from .config import ModelConfig, TrainingConfig
from .data import SampleDataset
from .metrics import case_metrics
from .models import stage_prefix
from .plan_normalisation import plan_normalised
from .preprocessing import dose_to_ct_grid

log = logging.getLogger(__name__)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_loader(dataset: SampleDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A single-process loader whose shuffling is seeded by ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def set_trainable(model: nn.Module, stage: str) -> None:
    """Only the parameters of ``stage`` require gradients; everything else is frozen."""
    prefix = stage_prefix(stage)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainingConfig, epoch: int, total_epochs: int) -> float:
    """Learning rate for ``epoch`` (0-based) of ``total_epochs``: constant or cosine to 10%."""
    if cfg.lr_schedule == "constant" or total_epochs <= 1:
        return cfg.lr
    frac = min(max(epoch / (total_epochs - 1), 0.0), 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Proximal:
    """FedProx term mu/2 * ||w - w_global||^2 over the trained stage's parameters."""

    mu: float
    reference: dict[str, torch.Tensor]

    @classmethod
    def from_module(cls, mu: float, module: nn.Module) -> "Proximal":
        return cls(mu, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})

    def __call__(self, module: nn.Module) -> torch.Tensor:
        terms = [((p - self.reference[n]) ** 2).sum() for n, p in module.named_parameters() if n in self.reference]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else torch.zeros(())


def _check_finite(loss: torch.Tensor, desc: str) -> None:
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"{desc}: loss is not finite ({float(loss.detach())}); lower the learning rate")


def _accumulate(totals: dict[str, float], loss: torch.Tensor, parts: dict) -> None:
    totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
    for k, v in parts.items():
        if k != "loss":  # the total (with any proximal term) is counted above
            totals[k] = totals.get(k, 0.0) + float(v)


def _backward(loss_fn: Callable[[dict], tuple[torch.Tensor, dict]], module: nn.Module,
              optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float, prox: Proximal | None,
              per_sample_grads: bool) -> tuple[torch.Tensor, dict]:
    """Gradients of one batch for ``optimizer.step()``; returns (loss, loss parts).

    ``per_sample_grads`` (DP, microbatch mode): ``grad_sample`` per parameter by one backward pass
    per sample; the DP optimizer clips, sums and noises them. A proximal term is not part of the
    per-sample gradients (as in Opacus' own modes)."""
    if per_sample_grads:
        from .privacy import per_sample_backward

        return per_sample_backward(loss_fn, [p for g in optimizer.param_groups for p in g["params"]], batch)
    loss, parts = loss_fn(batch)
    if prox is not None and prox.mu > 0:
        p_term = prox(module)
        loss = loss + p_term
        parts = {**parts, "prox": float(p_term.detach())}
    loss.backward()
    if grad_clip > 0 and not hasattr(optimizer, "noise_multiplier"):  # DP optimizers clip per sample
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], grad_clip)
    return loss, parts


def _run_epoch(loss_fn: Callable[[dict], tuple[torch.Tensor, dict]], module: nn.Module, loader: DataLoader,
               optimizer: torch.optim.Optimizer, device: torch.device, grad_clip: float,
               prox: Proximal | None, desc: str, progress: bool, per_sample_grads: bool = False) -> dict[str, float]:
    """One epoch; ``per_sample_grads`` (DP, microbatch mode): per-sample gradients for the DP
    optimizer by one backward pass per sample (``privacy.per_sample_backward``)."""
    totals: dict[str, float] = {}
    n_batches = 0
    n_empty = 0
    n_samples = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        batch = to_device(batch, device)
        if batch["dose"].shape[0] == 0:  # an empty Poisson batch (DP): still a noisy step
            if hasattr(optimizer, "noise_multiplier"):
                optimizer.zero_grad(set_to_none=True)
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                optimizer.step()
                n_empty += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss, parts = _backward(loss_fn, module, optimizer, batch, grad_clip, prox, per_sample_grads)
        optimizer.step()
        _check_finite(loss, desc)
        n_batches += 1
        n_samples += int(batch["dose"].shape[0])
        _accumulate(totals, loss, parts)
        bar.set_postfix(loss=f"{totals['loss'] / n_batches:.4f}")
    out = {k: v / max(n_batches, 1) for k, v in totals.items()}
    out["steps"] = float(n_batches + n_empty)
    out["samples"] = float(n_samples)
    out["seconds"] = time.perf_counter() - t0
    return out


def train_vae_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: ModelConfig,
                    device: torch.device, *, grad_clip: float = 1.0, prox: Proximal | None = None,
                    desc: str = "vae", progress: bool = True, per_sample_grads: bool = False) -> dict[str, float]:
    """One epoch of stage 1 (L1 reconstruction + beta KL); the caller has run :func:`set_trainable`.

    Args:
        model: the ADDiff model (its ``vae`` trains); loader: training batches.
        optimizer: over the stage's parameters; cfg: the model config; device: where to train.
        grad_clip: max gradient norm; prox: FedProx term, or None.
        desc, progress: the progress bar; per_sample_grads: DP microbatch mode (privacy.py).

    Returns:
        mean loss parts per batch, ``steps``, ``samples`` and ``seconds``.
    """
    vae = model.vae
    model.train()
    return _run_epoch(lambda b: diff.vae_loss(vae, b, cfg), vae, loader, optimizer, device, grad_clip, prox,
                      desc, progress, per_sample_grads)


def train_diffusion_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: ModelConfig,
                          device: torch.device, *, generator: torch.Generator | None = None, grad_clip: float = 1.0,
                          prox: Proximal | None = None, desc: str = "diffusion", progress: bool = True,
                          per_sample_grads: bool = False) -> dict[str, float]:
    """One epoch of stage 2 (``diffusion.diffusion_loss``), the VAE frozen; calibrates the latent
    scale first if unset. Arguments and result as :func:`train_vae_epoch`'s, plus ``generator``
    (timesteps and noise)."""
    model.train()
    model.vae.eval()
    if float(model.diffusion.latent_scale) == 0.0:
        with torch.no_grad():
            diff.calibrate_latent_scale(model, (to_device(b, device) for b in loader))
    return _run_epoch(lambda b: diff.diffusion_loss(model, b, cfg, generator=generator), model.diffusion, loader,
                      optimizer, device, grad_clip, prox, desc, progress, per_sample_grads)


def train_unet_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: ModelConfig,
                     device: torch.device, *, grad_clip: float = 1.0, prox: Proximal | None = None,
                     desc: str = "unet", progress: bool = True, per_sample_grads: bool = False) -> dict[str, float]:
    """One epoch of the U-Net baseline; arguments and result as :func:`train_vae_epoch`'s."""
    model.train()
    return _run_epoch(lambda b: diff.unet_loss(model, b, cfg), model.unet, loader, optimizer, device, grad_clip,
                      prox, desc, progress, per_sample_grads)


def train_stage_epoch(stage: str, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                      cfg: ModelConfig, device: torch.device, **kw) -> dict[str, float]:
    """The epoch function of ``stage`` ("vae", "diffusion", "unet") with these arguments."""
    fn = {"vae": train_vae_epoch, "diffusion": train_diffusion_epoch, "unet": train_unet_epoch}[stage]
    if stage != "diffusion":
        kw.pop("generator", None)
    return fn(model, loader, optimizer, cfg, device, **kw)


@torch.no_grad()
def predict_normalised(model: nn.Module, batch: dict[str, torch.Tensor], cfg: ModelConfig, *, steps: int | None = None,
                       seed: int = 0, num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one prediction every command uses: (normalised dose (N,1,S,S,S) >= 0, x rx = Gy, zero
    outside ``body``; the voxel-wise std over ``num_samples`` of the diffusion model, else None),
    each sample scaled by ``cfg.plan_normalisation`` (:mod:`plan_normalisation`).
    ``steps``, ``seed``: as :func:`diffusion.sample`'s."""
    model.eval()
    m = diff.unwrap(model)
    if hasattr(m, "diffusion"):  # each sample normalised on its own: the std is over normalised plans
        stack = diff.sample_doses(m, batch, cfg, steps=steps, seed=seed, num_samples=num_samples)
        return diff.mean_and_std(torch.stack([plan_normalised(s, batch, cfg.plan_normalisation) for s in stack]))
    region = batch["body"].float() if "body" in batch else 1.0
    return plan_normalised(m(batch).clamp_min(0) * region, batch, cfg.plan_normalisation), None


def evaluate(model: nn.Module, dataset: SampleDataset, cfg: ModelConfig, device: torch.device, *, seed: int = 0,
             steps: int | None = None, gamma: bool = True, progress: bool = True) -> dict:
    """Metrics of ``model`` on every case of ``dataset``, each on its own CT grid in Gy, the
    prediction zeroed outside ``regions.evaluation_region`` as OpenKBP masks it.

    Args:
        model, dataset, cfg, device: what to score, on which cases, with which config, where.
        seed: case i is sampled with ``seed + i``; steps: DDIM steps (None: cfg.sample_steps).
        gamma: False skips the gamma pass rate; progress: show a progress bar.

    Returns:
        ``{"num_cases", "mean": metrics.cohort_means(cases), "cases": [{"case_id", metric: value}]}``.

    Raises:
        FloatingPointError: the model's output for a case is not finite.
    """
    from SimpleITK import GetArrayFromImage

    from .gdp_hmm.metric import case_challenge_metrics
    from .metrics import cohort_means
    from .regions import evaluation_region, zero_outside

    model.eval()
    rows = []
    for i in tqdm(range(len(dataset)), desc="evaluate", leave=False, disable=not progress):
        sample = dataset[i]
        batch = to_device({k: v[None] for k, v in sample.items()}, device)
        pred, _ = predict_normalised(model, batch, cfg, steps=steps, seed=seed + i)
        if not bool(torch.isfinite(pred).all()):
            raise FloatingPointError(f"the model's output for held-out case {i + 1} of {len(dataset)} is not finite "
                                     "(NaN/inf): the weights or the case's inputs hold extreme values")
        case = load_case(dataset.case_dirs[i], require_dose=True)
        region = evaluation_region(case)
        pred_img = zero_outside(dose_to_ct_grid(pred[0, 0], float(sample["rx"]), dataset.specs[i], case.ct), region)
        pred_gy = GetArrayFromImage(pred_img).astype(np.float32)
        ref_gy = case.array("dose")
        masks = {name: case.array(name) for name in case.masks}
        eval_mask = GetArrayFromImage(region) > 0
        m = case_metrics(pred_gy, ref_gy, masks, case.plan, case.ct.GetSpacing(), eval_mask, gamma=gamma)
        m.update(case_challenge_metrics(case, pred_gy))  # GDP-HMM's leaderboard MAE; {} for other cases
        rows.append({"case_id": dataset.case_ids[i], **{k: float(v) for k, v in m.items()}})
    mean = cohort_means(rows)
    return {"num_cases": len(rows), "mean": mean, "cases": rows}
