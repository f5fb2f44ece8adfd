"""What one hospital does with its own cases: train a stage or evaluate, in a federated round
(the ClientApp) or alone (``addiff train``, ``local.py``), with no Flower in sight.

The ClientApp (``client/``) turns Flower messages into calls of :class:`SiteTask` and back.
Weights travel as ``dict[str, numpy.ndarray]`` keyed by the model's state-dict names; a stage
ships only its own prefix (``vae.``, ``diffusion.`` or ``unet.``). In stage 2 the frozen global
VAE is not sent again every round: the site keeps the last global VAE it received in its own
state directory and uses it (``MissingGlobalWeights`` if it never received one).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, SiteConfig, resolve_device
from .data import SiteData, load_site_data
from .errors import CheckpointError
from .models import build_model, stage_prefix
from .optimizer_state import OptimizerStore
from .phantom_calibration import calibrate_on_phantoms
from .privacy import SitePrivacy, ledger_key
from .round_plan import RoundPlan
from .run_summary import ZERO_DOSE_KEY
from .training import Proximal, evaluate, lr_at, make_loader, make_optimizer, set_lr, set_trainable, train_stage_epoch

log = logging.getLogger(__name__)


class MissingGlobalWeights(RuntimeError):
    """The round needs global weights this site never received (e.g. the VAE in stage 2)."""


def initial_arrays(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded initial global model, as arrays."""
    return initial_model_state(cfg, seed)[0]


