"""Typed configuration: site files and model/run settings, validated once at the edge.

Every YAML file is read with ``addiff_core.yamlsafe`` (safe_load without aliases or duplicate
keys) and turned into frozen dataclasses. Any wrong field raises :class:`ConfigError` whose
message names the file, the field and the problem, so the command line can print one clear
line instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration file or value is wrong. The message names the file and the field."""


PREDICTION_TYPES = ("x0", "v", "epsilon")
DECODER_ANATOMY = ("planning", "ct", "none")
PLAN_NORMALISATIONS = ("none", "target_median")  # addiff_core/plan_normalisation.py
MAX_EPOCHS = 10000  # an extra zero must not start a run that never ends
MAX_ROUNDS = 10000  # rounds of one stage, the same reason
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
# A site's name: a folder name (state/NAME), a table cell and a word in the server's log. The
# server holds the name in a reply to the same rule (server/replies.py).
SITE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_site_name(name: object) -> bool:
    """True for a valid site name (:data:`SITE_NAME_RE`)."""
    return isinstance(name, str) and SITE_NAME_RE.fullmatch(name) is not None


# -- small validation helpers ----------------------------------------------------------------------
class _Fields:
    """Reads fields out of one YAML mapping, collecting a precise error per wrong field."""

    def __init__(self, data: Any, where: str, source: str):
        self.source = source
        self.where = where
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {where or 'top level'}: must be a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self._name(key)}: {msg}")

    def get(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        self.used.add(key)
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is dataclasses.MISSING:
            raise self.fail(key, "is required")
        return default

    def string(self, key: str, default: Any = dataclasses.MISSING, choices: tuple[str, ...] | None = None) -> str:
        v = self.get(key, default)
        if v is None:
            return v
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"must be a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def integer(self, key: str, default: Any = dataclasses.MISSING, minimum: int | None = None,
                maximum: int | None = None) -> int:
        v = self.get(key, default)
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {str(v)[:60]!r}")
        if minimum is not None and v < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {v}")
        return v

    def number(self, key: str, default: Any = dataclasses.MISSING, minimum: float | None = None,
               maximum: float | None = None, exclusive_min: bool = False, exclusive_max: bool = False) -> float:
        v = self.get(key, default)
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise self.fail(key, f"must be a finite number, got {v!r}")
        v = float(v)
        if minimum is not None and (v < minimum or (exclusive_min and v == minimum)):
            raise self.fail(key, f"must be {'>' if exclusive_min else '>='} {minimum}, got {v}")
        if maximum is not None and (v > maximum or (exclusive_max and v == maximum)):
            raise self.fail(key, f"must be {'<' if exclusive_max else '<='} {maximum}, got {v}")
        return v

    def boolean(self, key: str, default: Any = dataclasses.MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, got {v!r}")
        return v

    def sub(self, key: str) -> "_Fields":
        self.used.add(key)
        return _Fields(self.data.get(key), self._name(key), self.source)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown field (check the spelling; see sites/TEMPLATE.yaml)")


# -- model / grid settings (shared by every site of a federation) ----------------------------------
@dataclass(frozen=True)
class GridConfig:
    """The fixed grid the model sees: ``size``^3 voxels at ``spacing`` mm (None: the CT's own)."""

    size: int = 32
    spacing: tuple[float, float, float] | None = None
    hu_min: float = -1000.0
    hu_max: float = 1000.0


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "diffusion"  # "diffusion" (ADDiff-Dose) or "unet" (direct-regression baseline)
    grid: GridConfig = field(default_factory=GridConfig)
    vae_channels: tuple[int, ...] = (16, 32, 64)  # len-1 strided convs: 2^(len-1) downsampling
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    cond_channels: int = 16  # spatial conditioning channels at the latent grid
    context_dim: int = 64  # width of the context tokens
    num_heads: int = 4
    norm_groups: int = 8
    train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # DDIM steps: an x0 model's first step lands on the conditional mean
    # (BENCHMARKS.md, "DDIM steps (x0 model) and the uncertainty map")
    sample_steps: int = 1
    # training t / (T - 1) ~ Beta(timestep_bias, 1): weight on the high noise levels where a
    # few-step sampler decides the prediction (1: uniform)
    timestep_bias: float = 3.0
    # clinical-constraint squared hinge in the loss (ADDiff: on the decoded x0 estimate), one weight
    # per model (BENCHMARKS.md, "ADDiff-Dose design ablation")
    constraint_weight: float = 0.0
    unet_constraint_weight: float = 0.5
    kl_weight: float = 1e-6
    # diffusion stage: L1 of the decoded x0 estimate vs the dose in the evaluation region, beside
    # the latent MSE (the error the metrics measure)
    dose_l1_weight: float = 20.0
    # what the denoiser predicts: "x0", "v" or "epsilon"; x0 is the only one that samples well at
    # these budgets (BENCHMARKS.md, "ADDiff-Dose design ablation")
    prediction_type: str = "x0"
    # what the VAE decoder reads besides its latent: "none" (so the diffusion decides the dose),
    # "ct", or "planning" (CT, targets, OARs, beam plate); issue #24
    decoder_anatomy: str = "none"
    # residual autoencoding (DC-AE, Chen et al.): a latent channel starts as its block's mean dose,
    # so training learns only the residual
    residual_latent: bool = True
    # P(the VAE decodes z = 0) per training case; with an anatomy-aware decoder it made the latent
    # useless (issue #24)
    latent_dropout: float = 0.0
    # VAE reconstruction L1 over "body" (the evaluation region) or "grid" (every voxel)
    vae_loss_region: str = "body"
    # every prediction scaled so the primary target's median dose is the prescription (ICRU 83),
    # or "none" (addiff_core/plan_normalisation.py; issue #24)
    plan_normalisation: str = "none"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.grid.size // self.downsample

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the defaults of model configs written before issue #24 (they name ``anatomy_decoder``): their
# checkpoints keep the design they were trained with
_BEFORE_24 = {"residual_latent": False, "timestep_bias": 1.0, "dose_l1_weight": 0.0, "latent_dropout": 0.5}


def _model_config(f: _Fields) -> ModelConfig:
    d = ModelConfig()
    if "anatomy_decoder" in f.data:
        d = dataclasses.replace(d, **_BEFORE_24)
    g = f.sub("grid")
    spacing = g.get("spacing", None)
    if spacing is not None:
        if (not isinstance(spacing, (list, tuple)) or len(spacing) != 3
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing)):
            raise g.fail("spacing", f"must be three positive numbers in mm (or null for the CT's own), got {spacing!r}")
        spacing = tuple(float(s) for s in spacing)
    grid = GridConfig(size=g.integer("size", d.grid.size, minimum=8), spacing=spacing,
                      hu_min=g.number("hu_min", d.grid.hu_min), hu_max=g.number("hu_max", d.grid.hu_max))
    if grid.hu_max <= grid.hu_min:
        raise g.fail("hu_max", f"must be greater than hu_min ({grid.hu_min})")
    g.finish()

    def int_list(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        v = f.get(key, list(default))
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
            raise f.fail(key, f"must be a non-empty list of positive integers, got {v!r}")
        return tuple(v)

    vae_channels = int_list("vae_channels", d.vae_channels)
    unet_channels = int_list("unet_channels", d.unet_channels)
    att = f.get("attention_levels", list(d.attention_levels))
    if not isinstance(att, (list, tuple)) or len(att) != len(unet_channels) or not all(isinstance(a, bool) for a in att):
        raise f.fail("attention_levels", f"must be a list of {len(unet_channels)} booleans (one per unet level)")
    cfg = ModelConfig(
        kind=f.string("kind", d.kind, choices=("diffusion", "unet")),
        grid=grid,
        vae_channels=vae_channels,
        latent_channels=f.integer("latent_channels", d.latent_channels, minimum=1),
        unet_channels=unet_channels,
        attention_levels=tuple(att),
        cond_channels=f.integer("cond_channels", d.cond_channels, minimum=1),
        context_dim=f.integer("context_dim", d.context_dim, minimum=4),
        num_heads=f.integer("num_heads", d.num_heads, minimum=1),
        norm_groups=f.integer("norm_groups", d.norm_groups, minimum=1),
        train_timesteps=f.integer("train_timesteps", d.train_timesteps, minimum=2),
        beta_start=f.number("beta_start", d.beta_start, minimum=0, exclusive_min=True),
        beta_end=f.number("beta_end", d.beta_end, maximum=1, exclusive_max=True),
        sample_steps=f.integer("sample_steps", d.sample_steps, minimum=1),
        timestep_bias=f.number("timestep_bias", d.timestep_bias, minimum=0.1, maximum=100),
        constraint_weight=f.number("constraint_weight", d.constraint_weight, minimum=0),
        unet_constraint_weight=f.number("unet_constraint_weight", d.unet_constraint_weight, minimum=0),
        kl_weight=f.number("kl_weight", d.kl_weight, minimum=0),
        dose_l1_weight=f.number("dose_l1_weight", d.dose_l1_weight, minimum=0),
        prediction_type=f.string("prediction_type", d.prediction_type, choices=PREDICTION_TYPES),
        decoder_anatomy=_decoder_anatomy(f, d.decoder_anatomy),
        residual_latent=f.boolean("residual_latent", d.residual_latent),
        latent_dropout=f.number("latent_dropout", d.latent_dropout, minimum=0, maximum=1, exclusive_max=True),
        vae_loss_region=f.string("vae_loss_region", d.vae_loss_region, choices=("body", "grid")),
        plan_normalisation=f.string("plan_normalisation", d.plan_normalisation, choices=PLAN_NORMALISATIONS),
    )
    f.finish()
    if cfg.grid.size % (cfg.downsample * 2 ** (len(cfg.unet_channels) - 1)):
        raise f.fail("grid", f"size {cfg.grid.size} must be divisible by the VAE downsampling ({cfg.downsample}) "
                             f"times 2^(unet levels - 1) ({2 ** (len(cfg.unet_channels) - 1)})")
    if cfg.context_dim % cfg.num_heads:
        raise f.fail("num_heads", f"must divide context_dim ({cfg.context_dim})")
    if any(c % cfg.norm_groups for c in cfg.vae_channels + cfg.unet_channels):
        raise f.fail("norm_groups", "must divide every entry of vae_channels and unet_channels")
    if cfg.sample_steps > cfg.train_timesteps:
        raise f.fail("sample_steps", f"must be <= train_timesteps ({cfg.train_timesteps})")
    return cfg


def _decoder_anatomy(f: _Fields, default: str) -> str:
    """``decoder_anatomy``; the older boolean ``anatomy_decoder`` (true: planning, false: none)
    is still read, so that checkpoints written before it load."""
    if "anatomy_decoder" in f.data:
        if "decoder_anatomy" in f.data:
            raise f.fail("anatomy_decoder", "give decoder_anatomy only (anatomy_decoder is its older spelling)")
        return "planning" if f.boolean("anatomy_decoder") else "none"
    return f.string("decoder_anatomy", default, choices=DECODER_ANATOMY)


def model_config_from_dict(data: Mapping | None, source: str = "<model config>") -> ModelConfig:
    return _model_config(_Fields(data, "", source))


# -- site files ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOutConfig:
    """Held-out cohort: explicit case ids, or a fraction drawn with a seed. Never trained on."""

    case_ids: tuple[str, ...] | None = None
    fraction: float | None = 0.25
    seed: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 2
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine
    vae_epochs: int = 2  # local epochs per round (federated) or total (addiff train)
    diffusion_epochs: int = 2
    grad_clip: float = 1.0
    seed: int = 0


def new_site_doc(name: str, heldout: dict, seed: int = 0) -> dict:
    """What a site file written by an importer holds (``addiff data``, the demo): its cases in
    ``NAME/cases``, ``heldout`` as given, the :class:`TrainingConfig` defaults with ``seed``,
    device auto, privacy off. Each writer adds its own header line."""
    t = TrainingConfig(seed=int(seed))
    return {"name": name, "data_dir": f"{name}/cases", "heldout": heldout, "device": "auto",
            "training": {k: getattr(t, k) for k in ("batch_size", "optimizer", "lr", "vae_epochs",
                                                    "diffusion_epochs", "seed")},
            "privacy": {"enabled": False}}


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = False
    target_epsilon: float | None = 8.0
    delta: float | None = None  # default: 1 / (10 * training cases), below 1 / n
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # used instead of target_epsilon when set
    accountant: str = "rdp"  # rdp | prv
    # per-sample gradients: microbatch (one backward per sample, privacy.per_sample_backward; the
    # cheapest on CPU: BENCHMARKS.md, "Differential privacy"), functorch (Opacus' vmap) or hooks
    # (Opacus' per-layer grad samplers); Opacus' "ew" leaves some parameters without them
    grad_sample_mode: str = "microbatch"


@dataclass(frozen=True)
class SiteConfig:
    name: str
    data_dir: Path
    state_dir: Path
    source: Path | None = None
    heldout: HeldOutConfig = field(default_factory=HeldOutConfig)
    device: str = "auto"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # SHA-256 of the app bundles (Flower FABs) `addiff client start` lets run here; None (the key
    # absent): any; () (present but empty): none
    approved_bundles: tuple[str, ...] | None = None
    # after a federated run (issue #25, docs/FEDERATION.md "Cross-site evaluation"): may this site's own
    # models (local, personalized) go to the other sites to be evaluated there; the most fine-tuning epochs
    # it accepts (None: as the run asks, 0: none); does it train a local model for the matrix
    share_models_for_evaluation: bool = False
    personalize_max_epochs: int | None = None
    train_local_model: bool = True


def _personalize(f: _Fields) -> int | None:
    """``personalize``: true (default: the run's personalize-epochs), false (none) or an integer
    (at most that many epochs)."""
    v = f.get("personalize", True)
    if isinstance(v, bool):
        return None if v else 0
    if isinstance(v, int) and 0 <= v <= MAX_EPOCHS:
        return v
    raise f.fail("personalize", f"must be true, false or a number of epochs 0-{MAX_EPOCHS}, got {str(v)[:40]!r}")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def site_config_from_dict(data: Any, source: str | Path, base_dir: Path | None = None) -> SiteConfig:
    source = str(source)
    base_dir = Path(base_dir) if base_dir is not None else Path(source).resolve().parent
    f = _Fields(data, "", source)
    name = f.string("name")
    if not is_site_name(name):
        raise f.fail("name", f"must be letters, digits, '_', '-' or '.' (1-64, the first a letter or digit), "
                             f"got {name[:80]!r}")
    data_dir = _resolve(base_dir, f.string("data_dir"))
    state_dir = _resolve(base_dir, f.string("state_dir", f"state/{name}"))

    h = f.sub("heldout")
    ids = h.get("case_ids", None)
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise h.fail("case_ids", "must be a list of case folder names")
        heldout = HeldOutConfig(case_ids=tuple(ids), fraction=None, seed=h.integer("seed", 0))
        if h.get("fraction", None) is not None:
            raise h.fail("fraction", "give either case_ids or fraction, not both")
    else:
        heldout = HeldOutConfig(case_ids=None,
                                fraction=h.number("fraction", 0.25, minimum=0, maximum=1, exclusive_max=True),
                                seed=h.integer("seed", 0))
    h.finish()

    device = f.string("device", "auto")
    if not DEVICE_RE.match(device):
        raise f.fail("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")

    t = f.sub("training")
    dt = TrainingConfig()
    training = TrainingConfig(
        batch_size=t.integer("batch_size", dt.batch_size, minimum=1),
        optimizer=t.string("optimizer", dt.optimizer, choices=("adam", "adamw", "sgd")),
        lr=t.number("lr", dt.lr, minimum=0, exclusive_min=True),
        weight_decay=t.number("weight_decay", dt.weight_decay, minimum=0),
        lr_schedule=t.string("lr_schedule", dt.lr_schedule, choices=("constant", "cosine")),
        vae_epochs=t.integer("vae_epochs", dt.vae_epochs, minimum=0, maximum=MAX_EPOCHS),
        diffusion_epochs=t.integer("diffusion_epochs", dt.diffusion_epochs, minimum=0, maximum=MAX_EPOCHS),
        grad_clip=t.number("grad_clip", dt.grad_clip, minimum=0),
        seed=t.integer("seed", dt.seed),
    )
    t.finish()

    p = f.sub("privacy")
    dp = PrivacyConfig()
    privacy = PrivacyConfig(
        enabled=p.boolean("enabled", dp.enabled),
        target_epsilon=p.number("target_epsilon", dp.target_epsilon, minimum=0, exclusive_min=True),
        delta=p.number("delta", None, minimum=0, maximum=1, exclusive_min=True, exclusive_max=True),
        max_grad_norm=p.number("max_grad_norm", dp.max_grad_norm, minimum=0, exclusive_min=True),
        noise_multiplier=p.number("noise_multiplier", None, minimum=0, exclusive_min=True),
        accountant=p.string("accountant", dp.accountant, choices=("rdp", "prv")),
        grad_sample_mode=p.string("grad_sample_mode", dp.grad_sample_mode, choices=("microbatch", "functorch", "hooks")),
    )
    p.finish()

    model = _model_config(f.sub("model"))
    bundles = _approved_bundles(f)
    share, local = f.boolean("share_models_for_evaluation", False), f.boolean("train_local_model", True)
    personalize = _personalize(f)
    f.finish()
    return SiteConfig(name=name, data_dir=data_dir, state_dir=state_dir, source=Path(source),
                      heldout=heldout, device=device, training=training, privacy=privacy, model=model,
                      approved_bundles=bundles, share_models_for_evaluation=share,
                      personalize_max_epochs=personalize, train_local_model=local)


def _approved_bundles(f: _Fields) -> tuple[str, ...] | None:
    """``approved_bundles``: absent -> None (any bundle runs); present -> the approved hashes, and
    present but empty (``approved_bundles:`` or ``[]``) -> () (none approved: nothing runs)."""
    if "approved_bundles" not in f.data:
        return None
    f.used.add("approved_bundles")
    bundles = f.data["approved_bundles"]
    bundles = [] if bundles is None else bundles
    if not isinstance(bundles, list) or not all(
            isinstance(b, str) and re.fullmatch(r"[0-9a-fA-F]{64}", b.strip()) for b in bundles):
        raise f.fail("approved_bundles", "must be a list of SHA-256 hashes, 64 hex digits each, quoted (addiff client "
                                         "bundle-hash BUNDLE); empty approves none; remove the key to accept any bundle")
    return tuple(dict.fromkeys(b.strip().lower() for b in bundles))


def load_yaml(path: str | Path) -> Any:
    """A YAML file as plain data: no aliases, no duplicate keys, at most 1 MB (``yamlsafe``)."""
    from . import yamlsafe

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yamlsafe.load_file(path)
    except yamlsafe.YamlRefused as e:
        raise ConfigError(f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate a site file. Relative paths inside it resolve against its folder."""
    path = Path(path)
    return site_config_from_dict(load_yaml(path), path, path.resolve().parent)


def load_model_config(path: str | Path | None) -> ModelConfig:
    if path is None:
        return ModelConfig()
    return model_config_from_dict(load_yaml(path), str(path))


def resolve_device(requested: str) -> "torch.device":  # noqa: F821
    """auto -> cuda when available, else cpu. Asking for a GPU that is not there is an error."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} asked for, but no CUDA GPU is available on this machine")
        idx = int(requested.split(":")[1]) if ":" in requested else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device {requested!r} asked for, but this machine has only "
                              f"{torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device(requested)
    if requested == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' asked for, but MPS is not available")
    return torch.device(requested)
