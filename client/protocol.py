"""What travels between the ServerApp and the ClientApps, and where relative paths point.

The hospital's side owns this module: ``server/`` imports it, ``client/`` never imports
``server/`` (a hospital's code does not depend on the coordinator's).

Messages (Flower 1.42 Message API, one ``RecordDict`` each):

* train request   ``{"arrays": ArrayRecord, "config": ConfigRecord}``; ``arrays`` holds the
  stage's own weights (prefix ``vae.``, ``diffusion.`` or ``unet.``) and, in a stage-2 round
  where the site needs it, the frozen global VAE too (``vae.*``); packed, see :func:`encode`
  (``config["layout"]`` says what is where).
* train reply     ``{"arrays": ArrayRecord, "metrics": MetricRecord, "site": ConfigRecord}``;
  ``arrays`` packed like the request's stage; ``metrics["num-examples"]`` = the site's training cases (the FedAvg weight); ``site["name"]``
  = the site name (MetricRecords hold numbers only). A site whose cached VAE does not match
  the round's ``vae-fingerprint`` replies ``{"site": {"name", "status": "missing-global-vae"}}``
  instead, and the server sends that site the round again with the VAE. A site whose privacy
  budget would be exceeded replies ``{"site": {"name", "status": "refused", "reason"},
  "metrics": {"epsilon", "delta", "dp_enabled"}}``: no weights; the server records it and goes
  on with the others.
* a site that cannot do the round (any exception in the ClientApp) replies
  ``{"site": {"name", "status": "failed", "code", "error"}}``: a code and an error class from
  :data:`SITE_ERROR_CODES` / :data:`SITE_ERROR_CLASSES`, nothing else (details stay in the
  site's log); ``name`` is "" when the site file could not be read.
* evaluate request ``{"arrays": full model, "config"}``; reply ``{"metrics", "site"}`` with
  held-out metrics (numbers only; ``num-examples`` = held-out cases).

The train config's ``stage-plan`` (every stage of the run and its rounds, for a DP site to
calibrate its noise once for the whole run) is a string, ``"vae:20,diffusion:4"``: written by
:func:`format_stage_plan`, read by :func:`parse_stage_plan`, nowhere else.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from addiff_core.config import ConfigError
from addiff_core.run_folder import PROJECT_ENV, enclosing_checkout, installed_checkout, split_list  # noqa: F401

STATUS_NEED_VAE = "missing-global-vae"
STATUS_REFUSED = "refused"  # the site will not train (its privacy budget is spent); no weights
STATUS_FAILED = "failed"  # the site could not do the round; "code" and "error" from the closed lists below
# What a failed site tells the server: nothing but one code and one error class from these
# lists (never an exception message: it may name a path or a case id). Details stay in the
# site's own log.
SITE_ERROR_CODES = {
    "site-config": "the site file is invalid",
    "model-config": "the model configuration sent by the server is invalid",
    "device": "the site's device is not available",
    "no-usable-data": "no usable training case (or no data folder)",
    "bad-data": "a case could not be read",
    "data-io": "reading the site's data failed",
    "missing-weights": "the round lacks weights the site needs",
    "bad-weights": "the weights sent do not fit the model",
    "non-finite": "training produced a non-finite loss",
    "out-of-memory": "out of memory",
    "disk": "writing the site's state failed",
    "internal": "an unexpected error",
    "secure-aggregation": "the secure aggregation protocol failed at the site",
    "update-out-of-range": "the site's update exceeds the secure aggregation's clipping range (secagg-clip)",
}
SITE_ERROR_CLASSES = ("ConfigError", "CaseError", "CheckpointError", "MissingGlobalWeights", "MemoryError",
                      "FloatingPointError", "OSError", "ValueError", "RuntimeError", "Exception")


def describe_failure(code, error) -> str:
    """The reason a server records for a failed site, from the closed lists only."""
    code = str(code) if str(code) in SITE_ERROR_CODES else "unknown"
    error = str(error) if str(error) in SITE_ERROR_CLASSES else "unknown"
    return f"site failed: {code} ({SITE_ERROR_CODES.get(code, 'unknown code')}; {error}); details in the site's log"
SITE_KEY = "site"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"


# ------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------
def project_root() -> Path:
    """The folder relative paths of the run configuration resolve against: the app's own folder.

    1. ``$ADDIFF_PROJECT_DIR`` if set (our launchers set it for the processes they start);
    2. run from an app bundle (FAB: ``flwr run`` unpacks ``server/``, ``client/``, ``configs/``
       and pyproject.toml into ``$FLWR_HOME/apps/...``, without the site files and data): the
       addiff-fl folder the server process runs in (the folder where the local SuperLink was
       started) when it holds exactly the app of the bundle, else the checkout ``addiff_core``
       is installed from if that one does; else :class:`ProjectRootError`, never a guess;
    3. otherwise the addiff-fl folder the current directory is in (so a copy of the project
       works on its own files), else the checkout ``addiff_core`` is installed from, else the
       current directory.
    """
    env = os.environ.get(PROJECT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return _project_root(str(Path.cwd().resolve()))


class ProjectRootError(ConfigError):
    """The folder relative paths should resolve against cannot be told (see project_root)."""


def bundle_dir() -> Path | None:
    """The unpacked app bundle this code runs from (``flwr run``), or None (a checkout or an install)."""
    d = Path(__file__).resolve().parents[1]
    if (d / "pyproject.toml").is_file() and not (d / "addiff_core").is_dir():
        return d
    return None


_APP_PATTERNS = ("server/*.py", "client/*.py", "configs/*.yaml")


def same_app(bundle: Path, folder: Path) -> bool:
    """True if ``folder`` holds exactly the app files of ``bundle`` (the fab-include patterns;
    pyproject.toml compared as parsed TOML: Flower rewrites it into the bundle)."""
    import tomllib

    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for pat in _APP_PATTERNS for p in sorted(d.glob(pat))}

    def toml(d: Path) -> dict:
        doc = tomllib.loads((d / "pyproject.toml").read_text(encoding="utf-8"))
        doc.get("tool", {}).get("flwr", {}).pop("federations", None)
        return doc

    try:
        return files(bundle) == files(folder) and toml(bundle) == toml(folder)
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=16)
def _project_root(cwd: str) -> Path:
    here = enclosing_checkout(Path(cwd))
    installed = installed_checkout()
    bundle = bundle_dir()
    if bundle is None:
        return here or installed or Path(cwd)
    for cand in dict.fromkeys(c for c in (here, installed) if c is not None):
        if same_app(bundle, cand):
            return cand
    tried = ", ".join(str(c) for c in dict.fromkeys(c for c in (here, installed) if c is not None)) or "none"
    raise ProjectRootError(
        f"cannot tell which folder this app was started from: the app bundle ({bundle}) matches no addiff-fl "
        f"folder this server can see (tried: {tried}). Flower's local SuperLink keeps the folder it was started "
        f"in: stop it (README, 'flwr run') and run `flwr run .` again from the app's folder, or give absolute "
        f"paths for run-dir, site-files and model-config in the run config, or start the SuperLink with "
        f"{PROJECT_ENV}=/path/to/the/app")


def resolve_path(value: str | os.PathLike, base: Path | None = None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else ((base or project_root()) / p).resolve()


# ------------------------------------------------------------------------------------------
# arrays <-> records
# ------------------------------------------------------------------------------------------
def to_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def record_nbytes(record) -> int:
    """Bytes of the serialised arrays in an ArrayRecord (what goes over the wire, before framing)."""
    return int(sum(len(a.data) for a in record.values())) if record is not None else 0


def fingerprint(arrays: dict[str, np.ndarray], prefix: str = "") -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the arrays under ``prefix`` (sorted)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        if not k.startswith(prefix):
            continue
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# packing: one array per stage and dtype on the wire
# ------------------------------------------------------------------------------------------
# Flower 1.42 moves every Array of a message as a separate object (HTTP request) on each hop;
# a stage of ~300 tensors then costs ~300 requests per site and hop. The parameters of a stage
# therefore travel concatenated, one flat array per dtype (``packed:<stage>:<dtype>``); the
# layout (names, dtypes, shapes in order) goes in the config as JSON. Buffers (non-trainable,
# e.g. ``diffusion.latent_scale``) travel as themselves so that FedAdam can average them.
# Averaging or any element-wise update of the flat array equals doing it tensor by tensor.
PACKED = "packed:"
LAYOUT_KEY = "layout"
WIRE_DTYPES = ("float32", "float16")
"""``wire-dtype``: the packed float32 parameters travel as themselves or rounded to float16 (half
the bytes); :func:`decode` and :func:`widen` bring them back to float32, so sites train and the
server aggregates in float32. A group whose values exceed float16's range travels in float32."""
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _on_wire(flat: np.ndarray, wire_dtype: str) -> np.ndarray:
    if wire_dtype == "float16" and flat.dtype == np.float32 and (flat.size == 0 or float(np.abs(flat).max()) < FLOAT16_MAX):
        return flat.astype(np.float16)
    return flat


