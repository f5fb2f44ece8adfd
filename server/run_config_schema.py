"""The run config's keys, one row each: type and default, bounds, help, command-line flags, and
what a ``--resume`` may change. Everything else is read from :data:`KEYS`: the defaults
(:data:`DEFAULTS`, equal to pyproject.toml's ``[tool.flwr.app.config]``, which ``flwr run``
needs; a test compares), the validation (:func:`read`), the options of ``addiff simulate`` and
``addiff server start`` (:mod:`server.run_config_cli`) and docs/RUN_CONFIG.md (:func:`markdown`).
Adding a key is one row, then ``python -m server.run_config_schema`` writes the doc and
pyproject's section. Flower-free, so that the commands' help can read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from addiff_core.config import MAX_EPOCHS, MAX_ROUNDS, ConfigError
from addiff_core.options import DDIM_STEPS_FLAGS, MAX_SEED, MAX_SITES, MAX_STEPS, SYNTH_BOUNDS

from addiff_core.wire import WIRE_DTYPES

SIMULATE, SERVER = "simulate", "server start"
BOTH = (SIMULATE, SERVER)
KEEP, CHANGE, RESET = "kept", "may change", "this start's"  # a key on --resume


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


@dataclass(frozen=True)
class Key:
    """One run-config key. Its type is the default's; numbers are >= ``lo`` (0 unless given)."""

    name: str
    default: Any
    help: str
    lo: float | None = 0
    hi: float | None = None
    below_hi: bool = False  # hi itself is out
    zero_off: bool = False  # 0 means off, else in [lo, hi]
    zero: str = ""  # what 0 (or "") means, for the help and the docs
    choices: tuple[str, ...] = ()
    casefold: bool = False  # "FedAvg" is fedavg
    flags: tuple[str, ...] = ()  # command-line spellings, the first is the one shown
    commands: tuple[str, ...] = BOTH  # the commands that get the flags
    flag_help: str = ""  # the flag's help where it differs from ``help`` (a flag that turns a key off)
    flag_range: tuple[float, float] | None = None  # the flag's own bounds where they differ (--size: demo data too)
    command_default: Mapping[str, Any] = field(default_factory=dict)  # a command's own default
    resume: str = KEEP  # KEEP: run.json's value; CHANGE: the given value; RESET: the given value or the default

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def default_for(self, command: str) -> Any:
        return self.command_default.get(command, self.default)

    def read(self, value: Any) -> Any:
        """``value`` as this key's type, within its bounds and choices; ConfigError naming the key."""
        want = self.type
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise self.fail(f"must be {want.__name__}, got {value!r}")
        if want is str:
            value = value.lower() if self.casefold else value
            if self.choices and value not in self.choices:
                raise self.fail(f"must be one of {', '.join(c or repr('') for c in self.choices)}, got {value!r}")
        if want in (int, float):
            self.check_number(value)
        return value

    def check_number(self, v: float) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise self.fail(f"must be finite, got {v!r}")
        if self.zero_off and v == 0:
            return
        if self.lo is not None and v < self.lo:
            raise self.fail(f"must be {'0 (off) or ' if self.zero_off else ''}>= {self.lo:g}, got {v!r}")
        if self.hi is not None and (v >= self.hi if self.below_hi else v > self.hi):
            raise self.fail(f"{'below' if self.below_hi else 'at most'} {self.hi:g}, got {v!r}")

    def fail(self, msg: str) -> ConfigError:
        return ConfigError(f"run config: {self.name}: {msg}")


