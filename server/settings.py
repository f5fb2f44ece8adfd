"""The run configuration of a federation: parsed once, validated, paths resolved.

The keys, their defaults and bounds are the rows of :mod:`server.run_config_schema` (one per
key; pyproject.toml's ``[tool.flwr.app.config]`` holds the same defaults, which ``flwr run``
needs); here are the rules between keys (rounds vs the model kind, central DP, secure
aggregation, DDIM steps vs the model) and :class:`RunSettings`. Relative paths resolve against
:func:`addiff_core.project.project_root`.
"""
from __future__ import annotations

import json
from datetime import datetime
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from addiff_core.config import ConfigError, GridConfig, ModelConfig, load_model_config
from addiff_core.options import check_steps
from addiff_core.project import resolve_path, split_list

from .run_config_schema import DEFAULTS, RESUME_MAY_CHANGE, STRATEGIES, read


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


@dataclass(frozen=True)
class FedAdamParams:
    """FedAdam's server optimiser (the fedadam-* keys)."""

    eta: float = DEFAULTS["fedadam-eta"]
    beta_1: float = DEFAULTS["fedadam-beta-1"]
    beta_2: float = DEFAULTS["fedadam-beta-2"]
    tau: float = DEFAULTS["fedadam-tau"]


@dataclass(frozen=True)
class CentralDPParams:
    """Client-level central DP (the central-dp-* keys); ``noise`` 0: off."""

    noise: float = DEFAULTS["central-dp-noise"]
    clip: float = DEFAULTS["central-dp-clip"]
    delta: float = DEFAULTS["central-dp-delta"]

    def check(self) -> None:
        """What only an active central DP needs: a clipping norm, a delta below 1."""
        if self.noise > 0 and self.clip <= 0:
            raise ConfigError("run config: central-dp-clip: must be > 0")
        if self.noise > 0 and not 0 < self.delta < 1:
            raise ConfigError(f"run config: central-dp-delta: must be in (0, 1), got {self.delta!r}")


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
    fedadam: FedAdamParams = field(default_factory=FedAdamParams)
    trim_beta: float = DEFAULTS["trim-beta"]  # fedtrimmedavg: fraction cut at each end
    central_dp: CentralDPParams = field(default_factory=CentralDPParams)
    min_sites: int = DEFAULTS["min-sites"]  # 0: as many as site_files
    wait_sites: int = DEFAULTS["wait-sites"]  # SuperNodes to wait for before the first round (0: min-sites)
    round_retries: int = DEFAULTS["round-retries"]  # a round with too few usable replies is tried again this often
    max_num_examples: int = DEFAULTS["max-num-examples"]  # a reply claiming more training cases is rejected
    update_norm_multiple: float = DEFAULTS["update-norm-multiple"]  # x the round's median update norm (0: off)
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
def _model(c: Mapping[str, Any]) -> tuple[ModelConfig, Path | None]:
    """The model config file with the run config's model-kind and grid-size."""
    mc_file = resolve_path(c["model-config"]) if c["model-config"] else None
    model = load_model_config(mc_file) if mc_file else ModelConfig()
    if c["model-kind"]:
        model = replace(model, kind=c["model-kind"])
    if c["grid-size"]:
        model = replace(model, grid=GridConfig(**{**asdict(model.grid), "size": c["grid-size"]}))
        try:  # re-validate (divisibility etc.)
            from addiff_core.config import model_config_from_dict

            model = model_config_from_dict(json.loads(json.dumps(model.to_dict())), "run config (grid-size)")
        except ConfigError as e:
            raise ConfigError(f"run config: grid-size {c['grid-size']}: {e}") from None
    return model, mc_file


def check_model_keys(c: Mapping[str, Any], model: ModelConfig) -> None:
    """The rounds of the model's stages, and DDIM steps within its ``train_timesteps``."""
    if model.kind == "diffusion" and (c["vae-rounds"] < 1 or c["diffusion-rounds"] < 1):
        raise ConfigError("run config: vae-rounds and diffusion-rounds must be >= 1 for the diffusion model")
    if model.kind == "unet" and c["unet-rounds"] < 1:
        raise ConfigError("run config: unet-rounds must be >= 1 for the unet model")
    check_steps("run config: eval-steps", c["eval-steps"] or None, model)


def from_run_config(run_config: Mapping[str, Any], model: ModelConfig | None = None) -> RunSettings:
    """Validate a Flower run config (``context.run_config``, defaults filled in): each key by its
    row (:func:`server.run_config_schema.read`), then the rules between keys. ``model``: the
    model instead of model-config, model-kind and grid-size (a resumed run's)."""
    c = read(run_config)
    model, mc_file = (model, None) if model is not None else _model(c)
    check_model_keys(c, model)
    strategy = c["strategy"]
    check_central_dp(strategy, c["central-dp-noise"])
    central_dp = CentralDPParams(c["central-dp-noise"], c["central-dp-clip"], c["central-dp-delta"])
    central_dp.check()
    check_secure_aggregation(c, strategy)
    run_dir = c["run-dir"] or f"runs/run-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return RunSettings(
        run_dir=resolve_path(run_dir), site_files=tuple(resolve_path(p) for p in split_list(c["site-files"])),
        model=model, model_config_file=mc_file, strategy=strategy, vae_rounds=c["vae-rounds"],
        diffusion_rounds=c["diffusion-rounds"], unet_rounds=c["unet-rounds"], local_epochs=c["local-epochs"],
        proximal_mu=c["proximal-mu"], trim_beta=c["trim-beta"], central_dp=central_dp,
        fedadam=FedAdamParams(c["fedadam-eta"], c["fedadam-beta-1"], c["fedadam-beta-2"], c["fedadam-tau"]),
        min_sites=c["min-sites"], wait_sites=c["wait-sites"], round_retries=c["round-retries"],
        max_num_examples=c["max-num-examples"], update_norm_multiple=c["update-norm-multiple"], seed=c["seed"],
        round_timeout=c["round-timeout"], resume=c["resume"], stop_after_round=c["stop-after-round"],
        eval_steps=c["eval-steps"], eval_gamma=c["eval-gamma"], report_figures=c["report-figures"],
        wire_dtype=c["wire-dtype"], secure_aggregation=c["secure-aggregation"], raw=c)


def settings_for_resume(current: RunSettings) -> RunSettings:
    """The planned run stored in ``run_dir/run.json``, with the keys a resume may change."""
    from addiff_core.config import model_config_from_dict
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
    s = from_run_config(merged, model=model_config_from_dict(stored_model, f"{path} (model)"))
    model = s.model
    return replace(s, model_config_file=Path(stored["model-config"]) if stored.get("model-config") else None,
                   raw={**s.raw, "model-config": stored.get("model-config", ""), "model-kind": model.kind,
                        "grid-size": stored.get("grid-size", 0)})