def widen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed arrays that travelled as float16 back to float32 (named ``packed:<g>:float32``)."""
    return {k: (np.asarray(v).astype(np.float32) if k.startswith(PACKED) and k.endswith(":float32")
                and np.asarray(v).dtype == np.float16 else v) for k, v in arrays.items()}


def as_received(arrays: dict[str, np.ndarray], groups: list[str], separate=frozenset(),
                wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """The arrays of ``groups`` as a site holds them after the trip (rounded when float16)."""
    wire, layout = encode(arrays, groups, separate, wire_dtype=wire_dtype)
    return decode(widen(wire), layout)


def encode(arrays: dict[str, np.ndarray], groups: list[str], separate=frozenset(),
           order: dict[str, list] | None = None, wire_dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Pack the arrays of each group (state-dict prefix ``group.``) -> (wire arrays, layout).

    ``order``: a layout to follow exactly (a site packs its reply like the request it got).
    ``wire_dtype``: see ``WIRE_DTYPES`` (buffers sent separately always travel as themselves)."""
    out: dict[str, np.ndarray] = {}
    layout: dict[str, list] = {}
    for g in groups:
        if order is not None:
            keys = [k for k, _, _ in order[g]] + sorted(k for k in separate if k.startswith(g + "."))
            missing = [k for k in keys if k not in arrays]
            extra = [k for k in arrays if k.startswith(g + ".") and k not in set(keys)]
            if missing or extra:
                raise ValueError(f"arrays do not fit the layout of {g!r}: missing {missing[:3]}, extra {extra[:3]}")
        else:
            keys = [k for k in arrays if k.startswith(g + ".")]
        parts: dict[str, list[np.ndarray]] = {}
        entries = []
        for k in keys:
            v = np.asarray(arrays[k])
            if k in separate:
                out[k] = v
                continue
            entries.append([k, str(v.dtype), list(v.shape)])
            parts.setdefault(str(v.dtype), []).append(np.ascontiguousarray(v).reshape(-1))
        for dt, ps in parts.items():
            out[f"{PACKED}{g}:{dt}"] = _on_wire(np.concatenate(ps) if ps else np.zeros(0, dt), wire_dtype)
        layout[g] = entries
    return out, layout


