"""Flower's strategies, subclassed for a staged model whose stages travel separately.

What the subclasses add (the maths is Flower's):

* replies are aggregated in a fixed order (by site name), so a run is bit-for-bit reproducible
  whatever order the SuperNodes answer in (``resume`` ends with the same weights);
* FedAdam: its moments belong to one stage's parameters; when the stage changes (VAE ->
  diffusion) they start from zero. Non-trainable buffers (e.g. ``diffusion.latent_scale``)
  are averaged as in FedAvg instead of taking an adaptive step from their previous value.
* FedMedian and FedTrimmedAvg (robust aggregation) work element-wise, so they apply unchanged
  to the packed wire arrays (``addiff_core.wire.encode``: the packing of the weights);
* ``state_dict()`` / ``load_state_dict()`` export the server-side optimiser state (FedAdam
  moments) for the round checkpoint, and restore it on resume.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg,
)
from addiff_core.wire import METRICS_KEY, NUM_EXAMPLES, SITE_KEY

from .flower_compat import aggregate_arrayrecords
from .settings import DEFAULTS, STRATEGIES, CentralDPParams, FedAdamParams, check_central_dp


def site_of(msg: Message) -> str:
    """The site name a reply carries (``site`` ConfigRecord), else ``node-<id>``."""
    try:
        if not msg.has_error() and SITE_KEY in msg.content.config_records:
            name = str(msg.content.config_records[SITE_KEY]["name"])
            if name:  # "" from a site that failed before reading its site file
                return name
    except (KeyError, AttributeError):
        pass
    return f"node-{msg.metadata.src_node_id}"


def ordered(replies: Iterable[Message]) -> list[Message]:
    return sorted(replies, key=lambda m: (site_of(m), m.metadata.src_node_id))


class _Staged:
    """Mixin: deterministic aggregation order, (empty) server-side state, and the names of the
    non-trainable buffers (``buffer_keys``) that travel unpacked."""

    def __init__(self, *, buffer_keys: Iterable[str] = (), **kw):
        super().__init__(**kw)
        self.buffer_keys = frozenset(buffer_keys)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, ordered(replies))  # type: ignore[misc]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StagedFedAvg(_Staged, FedAvg):
    """FedAvg weighted by each site's number of training cases (``num-examples``)."""


class StagedFedProx(_Staged, FedProx):
    """FedProx: FedAvg on the server; ``proximal-mu`` goes to the sites in the train config and
    SiteTask.train adds mu/2 ||w - w_global||^2 to the local loss."""


class StagedFedMedian(_Staged, FedMedian):
    """Robust: the element-wise median of the sites' weights (one bad site cannot move it far)."""


class StagedFedTrimmedAvg(_Staged, FedTrimmedAvg):
    """Robust: the element-wise mean after cutting the ``beta`` fraction of values at each end."""


class StagedFedAdam(_Staged, FedAdam):
    """FedAdam (Reddi et al.) with moments per stage and plain averaging of buffers."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.stage_keys: frozenset[str] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        keys = frozenset(arrays.keys())
        if self.stage_keys is not None and keys != self.stage_keys:
            self.m_t = None  # a new stage: new parameters, fresh moments
            self.v_t = None
        self.stage_keys = keys
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ordered(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not self.buffer_keys & set(arrays.keys()):
            return arrays, metrics
        valid = [m.content for m in replies if not m.has_error()]
        mean = aggregate_arrayrecords(valid, self.weighted_by_key)
        out = {k: (mean[k] if k in self.buffer_keys else a) for k, a in arrays.items()}
        return ArrayRecord(out), metrics

    def state_dict(self) -> dict:
        def plain(d):
            return {k: np.asarray(v).copy() for k, v in (d or {}).items()}

        return {"m_t": plain(self.m_t), "v_t": plain(self.v_t), "stage_keys": sorted(self.stage_keys or [])}

    def load_state_dict(self, state: dict) -> None:
        def arrays(d):
            return {k: np.asarray(v) for k, v in d.items()} or None

        self.m_t = arrays(state.get("m_t", {}))
        self.v_t = arrays(state.get("v_t", {}))
        keys = state.get("stage_keys") or []
        self.stage_keys = frozenset(keys) if keys else None


UNIFORM_KEY = "central-dp-weight"


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Client-level central DP: Flower's server-side fixed clipping wrapper around a uniformly
    weighted FedAvg. Each site's update is clipped to L2 norm ``clipping_norm`` and Gaussian noise
    of std ``noise_multiplier * clipping_norm / n`` is added to the mean of the ``n`` aggregated
    updates, i.e. the Gaussian mechanism on the mean with sensitivity ``clipping_norm / n``
    (uniform weights: a case-weighted mean would have a larger sensitivity). The cumulative
    client-level epsilon is the RDP composition of one such release per round (Opacus'
    accountant, sampling rate 1: every connected site takes part in every round)."""

    def __init__(self, inner, *, noise_multiplier: float, clipping_norm: float, delta: float):
        super().__init__(inner, noise_multiplier, clipping_norm, num_sampled_clients=1)
        self.delta = float(delta)
        self.releases = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ordered(replies)
        for r in replies:  # uniform weights (see class docstring)
            r.content[METRICS_KEY][UNIFORM_KEY] = 1.0
        self.num_sampled_clients = max(len(replies), 1)  # noise std = sigma * C / (updates averaged)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
        metrics = MetricRecord({k: v for k, v in dict(metrics or {}).items() if k != UNIFORM_KEY})
        metrics["central_dp_epsilon"] = self.epsilon()
        return arrays, metrics

    def epsilon(self) -> float:
        from addiff_core.privacy import epsilon_of

        return epsilon_of([(self.noise_multiplier, 1.0, self.releases)], self.delta) if self.releases else 0.0

    def state_dict(self) -> dict:
        return {"central_dp_releases": self.releases}

    def load_state_dict(self, state: dict) -> None:
        self.releases = int(state.get("central_dp_releases", 0))


def build_strategy(name: str, *, min_sites: int, proximal_mu: float = DEFAULTS["proximal-mu"],
                   fedadam: FedAdamParams = FedAdamParams(), buffer_keys: Iterable[str] = (),
                   trim_beta: float = DEFAULTS["trim-beta"], central_dp: CentralDPParams = CentralDPParams()):
    """The strategy named in the run config (``settings.STRATEGIES``: its class and the run-config
    keys of its hyper-parameters); every connected site trains every round (a round starts once
    ``min_sites`` SuperNodes are connected)."""
    info = STRATEGIES.get(name)
    if info is None:
        raise ValueError(f"unknown strategy {name!r}")
    check_central_dp(name, central_dp.noise)
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=min_sites, min_available_nodes=min_sites, weighted_by_key=NUM_EXAMPLES)
    cls = globals()[info.cls]  # a class of this module (tests/test_federation_strategy.py builds each)
    if central_dp.noise > 0:
        inner = cls(**{**common, "weighted_by_key": UNIFORM_KEY})
        return CentralDP(inner, noise_multiplier=central_dp.noise, clipping_norm=central_dp.clip,
                         delta=central_dp.delta)
    values = {**DEFAULTS, "proximal-mu": proximal_mu, "trim-beta": trim_beta, "fedadam-eta": fedadam.eta,
              "fedadam-beta-1": fedadam.beta_1, "fedadam-beta-2": fedadam.beta_2, "fedadam-tau": fedadam.tau}
    return cls(**common, buffer_keys=buffer_keys, **{kw: values[key] for key, kw in info.params.items()})
