"""addiff_core/round_plan.py: the stage plan on the wire (one writer, one reader), and a round's
arithmetic read once from the train config (what ``SiteTask.train`` is given)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from addiff_core.round_plan import EvalPlan, RoundPlan, RunPlan, format_stage_plan, parse_stage_plan


def test_stage_plan_round_trip():
    for plan in ({"vae": 20, "diffusion": 4}, {"unet": 17}, {"vae": 1, "diffusion": 0}, {}):
        text = format_stage_plan(plan)
        assert parse_stage_plan(text) == plan
        assert list(parse_stage_plan(text)) == list(plan)  # run order kept
    assert format_stage_plan({"vae": 3, "diffusion": 4}) == "vae:3,diffusion:4"
    assert parse_stage_plan(" vae : 3 , diffusion:4 ") == {"vae": 3, "diffusion": 4}
    assert parse_stage_plan("") == {} and parse_stage_plan(None) == {}


@pytest.mark.parametrize("text", ["vae", "vae:x", ":3", "vae:-1", "vae:3;diffusion:4", "vea:3", "vae:10001"])
def test_stage_plan_rejects_garbage(text):
    with pytest.raises(ValueError, match="stage plan"):
        parse_stage_plan(text)


@pytest.mark.parametrize("plan", [{"va:e": 1}, {"": 1}, {"vae": -1}, {"vae": 1.5}])
def test_stage_plan_cannot_write_what_it_cannot_read(plan):
    with pytest.raises(ValueError, match="stage plan"):
        format_stage_plan(plan)


def _site(vae_epochs=2, diffusion_epochs=5, personalize_max_epochs=None):
    return SimpleNamespace(training=SimpleNamespace(vae_epochs=vae_epochs, diffusion_epochs=diffusion_epochs),
                           personalize_max_epochs=personalize_max_epochs)


def test_a_site_plans_its_epochs_from_the_stage_plan():
    def planned_epochs(site, plan, local_epochs=0):
        return sum(RunPlan.from_config({"stage-plan": plan, "local-epochs": local_epochs}).run_epochs(site.training)
                   .values())

    site = _site()
    assert planned_epochs(site, format_stage_plan({"vae": 3, "diffusion": 4})) == 3 * 2 + 4 * 5
    assert planned_epochs(site, "vae:3,diffusion:4", local_epochs=1) == 7
    assert planned_epochs(site, "") == 0


TRAIN = {"stage": "diffusion", "server-round": 7, "stage-round": 3, "stage-rounds": 4, "local-epochs": 0,
         "stage-plan": "vae:3,diffusion:4", "personalize-epochs": 2, "personalize-stages": "both",
         "proximal-mu": 0.01, "seed": 5, "run-tag": "abc"}


def test_a_train_config_is_read_once_into_the_round_plan():
    plan = RoundPlan.from_config(TRAIN)
    assert (plan.stage, plan.round_number, plan.stage_round, plan.stage_rounds) == ("diffusion", 7, 3, 4)
    assert (plan.proximal_mu, plan.seed, plan.run_tag) == (0.01, 5, "abc")
    at = plan.at_site(_site(), "diffusion")
    assert at.epochs == 5  # local-epochs 0: the site file's diffusion_epochs
    assert (at.total_epochs, at.epoch_offset, at.stage_start) == (20, 10, 5)
    # the DP target: both stages' rounds x epochs, and the fine-tuning of both stages
    assert at.planned_epochs == 3 * 2 + 4 * 5 + 2 * 2
    capped = plan.at_site(_site(personalize_max_epochs=1), "diffusion")  # the site file caps fine-tuning
    assert capped.planned_epochs == 3 * 2 + 4 * 5 + 1 * 2
    assert plan.at_site(_site(), "unet").planned_epochs == 3 * 2 + 4 * 5 + 2  # the U-Net fine-tunes one stage
    assert at.at_site(_site(), "diffusion") == at  # resolving twice changes nothing
    one = RoundPlan.from_config({**TRAIN, "local-epochs": 1}).at_site(_site(), "diffusion")
    assert (one.epochs, one.total_epochs, one.epoch_offset, one.planned_epochs) == (1, 4, 2, 7 + 2 * 2)


def test_a_site_alone_gives_its_epochs():
    plan = RoundPlan("vae", 0, epochs=3, planned_epochs=8).at_site(_site(), "diffusion")
    assert (plan.epochs, plan.planned_epochs, plan.total_epochs, plan.epoch_offset, plan.stage_start) == (3, 8, 3, 0, 1)
    assert RoundPlan("vae", 2, epochs=3).at_site(_site(), "diffusion").planned_epochs == 3  # no plan: this round


@pytest.mark.parametrize("change", [{"stage": ""}, {"server-round": None}, {"server-round": -1},
                                    {"stage-round": 5}, {"stage-round": 0}, {"stage-rounds": 0},
                                    {"local-epochs": -1}, {"local-epochs": 10**9}, {"local-epochs": 1.5},
                                    {"proximal-mu": float("nan")}, {"proximal-mu": -0.1}, {"seed": "x"},
                                    {"stage-plan": "vae"}, {"personalize-epochs": -2},
                                    {"personalize-stages": "vae"}, {"stage": "vea"}, {"stage-rounds": 10**9},
                                    {"stage-plan": "vae:1,diffusion:100000000"}, {"seed": 2**64}])
def test_a_round_config_out_of_bounds_is_refused(change):
    cfg = {**TRAIN, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ValueError, match="round config|stage plan"):
        RoundPlan.from_config(cfg)


def test_an_evaluation_config_is_read_once_and_bounded():
    """Seed, DDIM steps and run tag of an evaluation message (final, adapt, cross): the steps at
    most the model's train_timesteps (a server could otherwise make a site sample without end)."""
    assert EvalPlan.from_config({}, 1000) == EvalPlan(seed=0, steps=None, run_tag="")
    assert EvalPlan.from_config({"seed": 7, "eval-steps": 10, "run-tag": "r1"}, 1000) == EvalPlan(7, 10, "r1")
    assert EvalPlan.from_config({"eval-steps": 0}, 1000).steps is None  # 0: the model's own sample_steps
    for bad in ({"eval-steps": 1001}, {"eval-steps": -1}, {"eval-steps": 2.5}, {"seed": 2**64}, {"seed": "x"},
                {"seed": float("inf")}):
        with pytest.raises(ValueError, match="round config"):
            EvalPlan.from_config(bad, 1000)
