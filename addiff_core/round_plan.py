"""The arithmetic of a site's rounds, one owner: how many local epochs a round trains, which
epochs of the stage it is, and how many epochs the whole run asks of the site (a DP site
calibrates its noise once for all of them, fine-tuning included).

The server sends the numbers in the train config (``stage``, ``server-round``, ``stage-round``,
``stage-rounds``, ``local-epochs``, ``stage-plan``, ``personalize-epochs``,
``personalize-stages``, ``proximal-mu``, ``seed``, ``run-tag``); :meth:`RoundPlan.from_config`
reads and checks them once. The stage plan travels as a string, ``"vae:20,diffusion:4"``
(run-config values cannot be mappings): written by :func:`format_stage_plan`, read by
:func:`parse_stage_plan`, nowhere else.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import MAX_EPOCHS, MAX_ROUNDS, SiteConfig, TrainingConfig
from .contract import STAGES

PERSONALIZE_STAGES = ("both", "diffusion")


# ------------------------------------------------------------------------------------------
# the stage plan on the wire
# ------------------------------------------------------------------------------------------
def format_stage_plan(plan: Mapping[str, int]) -> str:
    """``{"vae": 20, "diffusion": 4}`` -> ``"vae:20,diffusion:4"`` (stages in run order)."""
    for stage, n in plan.items():
        if not stage or any(c in stage for c in ":,") or int(n) != n or n < 0:
            raise ValueError(f"stage plan: bad entry {stage!r}: {n!r}")
    return ",".join(f"{stage}:{int(n)}" for stage, n in plan.items())


def parse_stage_plan(text: str | None) -> dict[str, int]:
    """Inverse of :func:`format_stage_plan`; ``""`` -> ``{}`` (a server that sent no plan).

    Raises:
        ValueError: anything else than ``STAGE:ROUNDS`` entries separated by commas.
    """
    plan: dict[str, int] = {}
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        stage, sep, n = part.partition(":")
        if not sep or stage.strip() not in STAGES or not n.strip().isdigit() or int(n) > MAX_ROUNDS:
            raise ValueError(f"stage plan {text!r}: expected STAGE:ROUNDS entries (a stage of {', '.join(STAGES)}, "
                             f"at most {MAX_ROUNDS} rounds), got {part!r}")
        plan[stage.strip()] = int(n)
    return plan


# ------------------------------------------------------------------------------------------
# epochs
# ------------------------------------------------------------------------------------------
def stage_epochs(training: TrainingConfig, stage: str, asked: int = 0) -> int:
    """Local epochs of one round of ``stage``: ``asked`` (the run's ``local-epochs``), else the site file's."""
    return asked or (training.vae_epochs if stage == "vae" else training.diffusion_epochs)


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


def _number(cfg: Mapping[str, Any], key: str, default, kind=int, low=0, high=None):
    """A server's number, checked where it is used.

    Args:
        cfg: the message's config.
        key: the number's key; ``default`` when absent.
        kind: ``int`` or ``float``.
        low, high: the bounds (``high`` None: none).

    Raises:
        ValueError: not a number of ``kind``, not finite, or out of bounds (the key named, not the value).
    """
    raw = cfg.get(key, default)
    try:
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"round config: {key}: not a number") from None
    if isinstance(raw, float) and kind is int and raw != value or not math.isfinite(value) or value < low or \
            (high is not None and value > high):
        raise ValueError(f"round config: {key}: out of range")
    return value


SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed takes


def _seed_and_tag(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``seed`` (bounded by :data:`SEED_RANGE`) and ``run_tag`` of a train or evaluation message."""
    return {"seed": _number(cfg, "seed", 0, low=SEED_RANGE[0], high=SEED_RANGE[1]),
            "run_tag": str(cfg.get("run-tag", ""))}


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation message asks of a site: its sampling seed, DDIM steps (None: the
    model's own) and the run's tag, each bounded where the site reads it."""

    seed: int = 0
    steps: int | None = None
    run_tag: str = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], max_steps: int) -> EvalPlan:
        """Raises: ValueError: a seed out of torch's range, or steps above ``max_steps`` (the
        model's train_timesteps: a server could otherwise make a site sample without end)."""
        return cls(steps=_number(cfg, "eval-steps", 0, low=0, high=max_steps) or None, **_seed_and_tag(cfg))


@dataclass(frozen=True)
class RunPlan:
    """What the whole federated run asks of a site: its DP target."""

    stages: Mapping[str, int] = field(default_factory=dict)  # rounds per stage, in run order
    local_epochs: int = 0  # per round; 0: the site file's
    personalize_epochs: int = 0
    personalize_stages: str = "both"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunPlan:
        """Raises ValueError on a number out of range or a malformed stage plan."""
        which = str(cfg.get("personalize-stages", "both"))
        if which not in PERSONALIZE_STAGES:
            raise ValueError("round config: personalize-stages: not both or diffusion")
        return cls(stages=parse_stage_plan(str(cfg.get("stage-plan", ""))),
                   local_epochs=_number(cfg, "local-epochs", 0, high=MAX_EPOCHS),
                   personalize_epochs=_number(cfg, "personalize-epochs", 0, high=MAX_EPOCHS),
                   personalize_stages=which)

    def run_epochs(self, training: TrainingConfig) -> dict[str, int]:
        """Local epochs per stage this site trains in the federation (rounds x epochs per round;
        the local model's budget)."""
        return {st: n * stage_epochs(training, st, self.local_epochs) for st, n in self.stages.items()}

    def planned_epochs(self, site: SiteConfig, kind: str) -> int:
        """The run's epochs at this site, fine-tuning included."""
        extra = site_epochs(site, self.personalize_epochs) * len(stages_of(kind, self.personalize_stages))
        return sum(self.run_epochs(site.training).values()) + extra


@dataclass(frozen=True)
class RoundPlan:
    """One local training round of ``SiteTask.train``: a federated round, or a stage a site
    trains alone (then ``round_number`` is the stage's index, and ``epochs`` and
    ``planned_epochs`` are given)."""

    stage: str
    round_number: int  # seeds the data order, keys the stage's stored optimiser state
    epochs: int = 0  # 0: the run's local-epochs, else the site file's (at_site)
    stage_round: int | None = None  # the round's index within its stage; None: round_number
    stage_rounds: int = 1
    planned_epochs: int = 0  # the run's epochs at this site (DP noise); 0: from run, else this round's
    proximal_mu: float = 0.0
    seed: int = 0
    run_tag: str = ""  # keeps each federated run's optimiser states apart
    run: RunPlan = field(default_factory=RunPlan)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RoundPlan:
        """The plan of a train message's config.

        Raises:
            ValueError: a missing stage, a number out of range, a malformed stage plan.
        """
        stage = str(cfg.get("stage", ""))
        if stage not in STAGES:
            raise ValueError(f"round config: no stage of {', '.join(STAGES)}")
        rounds = _number(cfg, "stage-rounds", 1, low=1, high=MAX_ROUNDS)
        run = RunPlan.from_config(cfg)
        return cls(stage=stage, round_number=_number(cfg, "server-round", None), epochs=run.local_epochs,
                   stage_round=_number(cfg, "stage-round", 1, low=1, high=rounds), stage_rounds=rounds,
                   proximal_mu=_number(cfg, "proximal-mu", 0.0, kind=float), run=run, **_seed_and_tag(cfg))

    def at_site(self, site: SiteConfig, kind: str) -> RoundPlan:
        """This plan with ``epochs`` and ``planned_epochs`` as the site trains them."""
        epochs = stage_epochs(site.training, self.stage, self.epochs)
        planned = self.planned_epochs or self.run.planned_epochs(site, kind) or epochs
        return dataclasses.replace(self, epochs=epochs, planned_epochs=planned)

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole stage (the learning-rate schedule spans them)."""
        return self.epochs * self.stage_rounds

    @property
    def epoch_offset(self) -> int:
        """Epochs of the stage before this round."""
        return self.epochs * ((self.stage_round or 1) - 1)

    @property
    def stage_start(self) -> int:
        """The round at which this run's stage began (older optimiser states belong to another run)."""
        return self.round_number - (self.stage_round or self.round_number) + 1
