"""Sample-level differential privacy for one site (Opacus DP-SGD), budgeted over the whole run.

The noise multiplier is calibrated once for every step of the planned run and stored with the
accountant's history in the site's state folder; every round restores it and is refused if it
would push epsilon past the site file's current ``target_epsilon``. A round is charged the steps
and sampling rate of the cases loaded now; a ledger is keyed to the data as well as the name
(:func:`ledger_key`), so a renamed site continues it (issue #29.3-5). Nothing here talks to the server.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from .checkpoint import atomic_write_bytes
from .config import PrivacyConfig
from .errors import UserError

log = logging.getLogger(__name__)

# Opacus is imported where it is used: every ClientApp process imports this module and most sites
# train without DP (BENCHMARKS.md, "Test suite time").

STATE_FILE = "privacy_accountant.json"
EPS_TOLERANCE = 1e-6
MICROBATCH = "microbatch"  # grad_sample_mode: one backward pass per sample (per_sample_backward)


def per_sample_backward(loss_fn, params: list[torch.nn.Parameter], batch: dict) -> tuple[torch.Tensor, dict]:
    """Exact per-sample gradients by one forward/backward pass per sample ("microbatches" of 1,
    as TF Privacy does): each parameter gets ``grad_sample`` (N, *shape) for Opacus' DPOptimizer
    to clip, sum and noise. Opacus' own modes are slower on a CPU (BENCHMARKS.md, "Differential
    privacy"). Returns the mean loss over the samples and the mean of the loss parts (for logging)."""
    n = int(batch["dose"].shape[0])
    grads: list[list[torch.Tensor]] = [[] for _ in params]
    loss_sum, parts_sum = 0.0, {}
    for i in range(n):
        one = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
        for p in params:
            p.grad = None
        loss, parts = loss_fn(one)
        loss.backward()
        for g, p in zip(grads, params):
            g.append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        loss_sum += float(loss.detach())
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
    for g, p in zip(grads, params):
        p.grad = None
        p.grad_sample = torch.stack(g)
    return torch.tensor(loss_sum / max(n, 1)), {k: v / max(n, 1) for k, v in parts_sum.items()}


def poisson_loader(dataset, sample_rate: float, generator: torch.Generator | None = None,
                   steps: int | None = None) -> DataLoader:
    """Poisson-sampled batches (each sample in with probability ``sample_rate``, ``steps`` batches an
    epoch, default int(1/q)), empty ones keeping the sample dict's structure with batch size 0:
    Opacus' DPDataLoader (the same sampler) builds empty batches from tuple samples only."""
    template = dataset[0]

    def collate(items):
        if not items:
            return {k: v.new_zeros((0, *v.shape)) for k, v in template.items()}
        return default_collate(items)

    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate, generator=generator,
                                            steps=steps)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)


class PrivacyBudgetExhausted(UserError, RuntimeError):
    """The next round would exceed the site's epsilon budget: the site must not train. One line,
    no path (a ClientApp sends it to the server as its reason; the command line prints it)."""


@dataclass(frozen=True)
class LedgerKey:
    """Whose patients a ledger accounts for: the site's name and SHA-256 digests of its data
    folder, of its training case ids, and of both (the data, as the site loads it now)."""

    site: str = ""
    folder: str = ""
    cases: str = ""
    data: str = ""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ledger_key(site: str, data_dir: Path, case_ids: Iterable[str]) -> LedgerKey:
    """The key of a site's ledger: its name, its data folder (resolved) and its training cases."""
    folder, ids = str(Path(data_dir).resolve()), sorted(map(str, case_ids))
    return LedgerKey(site, _digest(folder), _digest(*ids), _digest(folder, *ids))


def make_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if kind == "rdp" else PRVAccountant()


def default_delta(num_train: int) -> float:
    """A delta well below 1 / n (the usual requirement): 1 / (10 n)."""
    return 1.0 / (10.0 * max(num_train, 1))


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at Opacus' default orders; cached, as the slow part of
    an epsilon and the same (sigma, q) every round."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                             orders=RDPAccountant.DEFAULT_ALPHAS))


