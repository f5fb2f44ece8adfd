"""Bounds of the command line's numeric options, one place: every number a user types is checked
before any work, with one line naming the option (#29: ``--steps -5`` and ``--device 'cpu;id'``
were tracebacks, ``--samples 1000000000`` ran for ever).

The bounds that need the model (DDIM steps <= its ``train_timesteps``) are checked where the
model is known (:func:`check_steps`)."""
from __future__ import annotations

import math
from typing import Any

from .config import DEVICE_RE, MAX_EPOCHS, ConfigError, ModelConfig

MAX_SEED = 2**32 - 1  # numpy's and torch's generators take a seed in [0, 2^32)
MAX_SAMPLES = 100  # each sample is a whole DDIM pass over the case
MAX_STEPS = 10000  # before the model is known; then its train_timesteps
MAX_SITES = 1000
RTDOSE_GRID_MM = 2.5  # predict --rtdose's default dose grid: a clinical one, not the CT's (100 MB at 512x512x98)
# the DDIM-steps override of every command: one spelling, the federation commands' old one kept as an alias
DDIM_STEPS_FLAGS = ("--steps", "--eval-steps")
SYNTH_BOUNDS = {"--sites": (1, 100), "--cases-per-site": (2, 10000), "--size": (16, 512)}
# the other numeric options, by flag: (lowest, highest, why). A command checks its own with
# check_options(args, flag, ...) before any work; None (not given) passes. The run-config flags of
# simulate and server start are bounded by their rows in server/run_config_schema.py.
BOUNDS: dict[str, tuple[float, float, str]] = {
    "--seed": (0, MAX_SEED, ""),
    "--vae-epochs": (0, MAX_EPOCHS, ""),
    "--diffusion-epochs": (0, MAX_EPOCHS, ""),
    "--size": SYNTH_BOUNDS["--size"] + ("grid voxels per axis",),
    "--port": (1, 65535, "a TCP port"),
    "--threads": (1, 1024, ""),
    "--max-retries": (0, 1_000_000, ""),
    "--activation-retries": (0, 100_000, ""),
    "--days": (1, 3650, "certificates valid at most 10 years"),
}


def _shown(value: int | float) -> str:
    """A number for an error line (an int of 400 digits has no float ``:g`` form)."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 20 else f"{text[:8]}...({len(text)} digits)"


def check_range(flag: str, value: int | float | None, lo: float, hi: float, why: str = "") -> None:
    """ConfigError unless ``lo <= value <= hi`` (None: the option was not given)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag}: must be a finite number, got {value}")
    if not lo <= value <= hi:
        raise ConfigError(f"{flag}: must be between {lo:g} and {hi:g}, got {_shown(value)}"
                          + (f" ({why})" if why else ""))


def check_options(args: Any, *flags: str) -> None:
    """Check the options ``flags`` of a parsed command line (``--min-sites`` is ``args.min_sites``)
    against :data:`BOUNDS`, in order: one line naming the first out of bounds."""
    for flag in flags:
        lo, hi, why = BOUNDS[flag]
        check_range(flag, getattr(args, flag.lstrip("-").replace("-", "_")), lo, hi, why)


def check_seed(flag: str, value: int | None) -> None:
    check_range(flag, value, 0, MAX_SEED)


def check_address(flag: str, value: str) -> None:
    """HOST:PORT with a port in 1..65535 (one line, not a connection that never succeeds)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ConfigError(f"{flag} must be HOST:PORT, got {value[:80]!r}")
    lo, hi, why = BOUNDS["--port"]
    check_range(f"{flag} port", int(port), lo, hi, why)


def check_device(flag: str, value: str | None) -> None:
    if value is not None and not DEVICE_RE.match(value):
        raise ConfigError(f"{flag}: must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


def check_steps(flag: str, steps: int | None, cfg: ModelConfig | None = None) -> None:
    """DDIM steps: at least 1, at most the model's ``train_timesteps`` (``MAX_STEPS`` while the
    model is not known yet). None: the model config's ``sample_steps``."""
    if steps is None:
        return
    hi = cfg.train_timesteps if cfg is not None and cfg.kind == "diffusion" else MAX_STEPS
    check_range(flag, steps, 1, hi, "the model's train_timesteps" if cfg is not None and cfg.kind == "diffusion"
                else "")


def check_synth(n_sites: int, cases_per_site: int, size: int, seed: int, seed_flag: str = "--seed") -> None:
    """The options of synthetic hospitals (``data synth``, ``simulate``'s demo data)."""
    for flag, v in (("--sites", n_sites), ("--cases-per-site", cases_per_site), ("--size", size)):
        lo, hi = SYNTH_BOUNDS[flag]
        check_range(flag, v, lo, hi, "a site needs training and held-out cases" if flag == "--cases-per-site" else "")
    check_seed(seed_flag, seed)
