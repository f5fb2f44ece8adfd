"""The run-config options of ``addiff simulate`` and ``addiff server start``, generated from the
rows of :mod:`server.run_config_schema`, their bounds checked before any work, and the one
mapper from the parsed options to a run config (a new run's, or a resumed run's)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from addiff_core.config import ConfigError
from addiff_core.options import check_range

from addiff_core.project import resolve_path

from .run_config_schema import BY_NAME, DEFAULTS, KEEP, KEYS, RESET, Key


def keys_of(command: str) -> list[Key]:
    """The rows with a flag on ``command``."""
    return [k for k in KEYS if k.flags and command in k.commands]


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``command``'s run-config flags (default None: "not given", so that a resume can tell),
    then ``--rounds``, ``--set`` and ``--resume``."""
    for key in keys_of(command):
        parser.add_argument(*key.flags, **_argument(key, command))
    parser.add_argument("--rounds", help="VAE,DIFFUSION rounds for the diffusion model (e.g. 3,4); N for unet "
                                         f"(default {DEFAULTS['vae-rounds']},{DEFAULTS['diffusion-rounds']} / "
                                         f"{DEFAULTS['unet-rounds']})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any run-config key (docs/RUN_CONFIG.md), e.g. round-retries=1")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped/crashed run from its last complete "
                                                            "round (only the keys a resume may change are applied)")


def _argument(key: Key, command: str) -> dict[str, Any]:
    default = key.default_for(command)
    if isinstance(default, bool):
        return {"dest": key.dest, "action": "store_const", "const": not key.default, "default": None,
                "help": key.flag_help or key.help}
    shown = key.zero if key.zero and not default else default
    kw: dict[str, Any] = {"dest": key.dest, "type": key.type, "default": None,
                          "help": f"{key.flag_help or key.help} (default: {shown})"}
    if key.choices:
        kw["choices"] = [c for c in key.choices if c]
    else:
        kw["metavar"] = key.flags[0].lstrip("-").replace("-", "_").upper()
    return kw


def check_flags(args: argparse.Namespace, command: str) -> None:
    """Every number given on ``command``'s command line within its row's bounds: one line naming
    the flag (a port-like typo must not fail deep inside Flower)."""
    for key in keys_of(command):
        value = getattr(args, key.dest, None)
        if key.type in (int, float) and value is not None:
            lo, hi = key.flag_range or (key.lo, key.hi if key.hi is not None else math.inf)
            check_range("/".join(key.flags), value, lo, hi, f"0: {key.zero}" if key.zero and lo <= 0 else "")


def run_config(args: argparse.Namespace, command: str, run_dir: Path, *, stored: Mapping[str, Any] | None = None,
               site_files: Sequence[Path] = ()) -> dict[str, Any]:
    """The run config of this start. A new run: the command's defaults, the options given, the
    model config and ``--rounds``. A resume (``stored``: run.json's run config): the stored one,
    the options given for the keys a resume may change, and this start's defaults of the keys
    that belong to one start (stop-after-round). ``--set`` last, in both."""
    given = {k.name: getattr(args, k.dest) for k in keys_of(command) if getattr(args, k.dest, None) is not None}
    if stored is not None:
        rc = {**stored, "run-dir": str(run_dir), "resume": True}
        rc.update({n: v for n, v in given.items() if BY_NAME[n].resume != KEEP})
        rc.update({k.name: k.default_for(command) for k in KEYS if k.resume == RESET and k.name not in given})
    else:
        model_config = (resolve_path(args.model_config, Path.cwd()) if args.model_config
                        else resolve_path(DEFAULTS["model-config"]))
        rc = {**{k.name: k.default_for(command) for k in KEYS}, **given, "run-dir": str(run_dir),
              "model-config": str(model_config)}
        if site_files:
            rc["site-files"] = ",".join(str(p) for p in site_files)
        rc.update(parse_rounds(args.rounds, args.model_kind or kind_of(model_config)))
    rc.update(parse_sets(args.set))
    return rc


def kind_of(model_config: Path) -> str:
    """The model kind a model config file names (diffusion if there is no such file yet)."""
    from addiff_core.config import load_model_config

    return load_model_config(model_config).kind if model_config.is_file() else "diffusion"


def parse_rounds(text: str | None, kind: str) -> dict[str, int]:
    """``--rounds``: ``VAE,DIFFUSION`` for the diffusion model, ``N`` for the unet."""
    if not text:
        return {}
    parts = [p for p in text.replace("/", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--rounds: expected numbers, got {text!r}") from None
    if any(n < 1 for n in nums):
        raise ConfigError(f"--rounds: rounds must be >= 1, got {text!r}")
    if kind == "unet":
        if len(nums) != 1:
            raise ConfigError(f"--rounds: the unet model has one stage; give one number, got {text!r}")
        return {"unet-rounds": nums[0]}
    if len(nums) != 2:
        raise ConfigError(f"--rounds: give VAE,DIFFUSION rounds for the diffusion model (e.g. 3,4), got {text!r}")
    return {"vae-rounds": nums[0], "diffusion-rounds": nums[1]}


def parse_sets(items: Iterable[str] | None) -> dict[str, Any]:
    """``["min-sites=2", "eval-gamma=false"]`` -> typed run-config overrides (checked later)."""
    from addiff_core import yamlsafe  # the one safe loader, for a value too

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(DEFAULTS)}")
        try:
            v = yamlsafe.load(value) if value.strip() else ""
        except yamlsafe.YamlRefused as e:
            raise ConfigError(f"--set {item[:80]!r}: {e}") from None
        out[key] = value if isinstance(DEFAULTS[key], str) else v
    return out