@functools.lru_cache(maxsize=64)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":  # RDP composes linearly in steps: what RDPAccountant.get_epsilon sums
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(np.asarray(_rdp_of_one_step(nm, q)) * steps for nm, q, steps in history)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = make_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon an Opacus accountant computes for a history of (noise_multiplier, sample_rate, steps)
    (the same number; cached, so the per-round budget checks and reports cost nothing)."""
    if not history:
        return 0.0
    return _epsilon_cached(tuple((float(a), float(b), int(c)) for a, b, c in history), float(delta), accountant)


@dataclass
class PrivacyState:
    """What a site keeps about its privacy spending (persisted as JSON in its state directory)."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    target_epsilon: float | None
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)
    # the data it accounts for (LedgerKey; "" in ledgers begun before #29)
    site: str = ""
    folder_key: str = ""
    cases_key: str = ""
    data_key: str = ""
    continued: list[str] = field(default_factory=list)  # the site names whose ledgers this one took over

    def same_data(self, key: LedgerKey) -> bool:
        """True if this ledger accounts for the data of ``key``: the same data folder or the
        same training cases."""
        return bool((key.folder and self.folder_key == key.folder) or (key.cases and self.cases_key == key.cases))

    def set_key(self, key: LedgerKey) -> None:
        if key.data and self.data_key and key.data != self.data_key:
            log.warning("privacy: the training cases or the data folder changed since this ledger's last round; the "
                        "ledger goes on (the spending of the patients it covered stays in it)")
        if key.data:
            self.site, self.folder_key, self.cases_key, self.data_key = key.site, key.folder, key.cases, key.data

    @property
    def steps_taken(self) -> int:
        return int(sum(h[2] for h in self.history))

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        return epsilon_of(self.history + [(self.noise_multiplier, self.sample_rate, steps)], self.delta, self.accountant)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["history"] = [list(h) for h in self.history]
        d["continued"] = list(self.continued)
        d["epsilon"] = self.epsilon()
        return d


