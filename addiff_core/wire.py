"""What travels between the ServerApp and the ClientApps (Flower-free; both sides import it).

Messages (Flower 1.42 Message API, one ``RecordDict`` each):

* train request   ``{"arrays": ArrayRecord, "config": ConfigRecord}``; ``arrays`` holds the
  stage's own weights (prefix ``vae.``, ``diffusion.`` or ``unet.``) and, in a stage-2 round
  where the site needs it, the frozen global VAE too (``vae.*``); packed, see :func:`encode`
  (``config["layout"]`` says what is where). The config's round numbers are read once into
  :class:`addiff_core.round_plan.RoundPlan`.
* train reply     ``{"arrays": ArrayRecord, "metrics": MetricRecord, "site": ConfigRecord}``;
  ``arrays`` packed like the request's stage; ``metrics["num-examples"]`` = the site's training
  cases (the FedAvg weight); ``site["name"]`` = the site name (MetricRecords hold numbers only).
  A site whose cached VAE does not match the round's ``vae-fingerprint`` replies
  ``{"site": {"name", "status": "missing-global-vae"}}`` instead, and the server sends that site
  the round again with the VAE. A site whose privacy budget would be exceeded replies
  ``{"site": {"name", "status": "refused", "reason"}, "metrics": {"epsilon", "delta",
  "dp_enabled"}}``: no weights; the server records it and goes on with the others.
* a site that cannot do the round (any exception in the ClientApp) replies
  ``{"site": {"name", "status": "failed", "code", "error"}}``: a code and an error class from
  :data:`SITE_ERROR_CODES` / :data:`SITE_ERROR_CLASSES`, nothing else (details stay in the
  site's log); ``name`` is "" when the site file could not be read.
* evaluate request ``{"arrays": full model, "config"}``; reply ``{"metrics", "site"}`` with
  held-out metrics (numbers only; ``num-examples`` = held-out cases).

Arrays <-> Flower records: ``client.records``.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

STATUS_NEED_VAE = "missing-global-vae"
STATUS_REFUSED = "refused"  # the site will not train (its privacy budget is spent); no weights
STATUS_FAILED = "failed"  # the site could not do the round; "code" and "error" from the closed lists below
# What a failed site tells the server: nothing but one code and one error class from these
# lists (never an exception message: it may name a path or a case id). Details stay in the
# site's own log.
SITE_ERROR_CODES = {
    "site-config": "the site file is invalid",
    "model-config": "the model configuration sent by the server is invalid",
    "round-config": "the round's plan sent by the server is invalid (stage, rounds, epochs)",
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
# Flower moves every Array of a message as one request per hop, so a stage's parameters travel
# as one flat array per dtype (``packed:<stage>:<dtype>``), the layout as JSON in the config.
# Buffers travel as themselves (FedAdam averages them); element-wise updates of the flat array
# equal doing them tensor by tensor.
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
           order: dict[str, list] | None = None,
           wire_dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Pack the arrays of each group -> (wire arrays, layout).

    Args:
        arrays: state-dict names -> arrays.
        groups: the stages to pack (state-dict prefix ``group.``).
        separate: names that travel as themselves (buffers).
        order: a layout to follow exactly (a site packs its reply like the request it got).
        wire_dtype: see ``WIRE_DTYPES`` (buffers sent separately always travel as themselves).

    Raises:
        ValueError: ``arrays`` do not fit ``order``.
    """
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


def encode_like(arrays: dict[str, np.ndarray], request_keys, groups, layout: dict[str, list],
                wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """``arrays`` packed as a request's weights were (a site's reply): in ``layout``'s order, and
    the names the request sent unpacked (``request_keys`` not under ``PACKED``: buffers) unpacked
    again. Raises ValueError as :func:`encode`."""
    separate = {k for k in request_keys if not k.startswith(PACKED)}
    return encode(arrays, list(groups), separate, order=layout, wire_dtype=wire_dtype)[0]


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
# model config on the wire (every site must build the same model)
# ------------------------------------------------------------------------------------------
def model_config_to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def model_config_from_json(text: str):
    from .config import model_config_from_dict

    return model_config_from_dict(json.loads(text), "<model config sent by the server>")
