"""The model learns: after a short training, held-out MAE is clearly below an untrained model's
and below a constant-dose guess (same site, same held-out cases, same metric on the CT grid)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from addiff_core.case_io import load_case
from addiff_core.config import load_model_config, load_site_config
from addiff_core.site_task import SiteTask
from addiff_core.metrics import mae
from addiff_core.round_plan import RoundPlan
from addiff_core.synth import write_synthetic_sites
from addiff_core.training import evaluate


def constant_guess_mae(task: SiteTask, frac: float | None = None) -> float:
    """Predict, inside the body, ``frac`` of Rx everywhere (None: the mean training dose)."""
    if frac is None:
        frac = np.mean([float((s["dose"] * s["body"]).sum() / s["body"].sum()) for s in task.data.train.samples])
    errs = []
    for d in task.data.heldout.case_dirs:
        case = load_case(d)
        ref = case.array("dose")
        body = case.array("possible_dose_mask")
        errs.append(mae(np.where(body, frac * case.plan.max_prescription, 0.0), ref, body))
    return float(np.mean(errs))


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
VAE_EPOCHS, DIFFUSION_EPOCHS = 16, 8


@pytest.fixture(scope="module")
def learning_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    site_file = write_synthetic_sites(root, n_sites=1, cases_per_site=12, size=32, seed=11)[0]
    site = load_site_config(site_file)
    return dataclasses.replace(site, training=dataclasses.replace(site.training, lr=1e-3, batch_size=2))


def _heldout(task: SiteTask, cfg) -> dict:
    return evaluate(task.model, task.data.heldout, cfg, task.device, gamma=False, progress=False)["mean"]


@pytest.mark.slow
def test_diffusion_learns_and_matches_the_unet(learning_site):
    """ADDiff-Dose beats an untrained model and a constant guess, and its held-out MAE is within
    1.3x the U-Net baseline's at a budget that favours the U-Net: the U-Net trains as many epochs
    as both ADDiff stages together, and a U-Net step costs more CPU than a step of either stage.
    (The design before issue #11, epsilon prediction and a decoder blind to anatomy, was at
    ~3x the U-Net's MAE in the main job.) Since issue #24 an untrained ADDiff-Dose predicts ~0 Gy
    (residual latent, zero-initialised learned paths), so "untrained" is the zero-dose guess:
    the U-Net reaches ~0.65x of it at this budget, hence the 0.8 bar; the constant guess spreads
    the mean dose over the body and scores worse."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # a pytest-xdist worker keeps its one thread (conftest)
        torch.set_num_threads(2)
    cfg = load_model_config(DEMO_CONFIG)  # the main job's model (x0, residual latent, decoder blind to anatomy)
    task = SiteTask(learning_site, cfg)
    assert len(task.data.heldout) == 3
    untrained = _heldout(task, cfg)["mae_gy"]
    task.train(None, RoundPlan("vae", 0, epochs=VAE_EPOCHS))
    task.train(None, RoundPlan("diffusion", 1, epochs=DIFFUSION_EPOCHS))
    trained = _heldout(task, cfg)
    constant = constant_guess_mae(task)

    ucfg = dataclasses.replace(cfg, kind="unet")
    unet = SiteTask(dataclasses.replace(learning_site, state_dir=learning_site.state_dir / "unet"), ucfg)
    unet.train(None, RoundPlan("unet", 0, epochs=VAE_EPOCHS + DIFFUSION_EPOCHS))
    baseline = _heldout(unet, ucfg)
    print(f"held-out MAE: ADDiff {trained['mae_gy']:.2f} Gy, U-Net {baseline['mae_gy']:.2f} Gy, "
          f"untrained {untrained:.2f} Gy, zero dose {constant_guess_mae(task, 0.0):.2f} Gy, constant {constant:.2f} Gy")
    assert trained["mae_gy"] < 0.8 * untrained
    assert trained["mae_gy"] < 0.5 * constant
    assert trained["mae_gy"] <= 1.3 * baseline["mae_gy"]