_DP = "central DP (central-dp-noise > 0)"
_SECAGG = "secure aggregation (docs/PRIVACY.md)"
KEYS: tuple[Key, ...] = (
    Key("run-dir", "", "run folder", zero="a new runs/COMMAND-DATE-TIME", flags=("--run-dir",)),
    Key("site-files", "sites/hospital_a.yaml,sites/hospital_b.yaml,sites/hospital_c.yaml",
        "a simulation's comma-separated site files, partition i uses the i-th (simulate: instead of demo "
        "hospitals)",
        flags=("--site-files",), commands=(SIMULATE,), command_default={SERVER: ""}),
    Key("model-config", "configs/demo.yaml", "model config YAML", zero="ModelConfig() defaults", flags=("--config",)),
    Key("model-kind", "", "model kind, instead of the model config's", zero="the model config's",
        choices=("", "diffusion", "unet"), flags=("--model",)),
    Key("grid-size", 0, "model grid size (--size: 16 to 512, also simulate's demo data)", hi=512,
        zero="the model config's", flags=("--size",), flag_range=SYNTH_BOUNDS["--size"]),
    Key("strategy", "fedavg", strategy_help(), choices=tuple(STRATEGIES), casefold=True, flags=("--strategy",)),
    Key("vae-rounds", 8, "rounds of the VAE stage (diffusion model; --rounds VAE,DIFFUSION)", hi=MAX_ROUNDS),
    Key("diffusion-rounds", 14, "rounds of the diffusion stage (diffusion model)", hi=MAX_ROUNDS),
    Key("unet-rounds", 17, "rounds of the unet baseline (--rounds N), about the CPU of the default diffusion "
        "schedule (BENCHMARKS.md)", hi=MAX_ROUNDS),
    Key("local-epochs", 0, "local epochs per round", hi=MAX_EPOCHS, zero="each site file's training epochs",
        flags=("--local-epochs",)),
    Key("proximal-mu", 0.01, "FedProx mu", hi=1000.0, flags=("--proximal-mu",)),
    Key("fedadam-eta", 0.001, "FedAdam server learning rate"),
    Key("fedadam-beta-1", 0.9, "FedAdam first-moment decay"),
    Key("fedadam-beta-2", 0.99, "FedAdam second-moment decay"),
    Key("fedadam-tau", 1e-5, "FedAdam adaptivity"),
    Key("trim-beta", 0.2, "fedtrimmedavg: fraction cut at each end", hi=0.5, below_hi=True),
    Key("central-dp-noise", 0.0, "client-level central DP: noise multiplier (needs fedavg)", zero="off"),
    Key("central-dp-clip", 1.0, f"{_DP}: L2 clipping norm of each site's update (> 0)"),
    Key("central-dp-delta", 1e-3, f"{_DP}: delta of the reported epsilon, in (0, 1)", hi=1.0),
    Key("min-sites", 0, "usable replies a round needs; rounds wait for this many SuperNodes and use all connected "
        "(a deployment cannot count its sites: server start's own default)", hi=MAX_SITES, zero="every site file", flags=("--min-sites",), command_default={SERVER: 3},
        resume=CHANGE),
    Key("wait-sites", 0, "SuperNodes to wait for before the first round (at most round-timeout), e.g. every "
        "hospital while min-sites tolerates some failing later", hi=MAX_SITES, zero="min-sites",
        flags=("--wait-sites",), commands=(SERVER,), resume=CHANGE),
    Key("round-retries", 2, "attempts at a round with too few usable replies, after the first", hi=100,
        resume=CHANGE),
    Key("max-num-examples", 100000, "a reply claiming more training cases is rejected", lo=1),
    Key("update-norm-multiple", 10.0, "reject an update whose norm exceeds this x the round's median", lo=1,
        zero_off=True, zero="off"),
    Key("seed", 0, "initial model and per-round site seeds", hi=MAX_SEED, flags=("--seed",)),
    Key("round-timeout", 3600.0, "seconds to wait for the sites each round (at most a week)", lo=1, hi=7 * 86400,
        flags=("--round-timeout",), commands=(SERVER,), resume=CHANGE),
    Key("resume", False, "continue run-dir from its last complete round (--resume RUN_DIR)", resume=CHANGE),
    Key("stop-after-round", 0, "stop after this round (resume later)", hi=100000, zero="run to the end",
        flags=("--stop-after-round",), resume=RESET),
    Key("eval-steps", 0, "DDIM steps in the final evaluation, at most the model's train_timesteps", hi=MAX_STEPS,
        zero="the model config's sample_steps", flags=DDIM_STEPS_FLAGS, resume=CHANGE),
    Key("eval-gamma", True, "the gamma pass rate in the final evaluation", flags=("--no-gamma",),
        flag_help="skip the gamma pass rate in the final evaluation", resume=CHANGE),
    Key("report-figures", True, "the figures of the end-of-run report (false: text and tables; addiff report "
        "RUN_DIR draws them later)", resume=CHANGE),
    Key("wire-dtype", "float32", "float16: stage weights travel rounded to half precision both ways (half the "
        "bytes); sites train and the server aggregates in float32 (BENCHMARKS.md)",
        choices=WIRE_DTYPES),
    Key("secure-aggregation", False, "Flower's SecAgg+: the server unmasks only the weighted sum of the updates "
        "(docs/PRIVACY.md)"),
    Key("secagg-clip", 8.0, f"{_SECAGG}: clipping range of a site's weighted update, per element, in (0, 1e6]"),
    Key("secagg-quantization", 67108864, f"{_SECAGG}: integer levels over [-clip, clip], in [2, 2^31]"),
    Key("secagg-threshold", 0, f"{_SECAGG}: shares that unmask a site's secret (>= 2)",
        zero="a strict majority of the round's sites"),
    Key("secagg-max-weight", 1000, f"{_SECAGG}: example counts are divided by it until every site has declared "
        "its count (>= 1)"),
    Key("cross-site", False, "after the last round, every site's models on every site's held-out cases "
        "(cross_site.md; docs/FEDERATION.md); personalization: personalize-epochs", flags=("--cross-site",),
        resume=CHANGE),
    Key("personalize-epochs", 0, "fine-tune the global model this many epochs per stage at each site "
        "(personalized.pt, never sent)", hi=MAX_EPOCHS),
    Key("personalize-stages", "both", "both stages or the diffusion stage only (the unet has one)",
        choices=("both", "diffusion")),
)
BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
DEFAULTS: dict[str, Any] = {k.name: k.default for k in KEYS}
RESUME_MAY_CHANGE: tuple[str, ...] = tuple(k.name for k in KEYS if k.resume != KEEP)


