"""Losses (hand-computed values), schedulers, VAE overfitting, diffusion loss and DDIM sampling."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from addiff_core import diffusion as D
from addiff_core.contract import OAR_NAMES, TARGET_STRUCT
from addiff_core.losses import constraint_hinge, kl_divergence, masked_l1
from addiff_core.models import build_model
from addiff_core.training import predict_normalised
from helpers.models import fake_batch, reinit_zero_params, tiny_cfg


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def test_kl_and_masked_l1():
    mu = torch.zeros(2, 4, 2, 2, 2)
    assert float(kl_divergence(mu, torch.zeros_like(mu))) == 0.0
    # KL per element of N(1, 1) vs N(0, 1) is 0.5
    assert math.isclose(float(kl_divergence(mu + 1, torch.zeros_like(mu))), 0.5, rel_tol=1e-6)
    assert kl_divergence(mu + 1, torch.zeros_like(mu), reduction="none").shape == (2,)

    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).reshape(1, 1, 4)
    target = torch.zeros_like(pred)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).reshape(1, 1, 4)
    assert float(masked_l1(pred, target, mask)) == 1.5
    assert float(masked_l1(pred, target, torch.zeros_like(mask))) == 0.0  # no NaN on empty mask
    empty = torch.zeros(0, 1, 4, requires_grad=True)  # empty Poisson batch
    for red in ("global", "sample"):
        v = masked_l1(empty, empty.detach(), torch.zeros(0, 1, 4), reduction=red)
        assert v.item() == 0.0 and v.requires_grad
    two = torch.cat([pred, pred * 0])
    m2 = torch.cat([mask, torch.ones_like(mask)])
    assert masked_l1(two, torch.zeros_like(two), m2, reduction="none").tolist() == [1.5, 0.0]
    assert float(masked_l1(two, torch.zeros_like(two), m2, reduction="sample")) == 0.75


def _hinge_batch(s: int = 8):
    """One sample, flat voxel ranges as structures, one row per constraint kind."""
    v = s ** 3
    dose = torch.zeros(v)
    oars = torch.zeros(len(OAR_NAMES), v)
    tp = torch.zeros(v)
    cord, parotid, lung = (OAR_NAMES.index(n) for n in ("SpinalCord", "LeftParotid", "LeftLung"))
    oars[cord, 0:100] = 1
    dose[0:100] = torch.arange(100) / 100.0             # top 2% (2 voxels): 0.99, 0.98
    oars[parotid, 100:200] = 1
    dose[100:150], dose[150:200] = 0.2, 0.6             # mean 0.4
    oars[lung, 200:300] = 1
    dose[200:250], dose[250:300] = 1.0, 0.0             # V(0.5) = 0.5
    tp[300:401] = 1
    dose[300:401] = torch.linspace(0.8, 1.0, 101)       # D95 = 5th percentile = 0.81
    cons = torch.zeros(1, 16, 6)
    struct = torch.zeros(1, 16, dtype=torch.long)
    rows = [(0, 0.5, 0.0, cord), (1, 0.3, 0.0, parotid), (2, 0.5, 0.2, lung), (3, 0.95, 0.95, TARGET_STRUCT),
            (0, 2.0, 0.0, cord),                        # satisfied: counts with 0
            (0, 0.0, 0.0, OAR_NAMES.index("Heart"))]    # structure absent: ignored
    for r, (k, thr, lim, st) in enumerate(rows):
        cons[0, r, k], cons[0, r, 4], cons[0, r, 5], struct[0, r] = 1.0, thr, lim, st
    present = torch.zeros(1, len(OAR_NAMES), dtype=torch.bool)
    present[0, [cord, parotid, lung]] = True
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, : len(rows)] = True
    batch = {"oars": oars.reshape(1, -1, s, s, s), "target_primary": tp.reshape(1, 1, s, s, s),
             "oar_present": present, "constraints": cons, "constraint_struct": struct, "constraint_mask": mask}
    return dose.reshape(1, 1, s, s, s), batch


def test_constraint_hinge_hand_computed():
    dose, batch = _hinge_batch()
    dose.requires_grad_(True)
    expected = ((0.985 - 0.5) ** 2 + (0.4 - 0.3) ** 2 + (0.5 - 0.2) ** 2 + (0.95 - 0.81) ** 2 + 0.0) / 5
    h = constraint_hinge(dose, batch)
    assert math.isclose(h.item(), expected, rel_tol=1e-4)
    h.backward()
    g = dose.grad.flatten()
    assert g[98] > 0 and g[99] > 0 and float(g[:98].abs().sum()) == 0  # Dmax: top-2 voxels only
    assert (g[100:200] > 0).all()  # Dmean pushes the whole parotid down
    assert g[305] < 0  # D95 pushes the 5th-percentile voxel of the target up

    # per-sample reduction and batch averaging with a sample that has nothing active
    d2 = torch.cat([dose.detach(), dose.detach()])
    b2 = {k: torch.cat([v, v]) for k, v in batch.items()}
    b2["constraint_mask"][1] = False
    per = constraint_hinge(d2, b2, reduction="none")
    assert per[1] == 0 and math.isclose(float(per[0]), expected, rel_tol=1e-4)
    assert math.isclose(float(constraint_hinge(d2, b2)), expected / 2, rel_tol=1e-4)


def test_constraint_hinge_zero_with_grad_when_nothing_active():
    dose, batch = _hinge_batch()
    dose.requires_grad_(True)
    batch["constraint_mask"][:] = False
    h = constraint_hinge(dose, batch)
    assert h.item() == 0.0 and h.requires_grad
    h.backward()
    assert float(dose.grad.abs().sum()) == 0.0
    empty = constraint_hinge(torch.zeros(0, 1, 8, 8, 8, requires_grad=True), {k: v[:0] for k, v in batch.items()})
    assert empty.item() == 0.0


# --------------------------------------------------------------------------------------------
# schedulers / latent scale
# --------------------------------------------------------------------------------------------
def test_schedulers():
    cfg = tiny_cfg()
    tr = D.make_train_scheduler(cfg)
    assert tr.num_train_timesteps == cfg.train_timesteps and not tr.clip_sample
    assert math.isclose(float(tr.betas[0]), cfg.beta_start, rel_tol=1e-5)
    assert math.isclose(float(tr.betas[-1]), cfg.beta_end, rel_tol=1e-5)
    s = D.make_sampler(cfg, 7)
    assert len(s.timesteps) == 7 and int(s.timesteps[0]) == cfg.train_timesteps - 1 and int(s.timesteps[-1]) == 0
    assert not s.clip_sample
    assert len(D.make_sampler(cfg).timesteps) == cfg.sample_steps


def test_calibrate_latent_scale():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    batches = [fake_batch(2, seed=0), fake_batch(2, seed=1)]
    scale = D.calibrate_latent_scale(model, batches)
    assert scale > 0 and float(model.diffusion.latent_scale) == pytest.approx(scale)
    with torch.no_grad():
        z = torch.cat([D.encode_dose(model, b["dose"]) for b in batches])
    assert z.std(unbiased=False).item() == pytest.approx(1.0, rel=0.05)
    assert D.calibrate_latent_scale(model, [fake_batch(2, seed=5)]) == scale  # kept once set
    b = batches[0]
    dec = D.decode_latent(model, D.encode_dose(model, b["dose"]), b)
    assert torch.allclose(dec, model.vae.decode(model.vae.encode(b["dose"])[0]), atol=1e-5)


# --------------------------------------------------------------------------------------------
# training signals
# --------------------------------------------------------------------------------------------
def test_vae_overfits_one_dose_volume():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    vae = build_model(cfg).vae  # residual latent, decoder reading its latent only
    batch = {k: v[:1] for k, v in fake_batch(1).items()}
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    first = None
    for step in range(60):
        loss, parts = D.vae_loss(vae, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = parts["l1"] if first is None else first
    vae.eval()
    with torch.no_grad():
        recon = vae(batch["dose"])[0]
        err = float(masked_l1(recon, batch["dose"], batch["body"]))  # the loss's region
        zero = float(masked_l1(vae.decode(torch.zeros_like(vae.encode(batch["dose"])[0])), batch["dose"],
                               batch["body"]))
    assert err < 0.02 and err < first / 2, (first, err)
    assert zero > 5 * err, (err, zero)  # the latent decides the dose: z = 0 decodes to no plan at all


def test_diffusion_loss_and_unet_loss():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.vae.parameters():
        p.requires_grad_(False)
    batch = fake_batch()
    g = torch.Generator().manual_seed(3)
    l1, p1 = D.diffusion_loss(model, batch, cfg, generator=g)
    l2, _ = D.diffusion_loss(model, batch, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(l1) and l1.item() == l2.item() and set(p1) == {"loss", "mse", "constraint", "dose_l1"}
    batch["has_dose"][:] = False  # no reference dose: contributes nothing
    assert D.diffusion_loss(model, batch, cfg, generator=g)[0].item() == 0.0

    ucfg = tiny_cfg("unet")
    unet = build_model(ucfg)
    loss, parts = D.unet_loss(unet, fake_batch(), ucfg)
    assert torch.isfinite(loss) and parts["constraint"] >= 0
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in unet.parameters())


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def test_sampler_is_deterministic_per_seed():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    reinit_zero_params(model)
    batch = fake_batch()
    a, sa = D.sample(model, batch, cfg, steps=4, seed=0)
    b, _ = D.sample(model, batch, cfg, steps=4, seed=0)
    c, _ = D.sample(model, batch, cfg, steps=4, seed=1)
    assert a.shape == (2, 1, 16, 16, 16) and sa is None
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert float(a.min()) >= 0
    m, s = D.sample(model, batch, cfg, steps=3, seed=0, num_samples=2)
    assert s is not None and s.shape == m.shape and float(s.max()) > 0
    pm, ps = predict_normalised(model, batch, cfg, steps=4, seed=0)
    assert torch.equal(pm, a) and ps is None


class _Oracle(nn.Module):
    """The optimal denoiser output for a point-mass data distribution at z0 (x0, eps or v,
    written out here from the definitions, not with the module's own conversion): DDIM must land
    exactly on z0."""

    def __init__(self, z0, alphas_cumprod, prediction_type):
        super().__init__()
        self.z0, self.ac, self.kind = z0, alphas_cumprod, prediction_type

    def forward(self, z_t, t, spatial, context):
        a = self.ac[t].reshape(-1, 1, 1, 1, 1)
        eps = (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()
        return {"x0": self.z0, "epsilon": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * self.z0}[self.kind]


@pytest.mark.parametrize("prediction_type", ["x0", "epsilon", "v"])
def test_ddim_recovers_the_oracle_latent(prediction_type):
    cfg = dataclasses.replace(tiny_cfg(), prediction_type=prediction_type)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.diffusion.latent_scale.fill_(2.0)
    z0 = torch.randn(2, cfg.latent_channels, 8, 8, 8)
    model.diffusion.denoiser = _Oracle(z0, D.make_train_scheduler(cfg).alphas_cumprod, prediction_type)
    batch = fake_batch()
    dose, _ = D.sample(model, batch, cfg, steps=6, seed=0)
    with torch.no_grad():
        ref = model.vae.decode(z0 / 2.0).clamp_min(0) * batch["body"]
    assert torch.allclose(dose, ref, atol=1e-4)
    assert float(dose[batch["body"].expand_as(dose) == 0].abs().max()) == 0.0  # zero outside the region


@pytest.mark.parametrize("prediction_type", ["x0", "epsilon", "v"])
def test_diffusion_loss_is_zero_for_the_oracle(prediction_type):
    """The training target matches the sampler's reading of each parametrisation."""
    cfg = dataclasses.replace(tiny_cfg(), prediction_type=prediction_type, constraint_weight=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.diffusion.latent_scale.fill_(1.0)
    batch = fake_batch()
    with torch.no_grad():
        z0 = D.encode_dose(model, batch["dose"])
    model.diffusion.denoiser = _Oracle(z0, D.make_train_scheduler(cfg).alphas_cumprod, prediction_type)
    loss, parts = D.diffusion_loss(model, batch, cfg, timesteps=torch.tensor([10, 700]),
                                   noise=torch.randn(z0.shape, generator=torch.Generator().manual_seed(2)))
    assert parts["mse"] < 1e-8


def test_noising_is_the_schedulers_own():
    # diffusion_loss noises with DDPMScheduler.add_noise: the closed form sqrt(a) z0 + sqrt(1 - a) eps, exactly
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 2, 3, 3, 3, generator=g), torch.randn(4, 2, 3, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, cfg.train_timesteps - 1])
    sched = D.make_train_scheduler(cfg)
    a = sched.alphas_cumprod[t].reshape(4, 1, 1, 1, 1)
    assert torch.equal(sched.add_noise(z0, noise, t), a.sqrt() * z0 + (1 - a).sqrt() * noise)

