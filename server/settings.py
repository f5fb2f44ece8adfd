"""The run configuration of a federation: parsed once, validated, paths resolved.

Keys and defaults mirror ``[tool.flwr.app.config]`` in pyproject.toml (``flwr run`` only
accepts overrides of keys declared there; ``tests/test_federation_strategy.py`` checks that
both agree); the defaults of :class:`RunSettings` are read from :data:`DEFAULTS`. The
aggregation strategies are :data:`STRATEGIES` (name -> class, hyper-parameters, help), read by
the commands' help, this validation and ``server.strategies.build_strategy``. Relative paths
resolve against :func:`client.protocol.project_root`.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from addiff_core.config import ConfigError, GridConfig, ModelConfig, load_model_config

from client.protocol import WIRE_DTYPES, resolve_path, split_list

DEFAULTS: dict[str, Any] = {
    "run-dir": "",
    "site-files": "sites/hospital_a.yaml,sites/hospital_b.yaml,sites/hospital_c.yaml",
    "model-config": "configs/demo.yaml",
    "model-kind": "",
    "grid-size": 0,
    "strategy": "fedavg",
    "vae-rounds": 8,
    "diffusion-rounds": 14,
    "unet-rounds": 17,  # about the CPU of 20 VAE + 4 diffusion rounds (BENCHMARKS.md, main job)
    "local-epochs": 0,
    "proximal-mu": 0.01,
    "fedadam-eta": 0.001,
    "fedadam-beta-1": 0.9,
    "fedadam-beta-2": 0.99,
    "fedadam-tau": 1e-5,
    "trim-beta": 0.2,
    "central-dp-noise": 0.0,
    "central-dp-clip": 1.0,
    "central-dp-delta": 1e-3,
    "min-sites": 0,
    "wait-sites": 0,
    "round-retries": 2,
    "max-num-examples": 100000,
    "update-norm-multiple": 10.0,
    "seed": 0,
    "round-timeout": 3600.0,
    "resume": False,
    "stop-after-round": 0,
    "eval-steps": 0,
    "eval-gamma": True,
    "report-figures": True,  # false: the end-of-run report without figures (addiff report RUN_DIR draws them later)
    "wire-dtype": "float32",  # float16: stage weights travel at half the bytes (client.protocol.WIRE_DTYPES)
    # secure aggregation (issue #26, docs/PRIVACY.md): the server unmasks only the weighted sum of the updates
    "secure-aggregation": False,
    "secagg-clip": 8.0,  # Flower's clipping range of a site's weighted update, per element
    "secagg-quantization": 67108864,  # 2^26 integer levels over [-clip, clip] (sites x levels < 2^32)
    "secagg-threshold": 0,  # shares that unmask a site's secret; 0: a strict majority of the round's sites (>= 2)
    "secagg-max-weight": 1000,  # example counts are divided by it until every site has declared its count
    # after the last round (issue #25, server/cross_site.py): every site's models on every site's held-out cases,
    # and each site's fine-tuned copy of the global model (never sent)
    "cross-site": False,
    "personalize-epochs": 0,
    "personalize-stages": "both",  # both | diffusion (the diffusion model; the unet has one stage)
}



# ------------------------------------------------------------------------------------------
# aggregation strategies: one row each (Flower-free, so that the command line's help can read it)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyInfo:
    """An aggregation strategy of the run config's ``strategy`` key."""

    cls: str  # class name in server.strategies
    params: Mapping[str, str]  # run-config key of each hyper-parameter -> the class's keyword argument
    help: str  # what it does, in a few words
    central_dp: bool = False  # may run under client-level central DP (central-dp-noise > 0)
    secure: bool = True  # needs only the weighted mean of the updates (secure-aggregation may hide the rest)


STRATEGIES: dict[str, StrategyInfo] = {
    "fedavg": StrategyInfo("StagedFedAvg", {}, "FedAvg weighted by training cases", central_dp=True),
    "fedprox": StrategyInfo("StagedFedProx", {"proximal-mu": "proximal_mu"},
                            "FedAvg + a proximal term at the sites (proximal-mu)"),
    "fedadam": StrategyInfo("StagedFedAdam", {"fedadam-eta": "eta", "fedadam-beta-1": "beta_1",
                                              "fedadam-beta-2": "beta_2", "fedadam-tau": "tau"},
                            "adaptive server optimiser (fedadam-eta, -beta-1, -beta-2, -tau)"),
    "fedmedian": StrategyInfo("StagedFedMedian", {}, "robust: element-wise median of the updates", secure=False),
    "fedtrimmedavg": StrategyInfo("StagedFedTrimmedAvg", {"trim-beta": "beta"},
                                  "robust: element-wise mean after cutting trim-beta at each end", secure=False),
}


