"""Model shapes, state-dict prefixes, token masking and Opacus compatibility (tiny configs, CPU)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from addiff_core.models import (ADDiffDose, ConditionEncoder, DoseRegressor, LatentDenoiser, build_model,
                                count_parameters, stage_prefix)
from addiff_core import diffusion as D
from addiff_core.models.conditioning import condition_volume
from helpers.models import fake_batch, reinit_zero_params, tiny_cfg


# --------------------------------------------------------------------------------------------
def test_shapes_and_state_dict_prefixes():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ADDiffDose)
    assert [n for n, _ in model.named_children()] == ["vae", "diffusion"]
    batch = fake_batch()
    assert not model.vae.uses_anatomy  # the default decoder reads its latent only (issue #24)
    assert not any(k.startswith("vae.anatomy.") for k in model.state_dict())
    recon, mu, logvar = model.vae(batch["dose"])
    L = cfg.latent_size
    assert recon.shape == (2, 1, 16, 16, 16)
    assert mu.shape == logvar.shape == (2, cfg.latent_channels, L, L, L)
    assert model.vae.decode(mu).shape == (2, 1, 16, 16, 16)
    # an anatomy-aware decoder (planning volume or CT) is still there for the ablation
    for mode, channels in (("planning", condition_volume(batch).shape[1]), ("ct", 1)):
        aware = build_model(dataclasses.replace(cfg, decoder_anatomy=mode)).vae
        assert aware.uses_anatomy and any(k.startswith("anatomy.") for k in aware.state_dict())
        anatomy = D._anatomy(aware, batch)
        assert anatomy.shape[1] == channels and aware.decode(mu, anatomy).shape == (2, 1, 16, 16, 16)
        with pytest.raises(ValueError, match="anatomy"):
            aware.decode(mu)
    spatial, context = model.diffusion.cond(batch)
    assert spatial.shape == (2, cfg.cond_channels, L, L, L)
    assert context.shape == (2, model.diffusion.cond.num_context_tokens, cfg.context_dim)
    eps = model.diffusion.denoiser(mu, torch.tensor([1, 500]), spatial, context)
    assert eps.shape == mu.shape
    keys = list(model.state_dict())
    assert keys and all(k.startswith(("vae.", "diffusion.")) for k in keys)
    assert "diffusion.latent_scale" in keys and float(model.diffusion.latent_scale) == 0.0
    assert not any("alphas" in k or "betas" in k for k in keys)  # no scheduler state
    assert count_parameters(model) == count_parameters(model.vae) + count_parameters(model.diffusion)

    unet = build_model(tiny_cfg("unet"))
    assert isinstance(unet, DoseRegressor)
    assert all(k.startswith("unet.") for k in unet.state_dict())
    assert unet(batch).shape == (2, 1, 16, 16, 16)
    # grid not a multiple of 16: padded inside, cropped back
    assert build_model(tiny_cfg("unet", size=12))(fake_batch(1, 12)).shape == (1, 1, 12, 12, 12)

    assert stage_prefix("vae") == "vae." and stage_prefix("diffusion") == "diffusion."
    assert stage_prefix("unet") == "unet."
    with pytest.raises(ValueError):
        stage_prefix("gan")


def test_no_opacus_unfriendly_layers():
    for kind in ("diffusion", "unet"):
        for mod in build_model(tiny_cfg(kind)).modules():
            assert not isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.MultiheadAttention,
                                        nn.modules.conv._ConvTransposeNd)), type(mod)


def test_module_validator_has_no_errors():
    from opacus.validators import ModuleValidator

    for kind in ("diffusion", "unet"):
        assert ModuleValidator.validate(build_model(tiny_cfg(kind)), strict=False) == []


def test_masked_tokens_do_not_change_output():
    torch.manual_seed(0)
    cond = ConditionEncoder(tiny_cfg()).eval()
    batch = fake_batch()
    spatial, context = cond(batch)
    other = {k: v.clone() for k, v in batch.items()}
    pad_b = ~other["beam_mask"]
    other["beams"][pad_b] = torch.randn(int(pad_b.sum()), 6) * 100
    other["beams"][0, -1] = float("nan")
    pad_c = ~other["constraint_mask"]
    other["constraints"][pad_c] = torch.randn(int(pad_c.sum()), 6) * 100
    other["constraint_struct"][pad_c] = 7
    spatial2, context2 = cond(other)
    assert torch.equal(spatial, spatial2)
    assert torch.allclose(context, context2, atol=1e-6, rtol=0)
    # real rows do matter
    other["beams"][0, 0] += 1.0
    assert not torch.allclose(cond(other)[1][0], context[0])


def test_no_valid_beams_or_constraints_is_finite():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    batch = fake_batch(n_beams=0, constraints=False)
    batch["beam_mask"][1, :3] = True  # mixed: one sample with beams, one without
    spatial, context = model.diffusion.cond(batch)
    assert torch.isfinite(context).all() and torch.isfinite(spatial).all()
    loss, parts = D.diffusion_loss(model, batch, tiny_cfg(), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and parts["constraint"] == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradients_reach_every_parameter_of_the_trained_stage():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    reinit_zero_params(model.diffusion)
    for p in model.vae.parameters():
        p.requires_grad_(False)
    batch = fake_batch()
    # small t so the alpha_bar-weighted constraint term is active too
    loss, parts = D.diffusion_loss(model, batch, cfg, timesteps=torch.tensor([3, 10]),
                                   noise=torch.randn(2, cfg.latent_channels, 8, 8, 8))
    assert parts["constraint"] > 0
    loss.backward()
    for name, p in model.diffusion.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in model.vae.parameters())

    # VAE stage: every VAE parameter gets a gradient (the residual VAE starts its output conv at 0)
    vae = build_model(cfg).vae
    reinit_zero_params(vae)
    loss, _ = D.vae_loss(vae, batch, cfg)
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def _check_per_sample(gsm_params, single_grads, n):
    for name, p in gsm_params:
        assert p.grad_sample is not None and p.grad_sample.shape[0] == n, name
    for i in range(n):
        for (name, p), g in zip(gsm_params, single_grads[i]):
            # loss_reduction="mean": grad_sample[i] is the gradient of sample i's own loss
            assert torch.allclose(p.grad_sample[i], g, atol=1e-5, rtol=1e-3), name


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_gradients_diffusion_stage():
    from opacus import GradSampleModule

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    reinit_zero_params(model.diffusion)
    for p in model.vae.parameters():
        p.requires_grad_(False)
    batch = fake_batch()
    t = torch.tensor([5, 400])
    noise = torch.randn(2, cfg.latent_channels, 8, 8, 8, generator=torch.Generator().manual_seed(1))

    singles = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        sub = {k: v[i:i + 1] for k, v in batch.items()}
        loss, _ = D.diffusion_loss(model, sub, cfg, timesteps=t[i:i + 1], noise=noise[i:i + 1])
        loss.backward()
        singles.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)

    gsm = GradSampleModule(model, loss_reduction="mean")
    loss, _ = D.diffusion_loss(gsm, batch, cfg, timesteps=t, noise=noise)
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("diffusion.") for n, _ in params)
    _check_per_sample(params, singles, 2)
    assert all(getattr(p, "grad_sample", None) is None for p in model.vae.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_gradients_vae(monkeypatch):
    from opacus import GradSampleModule

    cfg = tiny_cfg()  # no latent dropout (it draws one number per case): batched and single losses compare
    torch.manual_seed(0)
    # Opacus only records activations in train mode; make the reparameterisation noise zero so
    # the batched and single-sample losses are comparable.
    vae = build_model(cfg).vae.train()
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.zeros_like(x))
    batch = fake_batch()
    singles = []
    for i in range(2):
        vae.zero_grad(set_to_none=True)
        loss, _ = D.vae_loss(vae, {k: v[i:i + 1] for k, v in batch.items()}, cfg)
        loss.backward()
        singles.append([p.grad.clone() for p in vae.parameters()])
    vae.zero_grad(set_to_none=True)
    gsm = GradSampleModule(vae, loss_reduction="mean")
    loss, _ = D.vae_loss(gsm, batch, cfg)
    loss.backward()
    _check_per_sample(list(vae.named_parameters()), singles, 2)


def test_denoiser_attention_is_linear_based():
    den = LatentDenoiser(tiny_cfg())
    names = {type(m).__name__ for m in den.modules()}
    assert "CrossAttentionBlock" in names
    for m in den.modules():
        if hasattr(m, "use_flash_attention"):
            assert not m.use_flash_attention
    assert not any(getattr(m, "use_checkpoint", False) for m in den.modules())


def test_batch1_conv_patch_gives_the_convolutions_own_result_and_gradients():
    """models.cpu_conv: a batch-1 3D conv that PyTorch would send to its im2col kernel runs as a
    batch of 2 on oneDNN; output and gradients equal the plain convolution's (float rounding),
    the layer stays an nn.Conv3d with the same state dict, and the patch really takes the other path."""
    from torch import nn

    from addiff_core.models.cpu_conv import _uses_slow3d, fast_batch1_convs

    torch.manual_seed(0)
    plain = nn.Conv3d(16, 16, 3, padding=1)
    fast = fast_batch1_convs(nn.Sequential(nn.Conv3d(16, 16, 3, padding=1)))[0]
    fast.load_state_dict(plain.state_dict())
    assert type(fast) is nn.Conv3d and set(fast.state_dict()) == set(plain.state_dict())
    x = torch.randn(1, 16, 16, 16, 16)
    assert _uses_slow3d(fast, x) and not _uses_slow3d(fast, x.expand(2, *x.shape[1:]))
    outs = []
    for m in (plain, fast):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(0, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad))
        assert y.shape == (1, 16, 16, 16, 16)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # summation order differs
    small = torch.randn(1, 16, 4, 4, 4)  # below the measured break-even: left to im2col
    assert not _uses_slow3d(fast, small)


def test_built_models_have_every_conv3d_patched():
    from torch import nn

    for kind in ("diffusion", "unet"):
        model = build_model(dataclasses.replace(tiny_cfg(), kind=kind))
        convs = [m for m in model.modules() if type(m) is nn.Conv3d]
        assert convs and all("_conv_forward" in m.__dict__ for m in convs)
