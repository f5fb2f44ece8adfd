"""A site's optimiser state across rounds (addiff_core.optimizer_state): restored from its latest
earlier round of the same stage, pruned to two rounds, stale later rounds removed, a mismatched
state ignored, each federated run's states apart (run tag)."""
from __future__ import annotations

import pytest
import torch

from addiff_core.config import load_model_config, load_site_config
from addiff_core.site_task import SiteTask, initial_arrays
from addiff_core.optimizer_state import KEEP_RUNS, OptimizerStore, new_run_tag
from addiff_core.round_plan import RoundPlan
from helpers.federation import TINY, synthetic_sites


def _adam(seed: int = 0, n: int = 3) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.arange(n, dtype=torch.float32) + seed)
    return p, torch.optim.AdamW([p], lr=0.1)


def _step(p: torch.nn.Parameter, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    (p ** 2).sum().backward()
    opt.step()


def _files(tmp_path) -> list[str]:
    return sorted(f.name for f in (tmp_path / "optimizer").iterdir())


def test_restore_latest_earlier_round_of_the_stage(tmp_path):
    store = OptimizerStore(tmp_path)
    p, opt = _adam()
    assert store.restore(opt, "vae", 1) is None  # nothing saved yet: fresh
    for _ in range(3):
        _step(p, opt)
    store.save(opt, "vae", 1)
    _, fresh = _adam()
    assert store.restore(fresh, "diffusion", 2) is None  # another stage's state is not used
    assert store.restore(fresh, "vae", 5) == 1
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert float(fresh.state_dict()["state"][0]["step"]) == 3


def test_keeps_two_rounds_and_drops_stale_later_ones(tmp_path):
    store = OptimizerStore(tmp_path)
    p, opt = _adam()
    for r in (1, 2, 3, 4):
        _step(p, opt)
        store.save(opt, "vae", r)
    assert _files(tmp_path) == ["vae_round3.pt", "vae_round4.pt"]
    # a resumed run re-runs round 4: it starts from round 3, as the uninterrupted run did
    _, again = _adam()
    assert store.restore(again, "vae", 4) == 3
    # a new run in the same state folder: its round 1 removes the old run's later rounds
    store.save(opt, "vae", 1)
    assert _files(tmp_path) == ["vae_round1.pt"]


def test_a_state_that_does_not_fit_is_ignored(tmp_path):
    store = OptimizerStore(tmp_path)
    p, opt = _adam(n=3)
    _step(p, opt)
    store.save(opt, "unet", 1)
    q = torch.nn.Parameter(torch.zeros(5))
    other = torch.optim.AdamW([q, torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # another model
    assert store.restore(other, "unet", 2) is None
    assert other.state_dict()["state"] == {}


def test_a_state_of_other_shapes_is_ignored_not_a_crash_at_step(tmp_path, caplog):
    """torch's load_state_dict checks only how many parameters there are: a state of a model of
    other widths (say a tiny run earlier in the same state folder) would load, then fail at step()."""
    store = OptimizerStore(tmp_path)
    p, opt = _adam(n=3)
    _step(p, opt)
    store.save(opt, "diffusion", 2)
    q, other = _adam(n=5)  # one parameter, as saved, of another shape
    with caplog.at_level("WARNING", logger="addiff_core.optimizer_state"):
        assert store.restore(other, "diffusion", 21) is None
    assert "diffusion_round2.pt not used (OtherShapesError)" in caplog.text
    assert str(tmp_path) not in caplog.text  # the file's name, not the site's state folder
    assert other.state_dict()["state"] == {}
    _step(q, other)  # trains with a fresh optimiser


def test_a_state_from_before_the_stage_began_belongs_to_another_run(tmp_path):
    store = OptimizerStore(tmp_path)
    p, opt = _adam()
    _step(p, opt)
    store.save(opt, "diffusion", 6)  # an earlier run whose diffusion stage began at round 6
    _, fresh = _adam()
    assert store.restore(fresh, "diffusion", 21, stage_start=21) is None  # this run's stage begins at 21
    assert store.restore(fresh, "diffusion", 22, stage_start=21) is None
    assert store.restore(fresh, "diffusion", 8, stage_start=6) == 6  # the same run's own earlier round


def test_a_site_does_not_resume_another_runs_optimizer_at_a_stage_start(tmp_path, monkeypatch):
    """SiteTask.train passes the stage's first round: a federated diffusion stage that begins at
    round 21 does not take up the diffusion state an earlier run left at round 2."""
    site = load_site_config(synthetic_sites(tmp_path / "data", n_sites=1)[0])
    cfg = load_model_config(TINY)
    task = SiteTask(site, cfg)
    arrays = initial_arrays(cfg, 0)
    task.train(arrays, RoundPlan("diffusion", 2, epochs=1))  # the earlier run's stage 2 began at round 2
    restored = []
    real = OptimizerStore.restore

    def spy(self, *args, **kwargs):
        restored.append(real(self, *args, **kwargs))
        return restored[-1]

    monkeypatch.setattr(OptimizerStore, "restore", spy)
    task.train(arrays, RoundPlan("diffusion", 21, epochs=1, stage_round=1))
    task.train(arrays, RoundPlan("diffusion", 22, epochs=1, stage_round=2))
    assert restored == [None, 21]  # not round 2's state; then this run's own round 21


def test_each_run_keeps_its_own_states_and_a_resumed_run_finds_them(tmp_path):
    """The gap the stage-start rule leaves: another run with the same schedule whose states sit at
    earlier rounds of the same stage (e.g. a site that missed this run's first diffusion round)."""
    run_a, run_b = new_run_tag(), new_run_tag()
    assert run_a != run_b
    p, opt = _adam()
    _step(p, opt)
    OptimizerStore(tmp_path, run_a).save(opt, "diffusion", 21)
    _, fresh = _adam()
    assert OptimizerStore(tmp_path, run_b).restore(fresh, "diffusion", 22, stage_start=21) is None
    assert OptimizerStore(tmp_path, run_a).restore(fresh, "diffusion", 22, stage_start=21) == 21  # its resumption
    assert OptimizerStore(tmp_path).restore(fresh, "diffusion", 22, stage_start=21) is None  # untagged: local


@pytest.mark.parametrize("tag", ["../../etc", "0123456789ABCDEF", "0123", "/tmp/x", "0123456789abcdef/.."])
def test_a_run_tag_that_is_not_16_hex_digits_is_refused(tmp_path, tag):
    with pytest.raises(ValueError, match="16 hex digits"):
        OptimizerStore(tmp_path, tag)
    assert not (tmp_path / "optimizer").exists()


def test_the_newest_runs_states_are_kept(tmp_path):
    import os

    p, opt = _adam()
    _step(p, opt)
    tags = [new_run_tag() for _ in range(KEEP_RUNS + 2)]
    for i, tag in enumerate(tags[:-1]):
        OptimizerStore(tmp_path, tag).save(opt, "vae", 1)
        os.utime(tmp_path / "optimizer" / tag, (1000.0 + i, 1000.0 + i))  # distinct ages, oldest first
    (tmp_path / "optimizer" / "notes").mkdir()  # not a run's folder: left alone
    OptimizerStore(tmp_path, tags[-1]).save(opt, "vae", 1)
    kept = sorted(d.name for d in (tmp_path / "optimizer").iterdir())
    assert kept == sorted(["notes", *tags[-KEEP_RUNS:]])