def decode(arrays: dict[str, np.ndarray], layout: dict[str, list]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode` (arrays that are not packed pass through)."""
    out: dict[str, np.ndarray] = {}
    offsets: dict[str, int] = {}
    for g, entries in layout.items():
        for k, dt, shape in entries:
            pk = f"{PACKED}{g}:{dt}"
            if pk not in arrays:
                raise ValueError(f"packed array {pk!r} missing")
            n = int(np.prod(shape, dtype=np.int64))
            o = offsets.get(pk, 0)
            out[k] = np.asarray(arrays[pk][o:o + n]).astype(dt, copy=False).reshape(shape)
            offsets[pk] = o + n
    for pk, o in offsets.items():
        if o != np.asarray(arrays[pk]).size:
            raise ValueError(f"packed array {pk!r} has {np.asarray(arrays[pk]).size} values, layout {o}")
    out.update({k: v for k, v in arrays.items() if not k.startswith(PACKED)})
    return out


def layout_to_json(layout: dict[str, list]) -> str:
    return json.dumps(layout, separators=(",", ":"))


def layout_from_json(text: str) -> dict[str, list]:
    return json.loads(text) if text else {}


# ------------------------------------------------------------------------------------------
# the stage plan on the wire (run config strings cannot be mappings)
# ------------------------------------------------------------------------------------------
def format_stage_plan(plan: Mapping[str, int]) -> str:
    """``{"vae": 20, "diffusion": 4}`` -> ``"vae:20,diffusion:4"`` (stages in run order)."""
    for stage, n in plan.items():
        if not stage or any(c in stage for c in ":,") or int(n) != n or n < 0:
            raise ValueError(f"stage plan: bad entry {stage!r}: {n!r}")
    return ",".join(f"{stage}:{int(n)}" for stage, n in plan.items())


def parse_stage_plan(text: str) -> dict[str, int]:
    """Inverse of :func:`format_stage_plan`; ``""`` -> ``{}`` (a server that sent no plan).
    ValueError on anything else than ``STAGE:ROUNDS`` entries separated by commas."""
    plan: dict[str, int] = {}
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        stage, sep, n = part.partition(":")
        if not sep or not stage.strip() or not n.strip().isdigit():
            raise ValueError(f"stage plan {text!r}: expected STAGE:ROUNDS entries, got {part!r}")
        plan[stage.strip()] = int(n)
    return plan


# ------------------------------------------------------------------------------------------
# model config on the wire (every site must build the same model)
# ------------------------------------------------------------------------------------------
def model_config_to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def model_config_from_json(text: str):
    from addiff_core.config import model_config_from_dict

    return model_config_from_dict(json.loads(text), "<model config sent by the server>")
