"""A privacy budget holds whatever the site does between runs (issue #29.3-5).

3. The site file's ``target_epsilon`` is the ceiling: lowering it below what was spent stops
   the site (one line), also when the ledger was started with a higher target.
4. Removing training cases: the budget check counts the steps and the sampling rate that will
   run, recomputed from the cases loaded now (they used to come from the first run: the check
   counted 1 step while 3 ran, and Opacus' expected batch of 0 cases ended in a NaN loss).
5. Renaming a site: the ledger is keyed to the data too; a site whose state folder has no
   ledger continues the one kept for the same data under another name, with a warning.

Unit tests on ``SitePrivacy`` (no training) and one short DP training per point (slow: a few
seconds each) on a 16^3 site.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from addiff_core.config import PrivacyConfig, load_site_config
from addiff_core.errors import UserError
from addiff_core.site_task import SiteTask, initial_arrays
from addiff_core.privacy import PrivacyBudgetExhausted, SitePrivacy, epsilon_of, ledger_key
from addiff_core.round_plan import RoundPlan
from addiff_core.synth import write_synthetic_sites
from helpers.models import TINY_MODEL

UNET = dataclasses.replace(TINY_MODEL, kind="unet", unet_channels=(4, 4), norm_groups=2, cond_channels=4)  # seconds a DP round


SIGMA = 0.94  # a fixed noise multiplier: calibrating one costs seconds (about a target of 8 over 40 steps of q 1/4)


def _ledger(state_dir, target, *, n=8, steps=0, key=None) -> SitePrivacy:
    """A ledger (batch size 2, 40 planned steps) that has spent ``steps`` steps."""
    dp = SitePrivacy(PrivacyConfig(enabled=True, target_epsilon=target, noise_multiplier=SIGMA), state_dir,
                     num_train=n, batch_size=2, planned_steps=40, key=key)
    if steps:
        dp.state.history = [(dp.state.noise_multiplier, dp.state.sample_rate, steps)]
        dp.save()
    return dp


def _site(site_file, state_dir, **privacy):
    site = load_site_config(site_file)
    return dataclasses.replace(site, state_dir=state_dir, privacy=PrivacyConfig(enabled=True, **privacy),
                               training=dataclasses.replace(site.training, batch_size=2))


@pytest.fixture(scope="module")
def site8(tmp_path_factory):
    """A site of 8 cases, 6 for training (the issue's setting)."""
    return write_synthetic_sites(tmp_path_factory.mktemp("dp8"), n_sites=1, cases_per_site=8, size=16, seed=3)[0]


# ------------------------------------------------------------------------------------------
# 3. the site file's target is the ceiling
# ------------------------------------------------------------------------------------------
def test_a_lowered_target_below_what_was_spent_refuses_in_one_line(tmp_path):
    spent = _ledger(tmp_path, 8.0, steps=4).state.epsilon()  # ~2.36 of 8
    dp = _ledger(tmp_path, 1.0)
    with pytest.raises(PrivacyBudgetExhausted) as e:
        dp.check_budget(dp.steps_for(1))
    msg = str(e.value)
    assert "already spent" in msg and f"{spent:.3f}" in msg and "target_epsilon 1" in msg and "\n" not in msg
    assert str(tmp_path) not in msg  # the reason travels to the server
    assert isinstance(e.value, UserError)  # `addiff train`: one line, no traceback


def test_a_lowered_target_is_the_ceiling_of_the_next_round(tmp_path):
    _ledger(tmp_path, 8.0, steps=4)  # ~2.36 spent; 4 more steps reach ~3.29
    dp = _ledger(tmp_path, 3.0)
    after = epsilon_of([(SIGMA, 0.25, 8)], dp.state.delta)
    assert dp.state.epsilon_after(dp.steps_for(1)) == pytest.approx(after) and 3.0 < after < 3.5
    with pytest.raises(PrivacyBudgetExhausted, match=f"would reach {after:.3f} > target 3 "):
        dp.check_budget(dp.steps_for(1))
    _ledger(tmp_path, 3.5).check_budget(4)  # under the file's 3.5: trains
    assert _ledger(tmp_path, 3.0).state.target_epsilon == 3.0


@pytest.mark.slow
def test_a_site_that_lowers_its_target_after_training_does_not_train_again(tmp_path, site8):
    arrays = initial_arrays(UNET)
    task = SiteTask(_site(site8, tmp_path / "state", target_epsilon=8.0, noise_multiplier=SIGMA), UNET)
    spent = task.train(arrays, RoundPlan("unet", 1, epochs=1, planned_epochs=4)).metrics["epsilon"]
    task = SiteTask(_site(site8, tmp_path / "state", target_epsilon=round(spent * 0.5, 3), noise_multiplier=SIGMA),
                    UNET)
    before = task.stage_arrays("unet")
    with pytest.raises(PrivacyBudgetExhausted, match="already spent"):
        task.train(arrays, RoundPlan("unet", 2, epochs=1, planned_epochs=4))
    assert all(np.array_equal(before[k], v) for k, v in task.stage_arrays("unet").items())


# ------------------------------------------------------------------------------------------
# 4. the steps and the sampling rate of the cases loaded now
# ------------------------------------------------------------------------------------------
def test_fewer_cases_change_the_steps_and_the_sampling_rate_the_check_counts(tmp_path):
    first = _ledger(tmp_path, 2.7, n=6, steps=3)  # 3 steps per epoch, q = 1/3
    sigma, delta = first.state.noise_multiplier, first.state.delta
    dp = _ledger(tmp_path, 2.7, n=2)  # 4 of 6 cases gone: 1 step per epoch, q = 1
    assert dp.steps_for(1) == 1 and dp.state.sample_rate == 1.0
    assert dp.state.epsilon_after(dp.steps_for(1)) == pytest.approx(epsilon_of([(sigma, 1 / 3, 3), (sigma, 1.0, 1)], delta))
    assert dp.state.noise_multiplier == sigma and dp.state.delta == delta  # the calibration stays


@pytest.mark.slow
def test_removing_training_cases_keeps_the_accounting_true_and_never_a_nan(tmp_path, site8, caplog):
    """The issue's run: 6 training cases, target 2.7, then the CT of 4 of them deleted. Round 2
    trains 1 step at q = 1 (epsilon 2.60, as predicted); round 3 would pass 2.7: refused."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(site8.parent / site8.stem, data)
    # the noise multiplier a target of 2.7 over 9 steps of q 1/3 calibrates to, given (calibrating costs seconds)
    site = dataclasses.replace(_site(site8, tmp_path / "state", target_epsilon=2.7, noise_multiplier=1.23779296875),
                               data_dir=data / "cases")
    arrays = initial_arrays(UNET)
    task = SiteTask(site, UNET)
    assert task.data.num_train == 6
    first = task.train(arrays, RoundPlan("unet", 1, epochs=1, planned_epochs=3)).metrics
    for cid in task.data.train.case_ids[:4]:
        (site.data_dir / cid / "ct.nii.gz").unlink()
    task = SiteTask(site, UNET)
    caplog.set_level(logging.WARNING, logger="addiff_core.privacy")
    dp = task.privacy(3)
    predicted = dp.state.epsilon_after(dp.steps_for(1))
    res = task.train(arrays, RoundPlan("unet", 2, epochs=1, planned_epochs=3))
    assert res.metrics["dp_steps"] == first["dp_steps"] + 1
    assert res.metrics["epsilon"] == pytest.approx(predicted) and predicted < 2.7
    assert "sampling rate" in caplog.text
    with pytest.raises(PrivacyBudgetExhausted, match="would reach"):
        task.train(arrays, RoundPlan("unet", 3, epochs=1, planned_epochs=3))


# ------------------------------------------------------------------------------------------
# 5. one ledger for the same data, whatever the site's name
# ------------------------------------------------------------------------------------------
def test_a_renamed_site_continues_the_ledger_of_its_data(tmp_path, caplog):
    ids = ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8"]
    old = _ledger(tmp_path / "state" / "hospital_a", 8.0, steps=8, key=ledger_key("hospital_a", tmp_path / "data", ids))
    caplog.set_level(logging.WARNING, logger="addiff_core.privacy")
    new = _ledger(tmp_path / "state" / "hospital_z", 8.0, key=ledger_key("hospital_z", tmp_path / "data", ids))
    assert old.state.epsilon() > 3 and new.state.epsilon() == pytest.approx(old.state.epsilon())
    assert "hospital_a" in caplog.text and "same data" in caplog.text
    assert (tmp_path / "state" / "hospital_z" / "privacy_accountant.json").is_file()  # kept under the new name too
    caplog.clear()  # the next round: the ledger it took over is not news
    assert _ledger(tmp_path / "state" / "hospital_z", 8.0, key=ledger_key("hospital_z", tmp_path / "data", ids)
                   ).state.continued == ["hospital_a"] and "same data" not in caplog.text
    # other data under another name: a ledger of its own
    other = _ledger(tmp_path / "state" / "hospital_b", 8.0, key=ledger_key("hospital_b", tmp_path / "other", ["Q1"]))
    assert other.state.epsilon() == 0.0


@pytest.mark.slow
def test_renaming_a_site_in_its_file_does_not_reset_its_spending(tmp_path, site8):
    """The default state folder follows the name (state/NAME): the renamed site finds the
    ledger of the same data in state/hospital_a and goes on from it."""
    arrays = initial_arrays(UNET)
    site = _site(site8, tmp_path / "state" / "hospital_a", target_epsilon=50.0, noise_multiplier=1.0)
    spent = SiteTask(site, UNET).train(arrays, RoundPlan("unet", 1, epochs=1, planned_epochs=4)).metrics["epsilon"]
    renamed = dataclasses.replace(site, name="hospital_z", state_dir=tmp_path / "state" / "hospital_z")
    task = SiteTask(renamed, UNET)
    assert spent > 0 and task.privacy(4).state.epsilon() == pytest.approx(spent)
    res = task.train(arrays, RoundPlan("unet", 2, epochs=1, planned_epochs=4))
    assert res.metrics["epsilon"] > spent and res.metrics["dp_steps"] == 2 * task.steps_per_epoch()
