"""One training round under secure aggregation (issue #26): the round loop's train round, with the
sites' updates summed through Flower's SecAgg+ (:mod:`server.secagg`) instead of received one by one.

What changes against a plain round (:meth:`server.federation.Federation.train_round`):

* the sites answer their *update*, masked; the server unmasks only the weighted mean update and
  adds it to the weights it sent: that is the weighted FedAvg of the sites' weights (weights
  ``round(n_i / max_weight * Q)``, ``n_i`` each site's training cases, capped by its first
  declaration as in a plain round). The strategy then sees one reply holding that mean, so
  FedAvg / FedProx return it and FedAdam takes its server step from it;
* what the server checked on each update (names, shapes, finite, norm vs the round's median) it
  cannot: the sites check their own update before masking (finite, inside ``secagg-clip``), the
  server checks each masked vector's shape and range, each plain example count, and that the
  unmasked weights add up to the counts the sites declared;
* a site that drops out after sharing its keys (no reply, a failure, a vector that fails the
  checks) is left out of the sum: its masks are rebuilt from the others' shares. The round fails
  (and may be retried, then resumed) once fewer than the reconstruction threshold remain.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from addiff_core.wire import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, PACKED, SITE_KEY, STATUS_NEED_VAE,
                              decode, encode, widen)

from client.records import record_nbytes, to_record

from client.secagg_mod import unflatten

from .replies import common_metrics, site_metrics
from .secagg import SecAggError, SecAggParams, SecAggRound, error_bound, majority, weight_ratio
from .validation import bounded_count, check_count

log = logging.getLogger("flwr.addiff")


class SecureRoundFailed(SecAggError):
    """A secure round attempt failed; ``rows`` are its metrics rows (nothing was aggregated)."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def protocol_params(fed: Any, nodes: list[int]) -> SecAggParams:
    """The round's SecAgg+ numbers: the run config's, with the largest example count the round's
    sites declared as the weight scale once every one of them has declared one (finer steps)."""
    s = fed.settings.raw
    declared = [fed.sites.declared.get(fed.sites.names.get(n, "")) for n in nodes]
    max_weight = max(declared) if declared and all(d is not None for d in declared) else s["secagg-max-weight"]
    threshold = int(s["secagg-threshold"]) or majority(len(nodes))
    threshold = max(threshold, int(fed.settings.min_sites), 2)
    if threshold > len(nodes):
        raise SecAggError(f"secure aggregation needs {threshold} site(s) (secagg-threshold / min-sites), "
                          f"{len(nodes)} connected")
    return SecAggParams(clip=float(s["secagg-clip"]), quantization=int(s["secagg-quantization"]),
                        max_weight=float(max_weight), threshold=threshold)


def _site_messages(fed: Any, rnd, out, params: SecAggParams) -> dict[int, Message]:
    """Each node's train message with the secure keys (its weight cap: its first declaration)."""
    msgs = {}
    for m in out.msgs:
        nid = m.metadata.dst_node_id
        has_vae = any(k.startswith(PACKED + "vae") for k in m.content[ARRAYS_KEY].keys())
        if rnd.stage == "diffusion" and not has_vae and nid not in fed.vae_nodes:
            # a site new to this server process gets the VAE with the round (a site asking for it
            # mid-protocol could not be sent the round again: the protocol's stages move on)
            out.vae = out.vae or encode(fed.arrays, ["vae"], fed.buffers, wire_dtype=fed.settings.wire_dtype)
            m = fed._with_vae(m, out.vae)
            out.down[nid] = record_nbytes(m.content[ARRAYS_KEY])
        cap = fed.sites.declared.get(fed.sites.names.get(nid, ""), int(params.max_weight))
        config = ConfigRecord({**dict(m.content[CONFIG_KEY].items()), "secure-aggregation": True,
                               "secagg-clip": params.clip, "secagg-max-weight": params.max_weight,
                               "secagg-weight-cap": int(min(cap, params.max_weight))})
        msgs[nid] = Message(RecordDict({ARRAYS_KEY: m.content[ARRAYS_KEY], CONFIG_KEY: config}), dst_node_id=nid,
                            message_type=m.metadata.message_type)
    return msgs


def _screen(fed: Any, replies: dict[int, Message], sa: SecAggRound, base: dict, down: dict,
            max_weight: float) -> tuple[list[Message], list[dict]]:
    """(the replies whose masked vector may join the sum, every reply's metrics row)."""
    s = fed.settings
    good, rows = [], []
    for who in fed.sites.identify(list(replies.values()), {}, set(down)):
        frame = {**base, "site": who.site, "node_id": who.node}
        asks_vae = _asks_for_vae(who.reply)
        if asks_vae:  # its cached VAE is not the global one: sent with its next round
            fed.vae_nodes.discard(who.node)
        if who.refusal is not None or who.node not in sa.state.vectors:
            row = fed.sites._reply_row(who, base, down)
            if row["kind"] == "error" and who.refusal is None:  # (so no masked vector came)
                row["reason"] = ("asked for the global VAE (sent with its next round)" if asks_vae
                                 else row["reason"].replace("reply without weights/metrics", "no usable masked update"))
            rows.append(row)
            continue
        metrics = dict(who.reply.content[METRICS_KEY]) if METRICS_KEY in who.reply.content.metric_records else {}
        reason = check_count(metrics.get(NUM_EXAMPLES), s.max_num_examples)
        if reason is not None:
            rows.append({**frame, "kind": "rejected", "reason": reason})
            continue
        claimed = int(metrics[NUM_EXAMPLES])
        used = min(bounded_count(claimed, fed.sites.declared.setdefault(who.site, claimed)), int(max_weight))
        row = {**fed.sites._site_part(metrics, who.site, base["round"]), "kind": "train", **frame,
               "num_examples": used, "bytes_down": down.get(who.node, 0) + sa.bytes_down.get(who.node, 0),
               "bytes_up": sa.bytes_up.get(who.node, 0)}
        if used != claimed:
            row["num_examples_claimed"] = claimed
        who.reply.content[METRICS_KEY] = MetricRecord({NUM_EXAMPLES: used, **site_metrics(metrics)[0]})
        rows.append(row)
        good.append(who.reply)
    return good, rows