def read(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of ``cfg`` known, typed and within its row's bounds; the rest from :data:`DEFAULTS`."""
    unknown = sorted(set(cfg) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"run config: unknown key {unknown[0]!r} (known: {', '.join(BY_NAME)})")
    return {**DEFAULTS, **{k: BY_NAME[k].read(v) for k, v in cfg.items()}}


def markdown() -> str:
    """docs/RUN_CONFIG.md (tests/test_run_config_schema.py compares the committed file)."""
    lines = ["# Run config", "", "Generated from `server/run_config_schema.py` with pyproject.toml's "
             "`[tool.flwr.app.config]` (`python -m server.run_config_schema`; `flwr run` reads the keys there). "
             "`addiff simulate` and `addiff server start` take any key as `--set KEY=VALUE`, some as the flag "
             "shown. On `--resume` a key is *kept* (run.json's), *may change* (when given), or *this start's* "
             "(the given value, else the default).", "",
             "| key | default | bounds | flag | on --resume | meaning |", "|---|---|---|---|---|---|"]
    for k in KEYS:
        lines.append(f"| `{k.name}` | {_default_text(k)} | {_bounds_text(k)} | {_flags_text(k)} | {k.resume} | "
                     f"{k.help} |")
    return "\n".join(lines) + "\n"


def _shown(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else f"`{v!r}`" if v == "" else f"`{v}`"


def _default_text(k: Key) -> str:
    text = _shown(k.default) + (f" ({k.zero})" if k.zero and not k.default else "")
    return text + "".join(f"; {c}: {_shown(v)}" for c, v in k.command_default.items())


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _bounds_text(k: Key) -> str:
    if k.choices:
        return ", ".join(f"`{c}`" for c in k.choices if c)
    if k.type not in (int, float):
        return ""
    lo = f"0 or >= {_num(k.lo)}" if k.zero_off else f">= {_num(k.lo)}"
    return lo + (f", {'<' if k.below_hi else '<='} {_num(k.hi)}" if k.hi is not None else "")


def _flags_text(k: Key) -> str:
    if not k.flags:
        return ""
    where = "" if set(k.commands) == set(BOTH) else f" ({', '.join(k.commands)})"
    alias = f" (alias {', '.join(f'`{f}`' for f in k.flags[1:])})" if k.flags[1:] else ""
    return f"`{k.flags[0]}`{alias}{where}"


def write_generated(root: Path) -> None:
    """docs/RUN_CONFIG.md and pyproject.toml's ``[tool.flwr.app.config]`` from :data:`KEYS`
    (``python -m server.run_config_schema``, after adding or changing a row)."""
    import tomli_w

    (root / "docs" / "RUN_CONFIG.md").write_text(markdown())
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    start = text.index(CONFIG_SECTION) + len(CONFIG_SECTION)
    end = text.find("\n[", start)
    pyproject.write_text(text[:start] + tomli_w.dumps(DEFAULTS) + (text[end + 1:] if end >= 0 else ""))


CONFIG_SECTION = "[tool.flwr.app.config]\n"

if __name__ == "__main__":
    write_generated(Path(__file__).resolve().parents[1])
