"""What travels between the ServerApp and the ClientApps, and where relative paths point.

Shared by ``server/`` and ``client/`` (a hospital installs the whole ``addiff-fl`` package).

Messages (Flower 1.42 Message API, one ``RecordDict`` each):

* train request   ``{"arrays": ArrayRecord, "config": ConfigRecord}``; ``arrays`` holds the
  stage's own weights (prefix ``vae.``, ``diffusion.`` or ``unet.``) and, in a stage-2 round
  where the site needs it, the frozen global VAE too (``vae.*``).
* train reply     ``{"arrays": ArrayRecord, "metrics": MetricRecord, "site": ConfigRecord}``;
  ``metrics["num-examples"]`` = the site's training cases (the FedAvg weight); ``site["name"]``
  = the site name (MetricRecords hold numbers only). A site whose cached VAE does not match
  the round's ``vae-fingerprint`` replies ``{"site": {"name", "status": "missing-global-vae"}}``
  instead, and the server sends that site the round again with the VAE.
* evaluate request ``{"arrays": full model, "config"}``; reply ``{"metrics", "site"}`` with
  held-out metrics (numbers only; ``num-examples`` = held-out cases).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

STATUS_NEED_VAE = "missing-global-vae"
SITE_KEY = "site"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"
PROJECT_ENV = "ADDIFF_PROJECT_DIR"


# ------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------
def project_root() -> Path:
    """The folder relative paths of the run configuration resolve against.

    ``$ADDIFF_PROJECT_DIR`` if set; else the addiff-fl checkout that ``addiff_core`` is imported
    from (the project root of an editable install); else the current directory. Not the
    folder Flower unpacks the app bundle (FAB) into: site files and data stay where they are.
    """
    env = os.environ.get(PROJECT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    import addiff_core

    root = Path(addiff_core.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root
    return Path.cwd().resolve()


def resolve_path(value: str | os.PathLike, base: Path | None = None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else ((base or project_root()) / p).resolve()


def split_list(value: Any) -> list[str]:
    """'a.yaml, b.yaml' (run config strings cannot be lists) -> ['a.yaml', 'b.yaml']."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value or "").replace("\n", ",").split(",") if v.strip()]


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
# model config on the wire (every site must build the same model)
# ------------------------------------------------------------------------------------------
def model_config_to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def model_config_from_json(text: str):
    from addiff_core.config import model_config_from_dict

    return model_config_from_dict(json.loads(text), "<model config sent by the server>")