def strategy_help() -> str:
    """The ``--strategy`` help of the commands: every strategy, in a few words."""
    return "aggregation: " + "; ".join(f"{name} ({info.help})" for name, info in STRATEGIES.items())


def check_central_dp(strategy: str, noise: float) -> None:
    """Central DP (``central-dp-noise > 0``) wraps a uniformly weighted FedAvg: the one place
    that rule is checked (run config validation and ``build_strategy``)."""
    if noise > 0 and not STRATEGIES[strategy].central_dp:
        ok = ", ".join(n for n, i in STRATEGIES.items() if i.central_dp)
        raise ConfigError(f"run config: central-dp-noise: central DP needs strategy {ok}, got {strategy!r}")


def check_secure_aggregation(c: Mapping[str, Any], strategy: str) -> None:
    """What secure aggregation cannot combine with, refused before any round (one line each):
    the server sees only the weighted mean of the updates, never one update."""
    if not c["secure-aggregation"]:
        return
    pre = "run config: secure-aggregation"
    if not STRATEGIES[strategy].secure:
        ok = ", ".join(n for n, i in STRATEGIES.items() if i.secure)
        raise ConfigError(f"{pre}: strategy {strategy} needs every site's update, which secure aggregation hides "
                          f"(use {ok})")
    if c["central-dp-noise"] > 0:
        raise ConfigError(f"{pre}: central DP (central-dp-noise) clips each site's update at the server, which "
                          "secure aggregation hides; use per-site DP-SGD (the site file's privacy section) instead")
    if c["update-norm-multiple"] not in (0.0, DEFAULTS["update-norm-multiple"]):
        raise ConfigError(f"{pre}: update-norm-multiple compares each site's update with the round's median, which "
                          "secure aggregation hides (the sites check their own update instead: docs/PRIVACY.md)")
    if not 0 < c["secagg-clip"] <= 1e6:
        raise ConfigError(f"{pre}: secagg-clip must be in (0, 1e6], got {c['secagg-clip']!r}")
    if not 2 <= c["secagg-quantization"] <= 2 ** 31:
        raise ConfigError(f"{pre}: secagg-quantization must be in [2, 2^31], got {c['secagg-quantization']!r}")
    if c["secagg-max-weight"] < 1:
        raise ConfigError(f"{pre}: secagg-max-weight must be >= 1, got {c['secagg-max-weight']!r}")
    if c["secagg-threshold"] == 1:
        raise ConfigError(f"{pre}: secagg-threshold 1 would let any one site unmask another's update (0: majority, or >= 2)")


# keys a resumed run may change; everything else comes from the run folder's run.json
RESUME_MAY_CHANGE = ("resume", "stop-after-round", "round-timeout", "min-sites", "wait-sites", "round-retries", "eval-steps",
                     "eval-gamma", "report-figures", "cross-site")


@dataclass(frozen=True)
class Round:
    number: int  # 1-based global round
    stage: str  # vae | diffusion | unet
    stage_round: int  # 1-based round within the stage
    stage_rounds: int


