"""A site's optimiser state across rounds (addiff_core.optimizer_state): restored from its latest
earlier round of the same stage, pruned to two rounds, stale later rounds removed, a mismatched
state ignored."""
from __future__ import annotations

import torch

from addiff_core.optimizer_state import OptimizerStore


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