class SitePrivacy:
    """Opacus DP-SGD for one site with a persistent, cumulative accountant."""

    def __init__(self, cfg: PrivacyConfig, state_dir: Path, *, num_train: int, batch_size: int, planned_steps: int,
                 key: LedgerKey | None = None):
        self.cfg = cfg
        self.path = Path(state_dir) / STATE_FILE
        self.key = key or LedgerKey()
        # what a round will run, from the cases loaded now (Opacus: q = 1 / steps, steps batches an epoch)
        self.steps_per_epoch = max(1, math.ceil(num_train / batch_size))
        sample_rate = 1.0 / self.steps_per_epoch
        stored = self._open_ledger(Path(state_dir))
        if stored is not None:
            self.state = stored
            self._follow_the_site(sample_rate, planned_steps, num_train)
            return
        delta = cfg.delta if cfg.delta is not None else default_delta(num_train)
        if delta >= 1.0 / max(num_train, 1):
            log.warning("privacy.delta %.3g is not below 1/n = %.3g for %d training cases", delta, 1 / num_train, num_train)
        if cfg.noise_multiplier is not None:
            sigma = float(cfg.noise_multiplier)
        else:
            from opacus.accountants.utils import get_noise_multiplier

            sigma = float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=planned_steps,
                                               accountant=cfg.accountant, epsilon_tolerance=0.01))
        self.state = PrivacyState(accountant=cfg.accountant, noise_multiplier=sigma, sample_rate=sample_rate,
                                  delta=delta, max_grad_norm=cfg.max_grad_norm, target_epsilon=cfg.target_epsilon,
                                  planned_steps=planned_steps)
        self.state.set_key(self.key)
        self.save()

    def steps_for(self, epochs: int) -> int:
        """The DP steps ``epochs`` local epochs take (what the budget check counts and the loader runs)."""
        return int(epochs) * self.steps_per_epoch

    # -- the ledger ---------------------------------------------------------------------------
    def _open_ledger(self, state_dir: Path) -> PrivacyState | None:
        """This site's ledger; without one, the ledgers kept for the same data under other names
        (sibling state folders) combined; None if there is none (a new ledger)."""
        own = self.stored_state(state_dir)
        others = [(name, st) for name, st in self._same_data_elsewhere(state_dir)
                  if own is None or name not in own.continued]
        for name, st in others:
            log.warning("privacy: a ledger for the same data exists under the site name %r (epsilon %.3f spent)%s",
                        name, st.epsilon(), "; the patients' spending is this ledger's and that one's together"
                        if own is not None else "; this site continues it")
        if own is not None or not others:
            return own
        base = max((st for _, st in others), key=lambda st: st.epsilon())
        history = [h for _, st in others for h in st.history]  # RDP composes: every release counts
        continued = sorted({name for name, st in others} | {n for _, st in others for n in st.continued})
        state = dataclasses.replace(base, history=history, continued=continued)
        state.set_key(self.key)
        self.state = state
        self.save()
        return state

    def _same_data_elsewhere(self, state_dir: Path) -> list[tuple[str, PrivacyState]]:
        """(site name, ledger) of the sibling state folders' ledgers of the same data."""
        if not (self.key.folder or self.key.cases):
            return []
        here = state_dir.resolve()
        out = []
        for path in sorted(here.parent.glob(f"*/{STATE_FILE}")):
            if path.parent.resolve() == here:
                continue
            try:
                st = self.stored_state(path.parent)
            except (OSError, ValueError, TypeError, KeyError):  # not a ledger this code wrote: not ours
                continue
            if st is not None and st.same_data(self.key):
                out.append((st.site or path.parent.name, st))
        return out

    def _follow_the_site(self, sample_rate: float, planned_steps: int, num_train: int) -> None:
        """A stored ledger meets today's site: its file's target, its cases' sampling rate."""
        st, cfg = self.state, self.cfg
        if st.target_epsilon != cfg.target_epsilon:
            log.warning("privacy: target_epsilon is %s in the site file, %s when this ledger began: the site file's "
                        "is the ceiling", cfg.target_epsilon, st.target_epsilon)
            st.target_epsilon = cfg.target_epsilon
        if abs(st.sample_rate - sample_rate) > 1e-12:
            log.warning("privacy: %d training cases now, %d step(s) an epoch: sampling rate %.4g (was %.4g); rounds "
                        "are charged at the new rate", num_train, self.steps_per_epoch, sample_rate, st.sample_rate)
            st.sample_rate = sample_rate
        if st.planned_steps != planned_steps:
            log.warning("privacy plan changed since this site's accounting started (planned steps %d -> %d); "
                        "keeping the stored noise multiplier %.4f so that the budget stays consistent",
                        st.planned_steps, planned_steps, st.noise_multiplier)
        if st.delta >= 1.0 / max(num_train, 1):
            log.warning("privacy: the ledger's delta %.3g is not below 1/n = %.3g for %d training cases now",
                        st.delta, 1 / max(num_train, 1), num_train)
        st.set_key(self.key)

    # -- persistence ------------------------------------------------------------------------
    @staticmethod
    def stored_state(state_dir: Path) -> PrivacyState | None:
        """The accountant state stored in ``state_dir`` (None if the site never trained with DP)."""
        path = Path(state_dir) / STATE_FILE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(PrivacyState)}}
        d["history"] = [(float(a), float(b), int(c)) for a, b, c in d["history"]]
        return PrivacyState(**d)

    def save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.state.to_json(), indent=2).encode())

    # -- budget -----------------------------------------------------------------------------
    def check_budget(self, steps: int) -> None:
        """Raise PrivacyBudgetExhausted if the epsilon spent is already above the site file's
        target, or if taking ``steps`` more steps (``steps_for``) would exceed it."""
        target = self.state.target_epsilon
        if target is None:
            return
        limit = target * (1 + EPS_TOLERANCE) + 1e-9
        spent = self.state.epsilon()
        if spent > limit:
            raise PrivacyBudgetExhausted(
                f"privacy budget: epsilon {spent:.3f} already spent, above the site file's target_epsilon {target:g}: "
                f"this site does not train again (after {self.state.steps_taken} steps)")
        eps_next = self.state.epsilon_after(steps)
        if eps_next > limit:
            raise PrivacyBudgetExhausted(
                f"privacy budget: epsilon would reach {eps_next:.3f} > target {target:g} "
                f"(spent {spent:.3f} after {self.state.steps_taken} steps)")

    def metrics(self) -> dict[str, float]:
        return {"dp_enabled": 1.0, "epsilon": self.state.epsilon(), "delta": self.state.delta,
                "noise_multiplier": self.state.noise_multiplier, "dp_steps": float(self.state.steps_taken)}

    # -- training -----------------------------------------------------------------------------
    @property
    def per_sample_backward(self) -> bool:
        """True: the training loop computes per-sample gradients itself (``per_sample_backward``)."""
        return self.cfg.grad_sample_mode == MICROBATCH

    @property
    def opacus_grad_sample_mode(self) -> str:
        return "no_op" if self.per_sample_backward else self.cfg.grad_sample_mode

    def make_private(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader):
        """Wrap (module, optimizer, loader) for DP-SGD with Poisson sampling; history restored."""
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=self.state.accountant)
        engine.accountant.history = list(self.state.history)
        module, optimizer, loader = engine.make_private(
            module=module, optimizer=optimizer,
            data_loader=poisson_loader(loader.dataset, self.state.sample_rate, loader.generator, self.steps_per_epoch),
            noise_multiplier=self.state.noise_multiplier, max_grad_norm=self.state.max_grad_norm,
            poisson_sampling=False, grad_sample_mode=self.opacus_grad_sample_mode)
        self._engine = engine
        self._wrapped = module
        return module, optimizer, loader

    def commit(self) -> float:
        """Store the accountant history after training; returns the cumulative epsilon."""
        self.state.history = [(float(a), float(b), int(c)) for a, b, c in self._engine.accountant.history]
        self.save()
        self._wrapped._close()  # remove Opacus' hooks: the next round wraps the module afresh
        return self.state.epsilon()