@dataclass(frozen=True)
class RunSettings:
    run_dir: Path
    site_files: tuple[Path, ...]
    model: ModelConfig
    model_config_file: Path | None
    strategy: str = DEFAULTS["strategy"]
    vae_rounds: int = DEFAULTS["vae-rounds"]
    diffusion_rounds: int = DEFAULTS["diffusion-rounds"]
    unet_rounds: int = DEFAULTS["unet-rounds"]
    local_epochs: int = DEFAULTS["local-epochs"]  # 0: each site's own training.vae_epochs / diffusion_epochs
    proximal_mu: float = DEFAULTS["proximal-mu"]
    fedadam: dict[str, float] = field(default_factory=dict)  # eta, beta_1, beta_2, tau (fedadam-* keys)
    trim_beta: float = DEFAULTS["trim-beta"]  # fedtrimmedavg: fraction cut at each end
    central_dp: dict[str, float] = field(default_factory=dict)  # noise (0: off), clip, delta
    min_sites: int = DEFAULTS["min-sites"]  # 0: as many as site_files
    wait_sites: int = DEFAULTS["wait-sites"]  # SuperNodes to wait for before the first round (0: min-sites)
    round_retries: int = DEFAULTS["round-retries"]  # a round with too few usable replies is tried again this often
    max_num_examples: int = DEFAULTS["max-num-examples"]  # a reply claiming more training cases is rejected
    # reject an update whose norm exceeds this x the round's median (0: off)
    update_norm_multiple: float = DEFAULTS["update-norm-multiple"]
    seed: int = DEFAULTS["seed"]
    round_timeout: float = DEFAULTS["round-timeout"]
    resume: bool = DEFAULTS["resume"]
    stop_after_round: int = DEFAULTS["stop-after-round"]
    eval_steps: int = DEFAULTS["eval-steps"]
    eval_gamma: bool = DEFAULTS["eval-gamma"]
    report_figures: bool = DEFAULTS["report-figures"]
    wire_dtype: str = DEFAULTS["wire-dtype"]
    secure_aggregation: bool = DEFAULTS["secure-aggregation"]
    raw: dict[str, Any] = field(default_factory=dict)  # the merged run config as given

    # -- schedule ---------------------------------------------------------------------------
    @property
    def schedule(self) -> list[Round]:
        if self.model.kind == "unet":
            stages = [("unet", self.unet_rounds)]
        else:
            stages = [("vae", self.vae_rounds), ("diffusion", self.diffusion_rounds)]
        out: list[Round] = []
        for stage, n in stages:
            for i in range(1, n + 1):
                out.append(Round(len(out) + 1, stage, i, n))
        return out

    @property
    def num_rounds(self) -> int:
        return len(self.schedule)

    @property
    def required_sites(self) -> int:
        return self.min_sites or max(len(self.site_files), 1)

    def to_json(self) -> dict[str, Any]:
        """Plain, resolved values (what run.json stores; ``from_run_config`` reads it back)."""
        d = dict(self.raw)
        d.update({"run-dir": str(self.run_dir), "site-files": ",".join(str(p) for p in self.site_files),
                  "model-config": str(self.model_config_file or "")})
        return d


# ------------------------------------------------------------------------------------------
def _check(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"run config: unknown key {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    for k, v in cfg.items():
        want = type(DEFAULTS[k])
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if want is bool and isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"run config: {k}: must be {want.__name__}, got {v!r}")
        if want is float and not math.isfinite(v):
            raise ConfigError(f"run config: {k}: must be finite, got {v!r}")
        if want in (int, float) and v < 0:
            raise ConfigError(f"run config: {k}: must be >= 0, got {v!r}")
        if k in UPPER and v > UPPER[k]:
            raise ConfigError(f"run config: {k}: at most {UPPER[k]}, got {v!r}")
        out[k] = v
    return out


# upper bounds: a typo (an extra zero) must not start a run that never ends or fills the memory
UPPER = {"grid-size": 512, "local-epochs": 10000, "vae-rounds": 10000, "diffusion-rounds": 10000,
         "unet-rounds": 10000, "round-retries": 100, "personalize-epochs": 10000}


