"""A site's own models after a federated run (issue #25), Flower-free.

* ``personalized``: the final global model fine-tuned on the site's own training cases
  (:func:`fine_tune`), kept in the site's state folder as ``personalized.pt`` (a checkpoint
  hashed like every other, :mod:`addiff_core.checkpoint`); it is never sent unless the site file
  says ``share_models_for_evaluation: true``.
* ``local``: the site trained alone from the federation's initial model with the same local
  budget it had in the federation (each stage: its rounds x its local epochs), kept as
  ``cross_site_local.pt`` (:func:`train_local`).

Both train through :meth:`fl_task.SiteTask.train`, so a DP site spends from its one accountant
(``PrivacyBudgetExhausted`` when the budget does not cover them) and its stored
optimiser states of the federated rounds are never touched (a run tag of their own).
Neither touches the site's cached global VAE nor the run's ``final_model.pt``: the weights are
put into the model directly, never through ``SiteTask.load_global``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .checkpoint import save_checkpoint
from .config import SiteConfig
from .fl_task import SiteTask, arrays_to_state, state_to_arrays

PERSONALIZED_FILE = "personalized.pt"
LOCAL_FILE = "cross_site_local.pt"
STAGE_CHOICES = ("both", "diffusion")


def personalized_path(site: SiteConfig) -> Path:
    return site.state_dir / PERSONALIZED_FILE


def local_path(site: SiteConfig) -> Path:
    return site.state_dir / LOCAL_FILE


def site_epochs(site: SiteConfig, asked: int) -> int:
    """The fine-tuning epochs this site runs: the run's ``personalize-epochs``, lowered (or
    refused: 0) by the site file's ``personalize``."""
    asked = max(0, int(asked))
    cap = site.personalize_max_epochs
    return asked if cap is None else min(asked, cap)


def stages_of(kind: str, which: str) -> list[str]:
    """Stages fine-tuned: ``unet`` for the U-Net; for ADDiff-Dose both stages or the diffusion one."""
    if kind == "unet":
        return ["unet"]
    return ["diffusion"] if which == "diffusion" else ["vae", "diffusion"]


def planned_extra(site: SiteConfig, kind: str, asked: int, which: str) -> int:
    """Local epochs personalization adds to a DP site's plan (its noise is calibrated once for all)."""
    return site_epochs(site, asked) * len(stages_of(kind, which))


def _tag(run_tag: str, what: str) -> str:
    """The optimiser-state run tag of ``what`` (16 hex digits, apart from the federated rounds')."""
    return hashlib.sha256(f"{run_tag}:{what}".encode()).hexdigest()[:16]


def _put(task: SiteTask, arrays: dict[str, np.ndarray]) -> None:
    """Weights into the site's model, nothing cached (unlike ``load_global``)."""
    state = task.model.state_dict()
    missing = sorted(set(state) - set(arrays))
    if missing:
        raise ValueError(f"the model lacks weights {missing[:3]}")
    state.update({k: v.to(state[k].dtype) for k, v in arrays_to_state(arrays).items() if k in state})
    task.model.load_state_dict(state)


def _train_stages(task: SiteTask, plan: list[tuple[str, int]], *, seed: int, tag: str,
                  planned_epochs: int | None) -> None:
    task.model.train()  # after an evaluation the model is in eval mode, which Opacus refuses to wrap
    for i, (stage, epochs) in enumerate(plan):
        if epochs > 0:  # each stage one "round" numbered in stage order, its optimiser fresh
            task.train(None, stage, epochs=epochs, round_number=i + 1, stage_round=1, seed=seed, run_tag=tag,
                       planned_epochs=planned_epochs)


def fine_tune(task: SiteTask, global_arrays: dict[str, np.ndarray], *, epochs: int, which: str = "both",
              seed: int = 0, run_tag: str = "", planned_epochs: int | None = None) -> dict[str, np.ndarray]:
    """The global model fine-tuned for ``epochs`` per stage on the site's training cases, saved as
    ``personalized.pt``; returns its arrays.

    Raises:
        PrivacyBudgetExhausted: a DP site's budget does not cover the fine-tuning (nothing saved).
    """
    _put(task, global_arrays)
    plan = [(st, epochs) for st in stages_of(task.cfg.kind, which)]
    _train_stages(task, plan, seed=seed, tag=_tag(run_tag, "personalize"), planned_epochs=planned_epochs)
    save_checkpoint(personalized_path(task.site), task.model.state_dict(), task.cfg,
                    {"what": "personalized", "site": task.site.name, "epochs": epochs,
                     "stages": [st for st, _ in plan], "from": "the final global model of a federated run"})
    return state_to_arrays(task.model.state_dict())


def train_local(task: SiteTask, initial: dict[str, np.ndarray], stage_epochs: dict[str, int], *, seed: int = 0,
                run_tag: str = "", planned_epochs: int | None = None) -> dict[str, np.ndarray]:
    """The site alone: from the federation's ``initial`` model, each stage for ``stage_epochs[stage]``
    epochs in one go; saved as ``cross_site_local.pt``; returns its arrays.

    Raises:
        PrivacyBudgetExhausted: a DP site's budget does not cover it (nothing saved).
    """
    _put(task, initial)
    plan = [(st, int(stage_epochs.get(st, 0))) for st in stages_of(task.cfg.kind, "both")]
    _train_stages(task, plan, seed=seed, tag=_tag(run_tag, "local"), planned_epochs=planned_epochs)
    save_checkpoint(local_path(task.site), task.model.state_dict(), task.cfg,
                    {"what": "local", "site": task.site.name, "epochs": dict(plan),
                     "from": "the federation's initial model, this site's cases only"})
    return state_to_arrays(task.model.state_dict())


def evaluate_at_home(task: SiteTask, arrays: dict[str, np.ndarray], *, seed: int = 0, steps: int | None = None,
                     gamma: bool = False) -> dict[str, float]:
    """Held-out metrics of ``arrays`` at this site (what ``addiff evaluate`` of its checkpoint gives)."""
    from .training import evaluate

    _put(task, arrays)
    res = evaluate(task.model, task.data.heldout, task.cfg, task.device, seed=seed, steps=steps, gamma=gamma,
                   progress=task.progress)
    return {"num_cases": float(res["num_cases"]), **res["mean"]}
