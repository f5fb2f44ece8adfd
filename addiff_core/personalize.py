"""A site's own models after a federated run (issue #25), Flower-free.

``personalized.pt``: the final global model fine-tuned on the site's training cases
(:func:`fine_tune`), sent only if the site file says ``share_models_for_evaluation: true``;
``cross_site_local.pt``: the site trained alone from the initial model with its federated budget
(:func:`train_local`). Both train through :meth:`site_task.SiteTask.train`, so a DP site spends from
its one accountant, under a run tag of their own (the federated optimiser states stay untouched),
and load weights directly, never through ``SiteTask.load_global`` (the cached global VAE and
``final_model.pt`` stay as they are).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .checkpoint import save_checkpoint
from .config import SiteConfig
from .site_task import SiteTask, arrays_to_state, state_to_arrays
from .round_plan import RoundPlan, stages_of

PERSONALIZED_FILE = "personalized.pt"
LOCAL_FILE = "cross_site_local.pt"


def personalized_path(site: SiteConfig) -> Path:
    return site.state_dir / PERSONALIZED_FILE


def local_path(site: SiteConfig) -> Path:
    return site.state_dir / LOCAL_FILE


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
            task.train(None, RoundPlan(stage, i + 1, epochs=epochs, stage_round=1, seed=seed, run_tag=tag,
                                       planned_epochs=planned_epochs or 0))


def fine_tune(task: SiteTask, global_arrays: dict[str, np.ndarray], *, epochs: int, which: str = "both",
              seed: int = 0, run_tag: str = "", planned_epochs: int | None = None) -> dict[str, np.ndarray]:
    """The global model fine-tuned on the site's training cases, saved as ``personalized.pt``.

    Args:
        task: the site; global_arrays: the final global model; epochs: per stage.
        which: "diffusion" (that stage only) or "both"; seed: training seed.
        run_tag: the run's tag (the fine-tuning's optimiser states get one of their own).
        planned_epochs: the run's epochs at this site, for the DP noise (None: the round's).

    Returns:
        the fine-tuned model's arrays.

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
    epochs in one go, saved as ``cross_site_local.pt``; returns its arrays. Other arguments as
    :func:`fine_tune`'s.

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