def initial_model_state(cfg: ModelConfig, seed: int = 0) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    """(:func:`initial_arrays`, the names of its trainable parameters: the rest are buffers), from
    one seeded build of the model; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    return state_to_arrays(model.state_dict()), frozenset(n for n, _ in model.named_parameters())


def state_to_arrays(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items() if k.startswith(prefix)}


def arrays_to_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def round_seed(seed: int, round_number: int, site_name: str) -> int:
    """A seed that differs per site and per round but is reproducible (resume gives equal weights)."""
    return (seed * 1_000_003 + round_number * 7919 + zlib.crc32(site_name.encode())) % (2**31 - 1)


@dataclass
class TrainResult:
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # per local epoch (stays at the site)


class SiteTask:
    """One site's model, data and device; ``train`` and ``evaluate`` are what a round asks for."""

    def __init__(self, site: SiteConfig, model_cfg: ModelConfig, *, progress: bool = False):
        self.site = site
        self.cfg = model_cfg
        self.device = resolve_device(site.device)
        self.progress = progress
        self.data: SiteData = load_site_data(site, model_cfg.grid)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(site.training.seed)
            self.model = build_model(model_cfg).to(self.device)
        log.info("site %s: %d training, %d held-out cases on %s (%d skipped)", site.name, self.data.num_train,
                 len(self.data.heldout), self.device, len(self.data.skipped))

    # -- weights --------------------------------------------------------------------------
    @property
    def _vae_cache(self) -> Path:
        return self.site.state_dir / "global_vae.pt"

    def load_global(self, arrays: dict[str, np.ndarray], stage: str | None = None) -> None:
        """Put the received global arrays into the model; fill in the cached VAE in stage 2."""
        state = self.model.state_dict()
        unknown = sorted(set(arrays) - set(state))
        if unknown:
            raise ValueError(f"received weights this model does not have: {unknown[:3]}")
        new = arrays_to_state(arrays)
        vae_keys = [k for k in state if k.startswith("vae.")]
        if vae_keys and all(k in new for k in vae_keys):
            save_checkpoint(self._vae_cache, {k: new[k] for k in vae_keys}, self.cfg, {"what": "global VAE"})
        elif vae_keys and stage in ("diffusion", None):
            try:
                cached, _, _ = load_checkpoint(self._vae_cache)
            except CheckpointError as e:
                raise MissingGlobalWeights(f"site {self.site.name}: no global VAE received yet ({e})") from None
            new = {**cached, **new}
        missing = set(state) - set(new)
        needed = {k for k in missing if stage is None or k.startswith(stage_prefix(stage))}
        if needed:
            raise MissingGlobalWeights(f"site {self.site.name}: round lacks weights {sorted(needed)[:3]}")
        state.update({k: v.to(state[k].dtype) for k, v in new.items()})
        self.model.load_state_dict(state)

    def stage_arrays(self, stage: str) -> dict[str, np.ndarray]:
        return state_to_arrays(self.model.state_dict(), stage_prefix(stage))

    # -- round work -----------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.data.num_train // self.site.training.batch_size))

    def privacy(self, planned_epochs: int) -> SitePrivacy | None:
        """The site's DP accountant (restored from its state directory), or None without DP."""
        if not self.site.privacy.enabled:
            return None
        return SitePrivacy(self.site.privacy, self.site.state_dir, num_train=self.data.num_train,
                           batch_size=self.site.training.batch_size,
                           planned_steps=planned_epochs * self.steps_per_epoch(),
                           key=ledger_key(self.site.name, self.site.data_dir, self.data.train.case_ids))

    def privacy_spent(self) -> dict[str, float]:
        """What this site has spent so far, from its stored accountant (nothing is planned or
        written): ``dp_enabled`` and, with DP, ``epsilon`` and ``delta``."""
        if not self.site.privacy.enabled:
            return {"dp_enabled": 0.0}
        state = SitePrivacy.stored_state(self.site.state_dir)
        if state is None:  # no private training yet
            return {"dp_enabled": 1.0, "epsilon": 0.0}
        return {"dp_enabled": 1.0, "epsilon": state.epsilon(), "delta": state.delta}

    def train(self, arrays: dict[str, np.ndarray] | None, plan: RoundPlan) -> TrainResult:
        """Train ``plan.stage`` for the plan's local epochs from the global ``arrays`` (None: the
        current weights).

        The DP noise is calibrated once for the plan's ``planned_epochs`` (the whole run at this
        site, both stages and fine-tuning).

        Raises:
            PrivacyBudgetExhausted: before touching the model, when this round would exceed the budget.
        """
        plan = plan.at_site(self.site, self.cfg.kind)
        stage, epochs, round_number = plan.stage, plan.epochs, plan.round_number
        tcfg = self.site.training
        dp = self.privacy(plan.planned_epochs)
        if dp is not None:
            dp.check_budget(dp.steps_for(epochs))  # the steps and sampling rate of the cases loaded now
        if arrays is not None:
            self.load_global(arrays, stage)
        rs = round_seed(plan.seed, round_number, self.site.name)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(rs)
            set_trainable(self.model, stage)
            module = getattr(self.model, stage)
            optimizer = make_optimizer(module.parameters(), tcfg)
            optim_store = OptimizerStore(self.site.state_dir, plan.run_tag)
            optim_store.restore(optimizer, stage, round_number, stage_start=plan.stage_start)
            loader = make_loader(self.data.train, tcfg.batch_size, shuffle=True, seed=rs)
            prox = Proximal.from_module(plan.proximal_mu, module) if plan.proximal_mu > 0 else None
            if dp is not None:  # Opacus hooks the module's layers; losses call the model as usual
                if stage == "diffusion":
                    # calibrating on private data would release an un-noised statistic: public phantoms
                    calibrate_on_phantoms(self.model, self.cfg.grid)
                _, optimizer, loader = dp.make_private(module, optimizer, loader)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(rs)
            history = []
            try:
                for e in range(epochs):
                    set_lr(optimizer, lr_at(tcfg, plan.epoch_offset + e, plan.total_epochs))
                    m = train_stage_epoch(
                        stage, self.model, loader, optimizer, self.cfg, self.device, generator=gen,
                        grad_clip=tcfg.grad_clip, prox=prox, progress=self.progress,
                        per_sample_grads=dp is not None and dp.per_sample_backward,
                        desc=f"{self.site.name} {stage} r{round_number} e{e + 1}/{epochs}")
                    history.append(m)
                    left = (epochs - e - 1) * sum(h["seconds"] for h in history) / len(history)
                    log.info("site %s: %s round %d epoch %d/%d: loss %.4f (%.1f s%s)", self.site.name, stage,
                             round_number, e + 1, epochs, m["loss"], m["seconds"],
                             f"; ~{left:.0f} s left in this round" if left > 0 else "")
            finally:
                if dp is not None:
                    dp.commit()
            optim_store.save(optimizer, stage, round_number)
        if dp is None:
            metrics = {f"train_{k}": float(v) for k, v in history[-1].items()} if history else {}
            metrics["skipped_cases"] = float(len(self.data.skipped))
            metrics["dp_enabled"] = 0.0
        else:  # with DP only what the accountant covers (or is public) leaves: no loss, no case counts
            metrics = dp.metrics()
        return TrainResult(self.stage_arrays(stage), self.data.num_train, metrics, history)

    def evaluate(self, arrays: dict[str, np.ndarray], *, seed: int = 0, steps: int | None = None,
                 gamma: bool = True) -> dict[str, float]:
        """Held-out metrics of the global model (numbers only: no case ids leave the site)."""
        self.load_global(arrays, None)
        res = evaluate(self.model, self.data.heldout, self.cfg, self.device, seed=seed, steps=steps, gamma=gamma,
                       progress=self.progress)
        return {"num_cases": float(res["num_cases"]), **res["mean"],
                ZERO_DOSE_KEY: zero_dose_mae(self.data.heldout.case_dirs)}


def zero_dose_mae(case_dirs) -> float:
    """Held-out MAE (Gy) of predicting 0 Gy everywhere: the mean over the cases of the mean planned
    dose in the region ``evaluate`` scores (``regions.evaluation_region``). A model
    whose ``mae_gy`` exceeds it is worse than no prediction at all. nan without cases."""
    from .case_io import load_case
    from .metrics import mae
    from .regions import region_array

    vals = []
    for d in case_dirs:
        case = load_case(d, require_dose=True)
        ref = case.array("dose")
        vals.append(mae(np.zeros_like(ref), ref, region_array(case)))
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")
