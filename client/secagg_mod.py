"""A site's side of secure aggregation (issue #26): Flower's ``secaggplus_mod``, unmodified, around
the train handler.

The server (``server.secagg``) drives Flower's four SecAgg+ stages; each stage is a train message
with a ``secaggplus_configs`` ConfigRecord, which only this mod reads (a plain train message goes
straight to the handler). In the masking stage Flower's mod calls the train handler, which (with
``secure-aggregation`` in its config) answers the site's *update* (trained minus received weights,
checked here at the site: finite, inside the clipping range) as one flat float64 vector; the mod
quantizes it, weights it by the site's example count, adds the masks and clears every array of
the reply. What leaves the site is its masked vector, its public keys and encrypted shares, and
its usual metrics and name: never its weights or update in the clear.

Flower's mod reads the legacy ``FitRes`` layout (``fitres.parameters`` ...); :func:`_legacy` and
:func:`_project_reply` translate the project's reply to it and back. An exception inside the
protocol stays at the site (its text could be anything): the server gets a failure reply with
the code ``secure-aggregation`` and the site's round counts as a dropout.
"""
from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from addiff_core.wire import METRICS_KEY, NUM_EXAMPLES, SITE_ERROR_CLASSES, SITE_KEY

from .flower_compat import RECORD_KEY_CONFIGS, Key, Stage, secaggplus_mod
from .site_failures import failed

log = logging.getLogger("flwr.addiff.client")

UPDATE_KEY = "secagg-update"  # the handler's reply: {"update": flat float64 vector} (inside the site only)
WEIGHT_KEY = "secagg-weight"  # the example count the mask weighs (MetricRecord of the handler's reply)
_LEGACY = "fitres"


class _NothingToMask(Exception):
    """The handler answered without an update (failed, refused, asked for the VAE)."""

    def __init__(self, reply: Message):
        super().__init__("no update")
        self.reply = reply


# Non-trainable buffers (e.g. ``diffusion.latent_scale``, calibrated by the sites from 0 to ~10 in
# the first diffusion round) jump far beyond a weight's step: they are masked at 1/BUFFER_SCALE
# (clipped at secagg-clip x BUFFER_SCALE, at BUFFER_SCALE x the step); the server scales them back.
BUFFER_SCALE = 1024.0


def flat_update(trained: dict[str, np.ndarray], received: dict[str, np.ndarray],
                buffers: frozenset[str] | set[str] = frozenset()) -> np.ndarray:
    """trained - received over the received arrays in sorted name order, one float64 vector (the
    server splits the mean back by the same order), ``buffers`` divided by :data:`BUFFER_SCALE`.
    float64: Flower's quantizer scales by up to 2^26 levels, beyond float32's 24-bit mantissa."""
    parts = []
    for k in sorted(received):
        d = (np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64)).ravel()
        parts.append(d / BUFFER_SCALE if k in buffers else d)
    return np.concatenate(parts or [np.zeros(0)])


def unflatten(mean: np.ndarray, received: dict[str, np.ndarray], buffers: frozenset[str] | set[str]) -> dict:
    """The inverse of :func:`flat_update` on the mean update: per array, buffers scaled back."""
    out, offset = {}, 0
    for k in sorted(received):
        a = np.asarray(received[k])
        d = mean[offset:offset + a.size].reshape(a.shape)
        out[k] = d * BUFFER_SCALE if k in buffers else d
        offset += a.size
    return out


def check_update(update: np.ndarray, weight: float, max_weight: float, clip: float) -> str | None:
    """The checks the server can no longer make on one update, made by the site before masking:
    finite, and inside the clipping range once weighted (Flower's quantizer would clip it silently).
    None when it may be masked, else the failure code."""
    if not np.isfinite(update).all():
        return "non-finite"
    if update.size and float(np.max(np.abs(update))) * weight / max_weight > clip:
        return "update-out-of-range"
    return None


def _legacy(content: RecordDict) -> RecordDict:
    """The handler's secure reply in the FitRes layout Flower's mod reads (the project's metrics
    and site records ride along untouched)."""
    update = content[UPDATE_KEY]["update"].numpy()
    weight = int(content[UPDATE_KEY + "-weight"][WEIGHT_KEY]) if UPDATE_KEY + "-weight" in content.metric_records else 0
    out = RecordDict({k: v for k, v in content.items() if k in (METRICS_KEY, SITE_KEY)})
    out[f"{_LEGACY}.parameters"] = ArrayRecord({"update": Array(np.ascontiguousarray(update))})
    out[f"{_LEGACY}.num_examples"] = MetricRecord({"num_examples": weight})
    out[f"{_LEGACY}.metrics"] = ConfigRecord({})
    out[f"{_LEGACY}.status"] = ConfigRecord({"code": 0, "message": "Success"})
    return out


def _project_reply(reply: Message, request: Message) -> Message:
    """Only the site's metrics, name and the protocol's own record go back."""
    keep = {k: v for k, v in reply.content.items() if k in (METRICS_KEY, SITE_KEY, RECORD_KEY_CONFIGS)}
    return Message(RecordDict(keep), reply_to=request)


def _failure(request: Message, exc: BaseException) -> Message:
    cls = next((c for c in SITE_ERROR_CLASSES if type(exc).__name__ == c), "Exception")
    # the class only: in a simulation this console is the coordinator's (site_failures.site_log)
    log.error("secure aggregation failed at this site (%s)", type(exc).__name__)
    return failed(request, "", "secure-aggregation", cls)


def _refuse_a_double_unmask(configs: ConfigRecord) -> None:
    """A node both active and dropped in one unmask request would get the server both of its
    secrets (its mask seed and its key), hence its update: Flower's mod does not check this.

    Raises:
        ValueError: the request names a node in both lists.
    """
    if configs.get(Key.STAGE) == Stage.UNMASK:
        active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST, []), configs.get(Key.DEAD_NODE_ID_LIST, [])
        if set(active) & set(dead):
            raise ValueError("unmask request names a node both active and dropped")


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """The ClientApp's train mod: SecAgg+ stages to Flower's mod, everything else to the handler."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train_in_legacy_layout(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error() or UPDATE_KEY not in reply.content.array_records:
            raise _NothingToMask(reply)
        return Message(_legacy(reply.content), reply_to=m)

    try:
        _refuse_a_double_unmask(msg.content.config_records[RECORD_KEY_CONFIGS])
        out = secaggplus_mod(msg, ctxt, train_in_legacy_layout)
    except _NothingToMask as e:  # the handler's own failure/refusal reply, as it is
        return Message(RecordDict({k: v for k, v in e.reply.content.items() if k in (METRICS_KEY, SITE_KEY)}),
                       reply_to=msg)
    except Exception as e:  # noqa: BLE001 - nothing may leave the site as an exception
        return _failure(msg, e)
    return _project_reply(out, msg)


def secure_reply(update: np.ndarray, weight: int, metrics: dict, site: ConfigRecord) -> RecordDict:
    """The train handler's answer under secure aggregation (read by :func:`_legacy` only)."""
    return RecordDict({UPDATE_KEY: ArrayRecord({"update": Array(np.ascontiguousarray(update))}),
                       UPDATE_KEY + "-weight": MetricRecord({WEIGHT_KEY: int(weight)}),
                       METRICS_KEY: MetricRecord({NUM_EXAMPLES: metrics[NUM_EXAMPLES], **metrics}), SITE_KEY: site})