def from_run_config(run_config: Mapping[str, Any]) -> RunSettings:
    """Validate a Flower run config (``context.run_config``, defaults filled in)."""
    c = _check(run_config)
    strategy = c["strategy"].lower()
    if strategy not in STRATEGIES:
        raise ConfigError(f"run config: strategy: must be one of {', '.join(STRATEGIES)}, got {c['strategy']!r}")
    site_files = tuple(resolve_path(p) for p in split_list(c["site-files"]))
    mc_file = resolve_path(c["model-config"]) if c["model-config"] else None
    model = load_model_config(mc_file) if mc_file else ModelConfig()
    if c["model-kind"]:
        if c["model-kind"] not in ("diffusion", "unet"):
            raise ConfigError(f"run config: model-kind: must be diffusion or unet, got {c['model-kind']!r}")
        model = replace(model, kind=c["model-kind"])
    if c["grid-size"]:
        model = replace(model, grid=GridConfig(**{**asdict(model.grid), "size": c["grid-size"]}))
        try:  # re-validate (divisibility etc.)
            from addiff_core.config import model_config_from_dict

            model = model_config_from_dict(json.loads(json.dumps(model.to_dict())), "run config (grid-size)")
        except ConfigError as e:
            raise ConfigError(f"run config: grid-size {c['grid-size']}: {e}") from None
    if model.kind == "diffusion" and (c["vae-rounds"] < 1 or c["diffusion-rounds"] < 1):
        raise ConfigError("run config: vae-rounds and diffusion-rounds must be >= 1 for the diffusion model")
    if model.kind == "unet" and c["unet-rounds"] < 1:
        raise ConfigError("run config: unet-rounds must be >= 1 for the unet model")
    if not 0.0 <= c["trim-beta"] < 0.5:
        raise ConfigError(f"run config: trim-beta: must be in [0, 0.5), got {c['trim-beta']!r}")
    check_central_dp(strategy, c["central-dp-noise"])
    check_secure_aggregation(c, strategy)
    if c["personalize-stages"] not in ("both", "diffusion"):
        raise ConfigError(f"run config: personalize-stages: must be both or diffusion, got {c['personalize-stages']!r}")
    if c["wire-dtype"] not in WIRE_DTYPES:
        raise ConfigError(f"run config: wire-dtype: must be one of {', '.join(WIRE_DTYPES)}, got {c['wire-dtype']!r}")
    if c["central-dp-noise"] > 0:
        if c["central-dp-clip"] <= 0:
            raise ConfigError("run config: central-dp-clip: must be > 0")
        if not 0 < c["central-dp-delta"] < 1:
            raise ConfigError(f"run config: central-dp-delta: must be in (0, 1), got {c['central-dp-delta']!r}")
    if c["max-num-examples"] < 1:
        raise ConfigError("run config: max-num-examples: must be >= 1")
    if 0 < c["update-norm-multiple"] < 1:
        raise ConfigError(f"run config: update-norm-multiple: must be 0 (off) or >= 1, got {c['update-norm-multiple']!r}")
    run_dir = c["run-dir"] or f"runs/run-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return RunSettings(
        run_dir=resolve_path(run_dir), site_files=site_files, model=model, model_config_file=mc_file,
        strategy=strategy, vae_rounds=c["vae-rounds"], diffusion_rounds=c["diffusion-rounds"],
        unet_rounds=c["unet-rounds"], local_epochs=c["local-epochs"], proximal_mu=c["proximal-mu"],
        fedadam={"eta": c["fedadam-eta"], "beta_1": c["fedadam-beta-1"], "beta_2": c["fedadam-beta-2"],
                 "tau": c["fedadam-tau"]},
        trim_beta=c["trim-beta"], min_sites=c["min-sites"],
        central_dp={"noise": c["central-dp-noise"], "clip": c["central-dp-clip"], "delta": c["central-dp-delta"]}, round_retries=c["round-retries"], wait_sites=c["wait-sites"],
        max_num_examples=c["max-num-examples"], update_norm_multiple=c["update-norm-multiple"], seed=c["seed"], round_timeout=c["round-timeout"], resume=c["resume"],
        stop_after_round=c["stop-after-round"], eval_steps=c["eval-steps"], eval_gamma=c["eval-gamma"],
        report_figures=c["report-figures"], wire_dtype=c["wire-dtype"],
        secure_aggregation=c["secure-aggregation"], raw=c)


def settings_for_resume(current: RunSettings) -> RunSettings:
    """The planned run stored in ``run_dir/run.json``, with the keys a resume may change."""
    from addiff_core.run_folder import RunFolder

    folder = RunFolder(current.run_dir)
    path = folder.run_json
    doc = folder.require_run_json()
    try:
        stored, stored_model = dict(doc["run_config"]), doc["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable run description ({type(e).__name__}: {e})") from None
    merged = {**stored, **{k: current.raw[k] for k in RESUME_MAY_CHANGE if k in current.raw}}
    merged.update({"run-dir": str(current.run_dir), "resume": True, "model-config": "",
                   "model-kind": str(stored_model.get("kind", "diffusion")) if isinstance(stored_model, dict) else "",
                   "grid-size": 0})
    from addiff_core.config import model_config_from_dict

    s = from_run_config(merged)
    model = model_config_from_dict(stored_model, f"{path} (model)")
    return replace(s, model=model, model_config_file=Path(stored["model-config"]) if stored.get("model-config") else None,
                   raw={**s.raw, "model-config": stored.get("model-config", ""), "model-kind": model.kind,
                        "grid-size": stored.get("grid-size", 0)})
