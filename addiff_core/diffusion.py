"""Schedulers, stage losses and DDIM sampling for ADDiff-Dose (and the U-Net baseline loss).

Schedulers are made on demand (never buffers of a state_dict that travels), with
``clip_sample=False`` (MONAI's default clamps x0 to [-1, 1], cutting unit-variance latents).
MONAI 1.6's DDIM ``set_timesteps`` (``linspace(...).round()``) and ``step`` (``t - T // n``) disagree
on the previous timestep, so ``sample`` does the eta=0 update itself with the true next timestep.
Every function accepts the bare model or an Opacus ``GradSampleModule`` around it.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from .config import ModelConfig
from .losses import constraint_hinge, kl_divergence, masked_l1
from .models.conditioning import decoder_anatomy_volume


# -- helpers ---------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The bare model behind an Opacus GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


def _device(model: nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def _has_dose(batch: dict, n: int, like: torch.Tensor) -> torch.Tensor:
    h = batch.get("has_dose")
    if h is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    return h.reshape(n).to(device=like.device, dtype=like.dtype)


def _batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
    return per_sample.sum() / max(per_sample.shape[0], 1)


def _latent_scale(model: nn.Module) -> torch.Tensor:
    """diffusion.latent_scale, or 1.0 while it is 0 (not calibrated)."""
    s = unwrap(model).diffusion.latent_scale
    return torch.where(s > 0, s, torch.ones_like(s))


# -- schedulers ------------------------------------------------------------------------------------
def make_train_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, schedule="linear_beta",
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=False)


def make_sampler(cfg: ModelConfig, steps: int | None = None) -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=cfg.train_timesteps, schedule="linear_beta",
                          beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=False,
                          set_alpha_to_one=True)
    sched.set_timesteps(int(steps or cfg.sample_steps))
    return sched


# -- VAE stage -------------------------------------------------------------------------------------
def _anatomy(vae: nn.Module, batch: dict) -> torch.Tensor | None:
    """What the VAE decoder reads besides its latent (None for a decoder without anatomy)."""
    return decoder_anatomy_volume(batch, unwrap(vae).anatomy_mode)


def vae_loss(vae: nn.Module, batch: dict, cfg: ModelConfig) -> tuple[torch.Tensor, dict]:
    """L1(recon, dose) over the evaluation region (``body``; every voxel when
    cfg.vae_loss_region is "grid") + cfg.kl_weight * KL. Per-sample terms, samples without dose
    count 0, sum / max(N, 1)."""
    dose = batch["dose"]
    recon, mu, logvar = vae(dose, _anatomy(vae, batch))
    n = dose.shape[0]
    region = batch["body"] if cfg.vae_loss_region == "body" and "body" in batch else torch.ones_like(dose)
    l1 = masked_l1(recon, dose, region, reduction="none")
    kl = kl_divergence(mu, logvar, reduction="none")
    has = _has_dose(batch, n, l1)
    loss = _batch_mean(has * (l1 + cfg.kl_weight * kl))
    parts = {"loss": float(loss.detach()), "l1": float(_batch_mean(has * l1).detach()),
             "kl": float(_batch_mean(has * kl).detach())}
    return loss, parts


# -- latent space ----------------------------------------------------------------------------------
def encode_dose(model: nn.Module, dose: torch.Tensor) -> torch.Tensor:
    """Scaled latent: VAE mu * diffusion.latent_scale (scale 1 while uncalibrated)."""
    m = unwrap(model)
    mu, _ = m.vae.encode(dose)
    return mu * _latent_scale(m)


def decode_latent(model: nn.Module, z: torch.Tensor, batch: dict) -> torch.Tensor:
    """Normalised dose from a scaled latent (inverse of encode_dose's scaling); the decoder reads
    the batch's planning volume when it is anatomy-aware."""
    m = unwrap(model)
    return m.vae.decode(z / _latent_scale(m), _anatomy(m.vae, batch))


def decoded_dose(model: nn.Module, z: torch.Tensor, batch: dict) -> torch.Tensor:
    """:func:`decode_latent` as a dose the way every prediction gives it: >= 0 and zero outside
    the batch's ``body`` (the evaluation region) when it has one."""
    dose = decode_latent(model, z, batch).clamp_min(0)
    return dose * batch["body"].to(dose) if "body" in batch else dose


def split_prediction(out: torch.Tensor, z_t: torch.Tensor, a: torch.Tensor, prediction_type: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) estimates from the denoiser output ``out`` at noise level alpha_bar ``a``:
    x0: out is x0; epsilon: out is the noise; v: out = sqrt(a) eps - sqrt(1 - a) x0."""
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "x0":
        return out, (z_t - sa * out) / sb
    if prediction_type == "epsilon":
        return (z_t - sb * out) / sa, out
    if prediction_type == "v":
        return sa * z_t - sb * out, sb * z_t + sa * out
    raise ValueError(f"unknown prediction_type {prediction_type!r} (expected x0, v or epsilon)")


def prediction_target(z0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the denoiser is trained to output for clean latent ``z0`` and ``noise``."""
    if prediction_type == "x0":
        return z0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v":
        return a.sqrt() * noise - (1 - a).sqrt() * z0
    raise ValueError(f"unknown prediction_type {prediction_type!r} (expected x0, v or epsilon)")


@torch.no_grad()
def calibrate_latent_scale(model: nn.Module, batches: Iterable[dict], force: bool = False) -> float:
    """Set diffusion.latent_scale = 1 / std(mu) over the dose cases of ``batches`` if it is 0
    (or ``force``). Returns the scale in use. Leaves it at 0 when no batch has a dose."""
    m = unwrap(model)
    buf = m.diffusion.latent_scale
    if float(buf) > 0 and not force:
        return float(buf)
    dev = _device(m)
    was_training = m.vae.training
    m.vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    for batch in batches:
        dose = batch["dose"].to(dev)
        keep = _has_dose(batch, dose.shape[0], dose) > 0
        if not bool(keep.any()):
            continue
        mu, _ = m.vae.encode(dose[keep])
        mu = mu.double()
        total += float(mu.sum())
        total_sq += float((mu * mu).sum())
        count += mu.numel()
    m.vae.train(was_training)
    if count == 0:
        return float(buf)
    mean = total / count
    std = max((total_sq / count - mean * mean), 0.0) ** 0.5
    buf.fill_(1.0 / max(std, 1e-6))
    return float(buf)


# -- diffusion stage -------------------------------------------------------------------------------
def draw_timesteps(cfg: ModelConfig, n: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps: t = (T - 1) u^(1 / cfg.timestep_bias), u uniform (t / (T - 1) ~ Beta(bias, 1);
    bias > 1 draws more at high noise, where the few-step sampler decides)."""
    if cfg.timestep_bias == 1.0:
        return torch.randint(0, cfg.train_timesteps, (n,), generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device)
    return ((cfg.train_timesteps - 1) * u.pow(1.0 / cfg.timestep_bias)).round().long()


def diffusion_loss(model: nn.Module, batch: dict, cfg: ModelConfig,
                   generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Diffusion-stage loss: MSE to the cfg.prediction_type target + w_t * (dose_l1_weight * L1 +
    constraint_weight * hinge) of the decoded x0 estimate, per sample, sum / max(N, 1).

    The x0 estimate is decoded *with* autograd so these gradients reach the denoiser (the caller
    freezes the VAE); w_t = alpha_bar_t for epsilon prediction cancels its 1/alpha_bar_t blow-up.

    Args:
        model: the ADDiff model (or its Opacus wrapper); batch: a collated batch.
        cfg: the model config; generator: draws ``timesteps`` and ``noise`` when not given.
        timesteps: (N,) long; noise: latent-shaped (tests, fixed evaluation).

    Returns:
        (loss, {"loss", "mse", "constraint", "dose_l1"} as floats).
    """
    m = unwrap(model)
    dose = batch["dose"]
    dev, n = dose.device, dose.shape[0]
    with torch.no_grad():
        z0 = encode_dose(m, dose)
    sched = make_train_scheduler(cfg)
    gdev = generator.device if generator is not None else dev
    if timesteps is None:
        t = draw_timesteps(cfg, n, generator, gdev).to(dev)
    else:
        t = timesteps.to(dev).long().reshape(n)
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, device=gdev, dtype=z0.dtype).to(dev)
    else:
        noise = noise.to(device=dev, dtype=z0.dtype)
    z_t = sched.add_noise(z0, noise, t)  # sqrt(a) z0 + sqrt(1 - a) noise
    a = sched.alphas_cumprod.to(device=dev, dtype=z0.dtype)[t].reshape(n, *([1] * (z0.ndim - 1)))

    spatial, context = m.diffusion.cond(batch)
    out = m.diffusion.denoiser(z_t, t, spatial, context)
    target = prediction_target(z0, noise, a, cfg.prediction_type)
    mse = (out - target).pow(2).flatten(1).mean(1)
    has = _has_dose(batch, n, mse)

    per = mse
    hinge, l1 = torch.zeros_like(mse), torch.zeros_like(mse)
    if cfg.constraint_weight > 0 or cfg.dose_l1_weight > 0:
        x0, _ = split_prediction(out, z_t, a, cfg.prediction_type)
        dose_hat = decode_latent(m, x0, batch)
        w = a.reshape(n) if cfg.prediction_type == "epsilon" else torch.ones_like(mse)
        if cfg.constraint_weight > 0:
            hinge = constraint_hinge(dose_hat, batch, reduction="none")
        if cfg.dose_l1_weight > 0:
            l1 = masked_l1(dose_hat, dose, batch.get("body", torch.ones_like(dose)), reduction="none")
        per = mse + w * (cfg.constraint_weight * hinge + cfg.dose_l1_weight * l1)
    loss = _batch_mean(has * per)
    parts = {"loss": float(loss.detach()), "mse": float(_batch_mean(has * mse).detach()),
             "constraint": float(_batch_mean(has * hinge).detach()), "dose_l1": float(_batch_mean(has * l1).detach())}
    return loss, parts


def _make_generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        g = torch.Generator(device=device)
    except RuntimeError:
        g = torch.Generator()
    return g.manual_seed(int(seed))


@torch.no_grad()
def sample(model: nn.Module, batch: dict, cfg: ModelConfig, steps: int | None = None, seed: int = 0,
           num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DDIM (eta=0) sampling, deterministic per ``seed``: (mean normalised dose (N,1,S,S,S) >= 0,
    the per-voxel std over ``num_samples`` or None), zero outside ``body`` (:func:`sample_doses`,
    same arguments; ``steps`` None: cfg.sample_steps)."""
    return mean_and_std(sample_doses(model, batch, cfg, steps=steps, seed=seed, num_samples=num_samples))


def mean_and_std(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, voxel-wise std (population) or None for a single sample) over dim 0 of a stack of
    samples (:func:`sample_doses`)."""
    return stack.mean(0), (stack.std(0, unbiased=False) if stack.shape[0] > 1 else None)


@torch.no_grad()
def sample_doses(model: nn.Module, batch: dict, cfg: ModelConfig, steps: int | None = None, seed: int = 0,
                 num_samples: int = 1) -> torch.Tensor:
    """Every sample of :func:`sample`, stacked: (max(1, num_samples), N, 1, S, S, S), clamped
    >= 0 and zero outside ``body``; sample i is the same for any ``num_samples`` > i."""
    m = unwrap(model)
    dev = _device(m)
    sched = make_sampler(cfg, steps)
    ac = sched.alphas_cumprod.to(dev, torch.float32)
    ts = [int(t) for t in sched.timesteps]
    spatial, context = m.diffusion.cond(batch)
    n = spatial.shape[0]
    shape = (n, cfg.latent_channels, *spatial.shape[2:])
    gen = _make_generator(dev, seed)

    doses = []
    for _ in range(max(1, int(num_samples))):
        z = torch.randn(shape, generator=gen, device=gen.device).to(dev)
        for i, t in enumerate(ts):
            out = m.diffusion.denoiser(z, torch.full((n,), t, device=dev, dtype=torch.long), spatial, context)
            x0, eps = split_prediction(out, z, ac[t], cfg.prediction_type)
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=dev)
            z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        doses.append(decoded_dose(m, z, batch))
    return torch.stack(doses)


# -- U-Net baseline (one prediction for either kind: training.predict_normalised) ------------------
def unet_loss(model: nn.Module, batch: dict, cfg: ModelConfig | None = None) -> tuple[torch.Tensor, dict]:
    """Masked L1 over ``body`` (per sample) + cfg.unet_constraint_weight * constraint hinge."""
    cw = (cfg or ModelConfig()).unet_constraint_weight
    pred = model(batch)
    n = pred.shape[0]
    l1 = masked_l1(pred, batch["dose"], batch["body"], reduction="none")
    hinge = constraint_hinge(pred, batch, reduction="none") if cw > 0 else torch.zeros_like(l1)
    has = _has_dose(batch, n, l1)
    loss = _batch_mean(has * (l1 + cw * hinge))
    parts = {"loss": float(loss.detach()), "l1": float(_batch_mean(has * l1).detach()),
             "constraint": float(_batch_mean(has * hinge).detach())}
    return loss, parts
