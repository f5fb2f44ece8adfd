"""Plan normalisation (ICRU 83's D50% = prescription): the pure function, its config key, and the
one prediction path every command uses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from addiff_core.config import ConfigError, model_config_from_dict
from addiff_core.models import build_model
from addiff_core.plan_normalisation import SCALE_BOUNDS, normalise_to_prescription
from addiff_core.training import predict_normalised
from helpers.models import fake_batch, tiny_cfg


def _target_medians(dose: torch.Tensor, target: torch.Tensor) -> list[float]:
    return [float(d[m > 0.5].median()) for d, m in zip(dose, target)]


def test_target_median_becomes_the_prescription():
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(3, 1, 8, 8, 8)
    target[:, :, 2:6, 2:6, 2:6] = 1
    dose = 0.7 + 0.5 * torch.rand(3, 1, 8, 8, 8, generator=g)  # target medians ~0.95, none at 1
    out = normalise_to_prescription(dose, target, "target_median")
    assert _target_medians(out, target) == pytest.approx([1.0] * 3, abs=1e-6)
    ratio = out / dose  # one scale per case: the shape of the dose is kept
    for r in ratio:
        assert float(r.max() - r.min()) < 1e-5
    assert normalise_to_prescription(dose, target, "none") is dose


def test_cases_without_a_usable_target_are_left_alone_and_the_scale_is_bounded():
    target = torch.zeros(3, 1, 4, 4, 4)
    target[1:, :, 1:3, 1:3, 1:3] = 1
    dose = torch.ones(3, 1, 4, 4, 4)
    dose[1] *= 0.1   # a target median of 0.1: scaled by the upper bound, not x10
    dose[2] *= 0.0   # nothing in the target: unscaled, no division by zero
    out = normalise_to_prescription(dose, target, "target_median")
    assert torch.equal(out[0], dose[0])  # no target voxels
    assert float(out[1].max()) == pytest.approx(0.1 * SCALE_BOUNDS[1])
    assert torch.equal(out[2], dose[2])
    hot = normalise_to_prescription(torch.full((1, 1, 4, 4, 4), 5.0), target[1:2], "target_median")
    assert float(hot.max()) == pytest.approx(5.0 * SCALE_BOUNDS[0])


def test_bad_mode_and_shape_are_refused():
    d = torch.ones(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="plan normalisation 'd95'"):
        normalise_to_prescription(d, d, "d95")
    with pytest.raises(ValueError, match="shape"):
        normalise_to_prescription(d, torch.ones(1, 1, 4, 4, 2), "target_median")


def test_config_key_is_read_and_checked():
    assert model_config_from_dict({}, "m.yaml").plan_normalisation == "none"
    assert model_config_from_dict({"plan_normalisation": "target_median"}, "m.yaml").plan_normalisation == "target_median"
    with pytest.raises(ConfigError, match=r"m\.yaml.*plan_normalisation"):
        model_config_from_dict({"plan_normalisation": "mean"}, "m.yaml")


def _lift_output(model: torch.nn.Module) -> None:
    """An untrained model predicts ~0 in the target; lift its output layer's bias so that each
    prediction has a target median to normalise (a different one per case and sample)."""
    head = model.vae.to_out if hasattr(model, "vae") else model.unet.net.final_conv
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        convs[-1].bias.add_(1.8)


@pytest.mark.parametrize("kind", ["diffusion", "unet"])
def test_every_prediction_is_normalised_per_sample(kind):
    torch.manual_seed(0)
    cfg = tiny_cfg(kind)
    model = build_model(cfg).eval()
    _lift_output(model)
    batch = fake_batch(n=2, seed=1)
    plain, _ = predict_normalised(model, batch, cfg, seed=3)
    ncfg = dataclasses.replace(cfg, plan_normalisation="target_median")
    normed, _ = predict_normalised(model, batch, ncfg, seed=3)
    medians = _target_medians(plain, batch["target_primary"])
    assert all(0.5 < m < 2.0 and abs(m - 1) > 0.01 for m in medians), medians  # a real scaling
    assert _target_medians(normed, batch["target_primary"]) == pytest.approx([1.0, 1.0], abs=1e-4)
    if kind == "diffusion":  # each of the samples is a normalised plan, so is their mean
        mean3, std = predict_normalised(model, batch, ncfg, seed=3, num_samples=3)
        assert std is not None and mean3.shape == plain.shape
        assert _target_medians(mean3, batch["target_primary"]) == pytest.approx([1.0, 1.0], abs=0.05)
        one, _ = predict_normalised(model, batch, ncfg, seed=3, num_samples=1)
        assert torch.allclose(one, normed)