def _asks_for_vae(reply: Message) -> bool:
    site = reply.content.config_records.get(SITE_KEY, {})
    return str(site.get("status", "")) == STATUS_NEED_VAE


def _mean_reply(fed: Any, out, good: list[Message], mean: np.ndarray, template: Message) -> Message:
    """One reply holding the weighted mean of the sites' weights (received weights + mean update),
    packed like the round's wire, and the weighted mean of their metrics: what the strategy sees."""
    from .flower_compat import aggregate_metricrecords

    received = decode(widen(out.wire), out.layout)
    separate = {k for k in out.wire if not k.startswith(PACKED)}
    update = unflatten(mean, received, separate)
    new = {k: (np.asarray(a, np.float64) + update[k]).astype(np.asarray(a).dtype) for k, a in received.items()}
    wire, _ = encode(new, list(out.layout), separate, order=out.layout)
    common_metrics(good)
    metrics = aggregate_metricrecords([r.content for r in good], NUM_EXAMPLES)
    metrics[NUM_EXAMPLES] = int(sum(int(r.content[METRICS_KEY][NUM_EXAMPLES]) for r in good))
    return Message(RecordDict({ARRAYS_KEY: to_record(wire), METRICS_KEY: metrics}), reply_to=template)


def train(fed: Any, rnd, attempt: int) -> tuple[float, Any, list[dict], list[Message], dict]:
    """Run one secure round attempt: (start time, the outgoing round, rows, [the mean reply],
    the round summary's extra fields). Raises :class:`SecureRoundFailed` with the attempt's rows."""
    t0 = time.perf_counter()
    out = fed._train_messages(rnd)
    nodes = sorted(m.metadata.dst_node_id for m in out.msgs)
    base = {"round": rnd.number, "stage": rnd.stage, "attempt": attempt}
    size = int(sum(np.asarray(v).size for v in out.stage_arrays.values()))
    rows: list[dict] = []
    try:
        params = protocol_params(fed, nodes)
        msgs = _site_messages(fed, rnd, out, params)
        sa = SecAggRound(fed._send_and_receive, nodes, params, group_id=str(rnd.number))
    except SecAggError as e:
        raise SecureRoundFailed(str(e), fed.sites.absent([], base)) from None
    try:
        sa.setup()
        sa.share_keys()
        replies = sa.collect(msgs, [(1,), (size,)])
        good, rows = _screen(fed, replies, sa, base, out.down, params.max_weight)
        weights, (mean,) = sa.unmask([r.metadata.src_node_id for r in good])
        ratios = [weight_ratio(int(r.content[METRICS_KEY][NUM_EXAMPLES]), params.max_weight, params.quantization)
                  for r in good]
        if weights != sum(ratios):
            raise SecAggError(f"secure aggregation: the unmasked weights ({weights}) do not add up to the counts the "
                              f"sites declared ({sum(ratios)}): a site masked another count")
    except SecAggError as e:
        raise SecureRoundFailed(str(e), _with_dropouts(fed, rows, sa, base, discard=True)) from None
    if rnd.stage == "diffusion":
        fed.vae_nodes.update(sa.state.sharing)  # the nodes its train message (with the VAE, if due) reached
    rows = _with_dropouts(fed, rows, sa, base, discard=False)
    names = {r.get("node_id"): r["site"] for r in rows}
    extra = {"secure_aggregation": True, "secagg_threshold": params.threshold, "secagg_max_weight": params.max_weight,
             "secagg_error_bound": error_bound(params, ratios),
             "bytes_down": int(sum(out.down.values()) + sum(sa.bytes_down.values())),
             "secagg_stage_seconds": sa.seconds,
             "secagg_dropped": {names.get(n, f"node-{n}"): st for n, st in sa.dropped.items()}}
    template = next(iter(msgs.values()))
    return t0, out, rows, [_mean_reply(fed, out, good, mean, template)], extra


def _with_dropouts(fed: Any, rows: list[dict], sa: SecAggRound, base: dict, *, discard: bool) -> list[dict]:
    """``rows`` plus a row for every node that dropped out before its reply was screened, and the
    sites not connected; a failed attempt's train rows become "discarded"."""
    seen = {r.get("node_id") for r in rows}
    for nid, stage in sorted(sa.dropped.items()):
        if nid not in seen:
            site = fed.sites.names.get(nid, f"node-{nid}")
            log.warning("round %s: %s dropped out at the secure aggregation's %s stage", base["round"], site, stage)
            rows.append({**base, "kind": "dropped", "site": site, "node_id": nid,
                         "reason": f"dropped out at the secure aggregation's {stage} stage"})
    rows += fed.sites.absent(rows, base)
    if discard:
        rows = [{**r, "kind": "discarded"} if r["kind"] == "train" else r for r in rows]
    return rows
