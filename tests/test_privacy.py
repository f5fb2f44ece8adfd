"""Differential privacy per site: the budget holds across rounds, restarts and both stages."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator

from addiff_core.config import PrivacyConfig, load_site_config
from addiff_core.site_task import SiteTask, initial_arrays
from addiff_core.models import build_model
from addiff_core.privacy import STATE_FILE, PrivacyBudgetExhausted, SitePrivacy, epsilon_of
from addiff_core.round_plan import RoundPlan
from addiff_core.synth import write_synthetic_sites
from helpers.models import TINY_MODEL

TINY = TINY_MODEL  # the tests' one tiny model configuration


@pytest.fixture(scope="module")
def dp_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpsites")
    files = write_synthetic_sites(root, n_sites=1, cases_per_site=5, size=16, seed=3)
    return files[0]


def site_with_privacy(site_file, state_dir, **privacy):
    site = load_site_config(site_file)
    pcfg = dataclasses.replace(PrivacyConfig(enabled=True), **privacy)
    return dataclasses.replace(site, state_dir=state_dir, privacy=pcfg,
                               training=dataclasses.replace(site.training, batch_size=2))


def test_models_pass_opacus_validation():
    for kind in ("diffusion", "unet"):
        assert ModuleValidator.validate(build_model(dataclasses.replace(TINY, kind=kind)), strict=False) == []


def test_noise_is_calibrated_once_for_the_whole_run(tmp_path):
    dp = SitePrivacy(PrivacyConfig(enabled=True, target_epsilon=3.0), tmp_path, num_train=8, batch_size=2,
                     planned_steps=40)
    # spending every planned step lands on the target epsilon, not before
    eps_full = epsilon_of([(dp.state.noise_multiplier, dp.state.sample_rate, 40)], dp.state.delta)
    assert eps_full == pytest.approx(3.0, rel=0.02)
    assert dp.state.sample_rate == pytest.approx(0.25)
    assert dp.state.delta < 1 / 8


def test_cumulative_epsilon_matches_offline_accountant_and_restarts(tmp_path, dp_site):
    state = tmp_path / "state"
    site = site_with_privacy(dp_site, state, target_epsilon=50.0)
    task = SiteTask(site, TINY)
    arrays = initial_arrays(TINY, seed=0)
    epsilons = []
    rounds = [("vae", 1), ("vae", 2), ("diffusion", 3)]
    planned = len(rounds)  # one local epoch per round
    for stage, rnd in rounds[:2]:
        res = task.train(arrays, RoundPlan(stage, rnd, epochs=1, planned_epochs=planned))
        arrays.update(res.arrays)
        epsilons.append(res.metrics["epsilon"])
    # restart: a new task (new process) reads the accountant back from the site's state dir
    task = SiteTask(site, TINY)
    res = task.train(arrays, RoundPlan("diffusion", 3, epochs=1, planned_epochs=planned))
    epsilons.append(res.metrics["epsilon"])

    saved = json.loads((state / STATE_FILE).read_text())
    sigma, q = saved["noise_multiplier"], saved["sample_rate"]
    steps_per_round = task.steps_per_epoch()
    for k, eps in enumerate(epsilons, start=1):
        acc = RDPAccountant()
        acc.history = [(sigma, q, k * steps_per_round)]
        assert eps == pytest.approx(acc.get_epsilon(delta=saved["delta"]), rel=1e-9)
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    assert res.metrics["dp_steps"] == 3 * steps_per_round
    # the privacy state never travels: it is not among the arrays sent to the server
    assert all(k.startswith("diffusion.") for k in res.arrays)


def test_budget_stops_training_before_any_update(tmp_path, dp_site):
    site = site_with_privacy(dp_site, tmp_path / "state", target_epsilon=2.0)
    task = SiteTask(site, TINY)
    arrays = initial_arrays(TINY, seed=0)
    planned = 2
    res = task.train(arrays, RoundPlan("vae", 1, epochs=1, planned_epochs=planned))
    res = task.train({**arrays, **res.arrays}, RoundPlan("vae", 2, epochs=1, planned_epochs=planned))
    assert res.metrics["epsilon"] <= 2.0 + 1e-6
    before = {k: v.copy() for k, v in task.stage_arrays("vae").items()}
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon would reach"):
        task.train(arrays, RoundPlan("vae", 3, epochs=1, planned_epochs=planned))
    after = task.stage_arrays("vae")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_dp_training_changes_weights_and_clips(tmp_path, dp_site):
    """DP-SGD really runs: weights move, per-sample clipping is on (no global clip)."""
    site = site_with_privacy(dp_site, tmp_path / "state", noise_multiplier=1.0, target_epsilon=None)
    task = SiteTask(site, TINY)
    arrays = initial_arrays(TINY, seed=0)
    res = task.train(arrays, RoundPlan("vae", 1, epochs=1, planned_epochs=1))
    moved = sum(float(np.abs(res.arrays[k] - arrays[k]).sum()) for k in res.arrays)
    assert moved > 0
    assert res.metrics["noise_multiplier"] == 1.0
    assert np.isfinite(res.metrics["epsilon"]) and res.metrics["epsilon"] > 0
    # hooks were removed after the round: a second round wraps the module again without error
    res2 = task.train(arrays, RoundPlan("vae", 2, epochs=1, planned_epochs=2))
    assert res2.metrics["epsilon"] > res.metrics["epsilon"]
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in task.model.parameters())


def test_empty_poisson_batches_keep_structure_and_count_as_steps(tmp_path, dp_site):
    from addiff_core.privacy import poisson_loader

    site = site_with_privacy(dp_site, tmp_path / "state", noise_multiplier=1.0, target_epsilon=None)
    site = dataclasses.replace(site, training=dataclasses.replace(site.training, batch_size=1))
    task = SiteTask(site, TINY)
    empty = next(iter(poisson_loader(task.data.train, 1e-9)))
    assert set(empty) == set(task.data.train[0]) and all(v.shape[0] == 0 for v in empty.values())
    # batch size 1 of 4 cases: about a third of the Poisson batches are empty
    res = task.train(initial_arrays(TINY, seed=0), RoundPlan("vae", 1, epochs=3, planned_epochs=3))
    assert res.metrics["dp_steps"] == 3 * task.steps_per_epoch()
    # the loss stays at the site (a DP site releases only accounted numbers), in its history
    assert "train_loss" not in res.metrics and all(np.isfinite(h["loss"]) for h in res.history)


@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_functorch_and_hooks_per_sample_gradients_give_the_same_update(tmp_path, dp_site, stage):
    """The default per-sample gradient mode (functorch, faster) computes what Opacus' hooks do:
    the same clipped update (noise negligible) from the same start."""
    arrays = initial_arrays(TINY, seed=0)
    out = {}
    for mode in ("functorch", "hooks"):
        site = site_with_privacy(dp_site, tmp_path / mode, noise_multiplier=1e-9, target_epsilon=None,
                                 max_grad_norm=0.05, grad_sample_mode=mode)
        task = SiteTask(site, TINY)
        if stage == "diffusion":
            task.load_global(arrays, "vae")
        res = task.train(arrays, RoundPlan(stage, 1, epochs=1, seed=0, planned_epochs=1))
        out[mode] = res.arrays
    moved = 0.0
    for k, v in out["hooks"].items():
        np.testing.assert_allclose(out["functorch"][k], v, rtol=1e-4, atol=1e-6, err_msg=k)
        moved = max(moved, float(np.abs(v - arrays[k]).max()))
    assert moved > 1e-6  # the step did something


# ------------------------------------------------------------------------------------------
# issue #12.6: with DP a site releases only what its accountant covers; one ledger per site
# ------------------------------------------------------------------------------------------
DP_RELEASED = {"dp_enabled", "epsilon", "delta", "noise_multiplier", "dp_steps"}


def test_a_dp_site_releases_no_unnoised_training_numbers(tmp_path, dp_site):
    site = site_with_privacy(dp_site, tmp_path / "state", target_epsilon=50.0)
    task = SiteTask(site, dataclasses.replace(TINY, kind="unet"))
    res = task.train(initial_arrays(task.cfg), RoundPlan("unet", 1, epochs=1, planned_epochs=2))
    assert set(res.metrics) == DP_RELEASED, sorted(res.metrics)  # no train_loss / l1 / kl, no skipped_cases
    assert res.history and "loss" in res.history[0]  # the losses stay at the site


def test_local_training_with_dp_charges_the_sites_one_ledger(tmp_path, dp_site):
    from addiff_core.local import train_site

    state = tmp_path / "state"
    site = site_with_privacy(dp_site, state, target_epsilon=50.0)
    site = dataclasses.replace(site, model=dataclasses.replace(TINY, kind="unet"))
    train_site(dp_site, tmp_path / "run", site=site, diffusion_epochs=1, steps=1, progress=False)
    stored = SitePrivacy.stored_state(state)
    assert stored is not None and stored.steps_taken > 0  # in the site's state_dir, not in the run folder
    assert not list((tmp_path / "run").rglob(STATE_FILE))


def test_a_dp_site_calibrates_the_latent_scale_on_phantoms_not_on_its_cases(tmp_path, dp_site):
    """The latent scale a DP site sets in its first diffusion round depends only on the global VAE
    and public synthetic phantoms: two DP sites with different cases set the same value, equal to
    the phantom calibration, and a scale the global model already carries is kept."""
    from addiff_core.phantom_calibration import calibrate_on_phantoms

    other_root = tmp_path / "other"
    other = write_synthetic_sites(other_root, n_sites=2, cases_per_site=5, size=16, seed=9)[1]
    arrays = initial_arrays(TINY, seed=0)
    scales = []
    for k, f in enumerate((dp_site, other)):
        task = SiteTask(site_with_privacy(f, tmp_path / f"state{k}", noise_multiplier=1.0, target_epsilon=None), TINY)
        res = task.train(arrays, RoundPlan("diffusion", 2, epochs=1, planned_epochs=1))
        scales.append(float(res.arrays["diffusion.latent_scale"][0]))
    reference = build_model(TINY)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    expected = calibrate_on_phantoms(reference, TINY.grid)
    assert scales[0] == scales[1] == pytest.approx(expected, rel=1e-6)
    assert expected > 0 and expected != pytest.approx(1.0)
    # a calibrated global scale is kept, not recomputed
    carried = {**arrays, "diffusion.latent_scale": np.array([0.5], dtype=np.float32)}
    task = SiteTask(site_with_privacy(dp_site, tmp_path / "state2", noise_multiplier=1.0, target_epsilon=None), TINY)
    res = task.train(carried, RoundPlan("diffusion", 2, epochs=1, planned_epochs=1))
    assert float(res.arrays["diffusion.latent_scale"][0]) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------
# issue #15.3: per-sample gradients by one backward pass per sample ("microbatch" mode)
# ------------------------------------------------------------------------------------------
def test_microbatch_per_sample_gradients_equal_opacus_functorch(dp_site):
    """``privacy.per_sample_backward`` gives each parameter the same ``grad_sample`` as Opacus'
    functorch mode computes (a deterministic per-sample loss through the VAE and the U-Net)."""
    from opacus import GradSampleModule

    from addiff_core import diffusion as diff
    from addiff_core.losses import masked_l1
    from addiff_core.privacy import per_sample_backward

    task = SiteTask(load_site_config(dp_site), TINY)
    batch = next(iter(torch.utils.data.DataLoader(task.data.train, batch_size=3)))
    torch.manual_seed(0)
    model = build_model(TINY)
    unet = build_model(dataclasses.replace(TINY, kind="unet"))

    def vae_losses(b):  # encoder mean -> anatomy-aware decoder: no sampling, one loss per sample
        return masked_l1(diff.decode_latent(model, diff.encode_dose(model, b["dose"]), b), b["dose"], b["body"],
                         reduction="none")

    def unet_losses(b):
        return masked_l1(unet(b), b["dose"], b["body"], reduction="none")

    for module, losses in ((model.vae, vae_losses), (unet, unet_losses)):
        params = [p for p in module.parameters() if p.requires_grad]
        per_sample_backward(lambda b: (losses(b).sum(), {}), params, batch)
        ours = [p.grad_sample.clone() for p in params]
        gsm = GradSampleModule(module, force_functorch=True, loss_reduction="sum")
        losses(batch).sum().backward()  # one batched pass: Opacus' per-sample gradients
        for p, g in zip(params, ours):
            assert g.shape == (3, *p.shape)
            torch.testing.assert_close(p.grad_sample, g, rtol=1e-4, atol=1e-6)
        gsm._close()
        assert max(float(g.abs().max()) for g in ours) > 0


def test_microbatch_mode_gives_the_same_dp_update_as_functorch(tmp_path, dp_site):
    """The whole DP step (clip per sample, sum, noise ~0) from the same start is the same in the
    microbatch mode as in Opacus' functorch mode (U-Net stage: a deterministic loss)."""
    cfg = dataclasses.replace(TINY, kind="unet")
    arrays = initial_arrays(cfg, seed=0)
    out = {}
    for mode in ("microbatch", "functorch"):
        site = site_with_privacy(dp_site, tmp_path / mode, noise_multiplier=1e-9, target_epsilon=None,
                                 max_grad_norm=0.05, grad_sample_mode=mode)
        out[mode] = SiteTask(site, cfg).train(arrays, RoundPlan("unet", 1, epochs=1, seed=0, planned_epochs=1)).arrays
    moved = 0.0
    for k, v in out["functorch"].items():
        np.testing.assert_allclose(out["microbatch"][k], v, rtol=1e-4, atol=1e-6, err_msg=k)
        moved = max(moved, float(np.abs(v - arrays[k]).max()))
    assert moved > 1e-6


def test_epsilon_is_opacus_rdp_and_cached_across_rounds():
    """``epsilon_of`` returns exactly what Opacus' RDPAccountant returns for the same history, and
    a later round's history (the same (sigma, q) plus more steps) needs no new RDP computation."""
    from addiff_core.privacy import _rdp_of_one_step

    history = [(1.3, 0.2, 30), (0.8, 0.05, 11)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon_of(history, 1e-4) == acc.get_epsilon(delta=1e-4)
    misses = _rdp_of_one_step.cache_info().misses
    later = history + [(1.3, 0.2, 30)]
    acc.history = list(later)
    assert epsilon_of(later, 1e-4) == acc.get_epsilon(delta=1e-4) > epsilon_of(history, 1e-4)
    assert _rdp_of_one_step.cache_info().misses == misses  # no new per-step RDP computed
