"""Who a reply is about and whether it can be used: the node and site of each reply, the reason a
reply is unusable (in words the server chose), sites that sent nothing or got nothing, and the
screening of a round's train replies before aggregation (:mod:`server.validation`)."""
from __future__ import annotations

import logging
from typing import Any

from client.protocol import (ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, SITE_KEY, STATUS_FAILED, STATUS_REFUSED,
                             describe_failure, from_record, record_nbytes, to_record, widen)

from .strategies import ordered, site_of
from .validation import check_reply, norm_outliers, spec_of, update_norm

log = logging.getLogger("flwr.addiff")


def failure_reason(reply, default: str) -> str:
    """Why a reply is unusable, in words the server chose: a site's own failure reply carries a
    code from a closed list (``protocol.describe_failure``); of an error reply made by Flower only
    its code is kept (its reason may hold an exception's text, which may name site paths)."""
    if reply.has_error():
        from flwr.common.constant import ErrorCode

        names = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
        name = names.get(reply.error.code, "UNKNOWN").lower().replace("_", " ")
        return f"Flower error {reply.error.code}: {name}"
    info = reply.content.config_records.get(SITE_KEY, {})
    if str(info.get("status", "")) == STATUS_FAILED:
        return describe_failure(info.get("code", ""), info.get("error", ""))
    return default


def sent_to(msgs) -> dict[str, int]:
    """message id -> destination node of messages the Grid has pushed (it sets the ids)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}


def node_of(reply, sent: dict[str, int]) -> int:
    """The SuperNode a reply is about. Error replies the SuperLink makes itself
    (NODE_UNAVAILABLE once a node missed its heartbeats, REPLY_MESSAGE_UNAVAILABLE) come from
    node 1 (SUPERLINK_NODE_ID): the message they answer says which node it went to."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def common_metrics(replies) -> None:
    """Flower aggregates MetricRecords only when every reply has the same keys; sites may
    differ (e.g. DP sites report epsilon). Keep the shared keys for aggregation (metrics.jsonl
    already holds every site's full set)."""
    from flwr.app import MetricRecord

    keys = [set(r.content[METRICS_KEY].keys()) for r in replies]
    common = set.intersection(*keys) if keys else set()
    for r, k in zip(replies, keys):
        if k != common:
            r.content[METRICS_KEY] = MetricRecord({kk: v for kk, v in r.content[METRICS_KEY].items() if kk in common})


class Sites:
    """The sites of a run as the server learns them from their replies (node id -> site name)."""

    def __init__(self):
        self.names: dict[int, str] = {}

    def site_of(self, reply, node: int) -> str:
        site = site_of(reply)
        if reply.has_error() or site == f"node-{reply.metadata.src_node_id}":
            return self.names.get(node, f"node-{node}")
        self.names[node] = site
        return site

    def unanswered(self, msgs, replies, sent: dict[str, int], base: dict, timeout: float) -> list[dict]:
        """Error rows for the nodes that got a message but sent nothing back within ``timeout``."""
        got = {node_of(r, sent) for r in replies}
        rows = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if node not in got:
                site = self.names.get(node, f"node-{node}")
                log.warning("round %s: %s (node %s) sent no reply within %.0f s", base["round"], site, node, timeout)
                rows.append({"kind": "error", **base, "site": site, "node_id": node,
                             "reason": f"no reply within the round timeout ({timeout:g} s)"})
        return rows

    def absent(self, rows: list[dict], base: dict) -> list[dict]:
        """Rows for sites that took part before but got no message in this round (their
        SuperNode is not connected): they are left out too, and recorded as such."""
        present = {x["site"] for x in rows}
        out = []
        for name in sorted(set(self.names.values()) - present):
            log.warning("round %s: %s is not connected; left out", base["round"], name)
            out.append({"kind": "absent", **base, "site": name, "reason": "not connected (no message sent)"})
        return out

    def screen(self, replies, wire: dict, down: dict, base: dict, sent: dict[str, int], *,
               max_num_examples: int, update_norm_multiple: float) -> tuple[list, list[dict], int]:
        """Sort the replies of a round: failed (error), refused (privacy budget), rejected
        (:mod:`server.validation`), or good. ``base``: round, stage, attempt of every row.
        Returns (good replies, metrics rows, number of sites that answered: good + rejected +
        refused)."""
        wire = widen(wire)  # float16 on the wire (wire-dtype): checked, measured and aggregated in float32
        spec = spec_of(wire)
        rows: list[dict] = []
        candidates: list[tuple[Any, dict]] = []
        answered = 0
        for r in ordered(replies):
            row = self._reply_row(r, base, sent, down)
            if row["kind"] != "error":
                answered += 1
            if row["kind"] != "train":
                rows.append(row)
                continue
            got = widen(from_record(r.content[ARRAYS_KEY]))
            reason = check_reply(got, row["num_examples"], spec, max_num_examples)
            if reason is None:
                r.content[ARRAYS_KEY] = to_record(got)
                row["update_norm"] = update_norm(got, wire)
                candidates.append((r, row))
            else:
                rows.append({**row, "kind": "rejected", "reason": reason})
                log.warning("round %d: rejected the update of %s: %s", base["round"], row["site"], reason)
        outliers = norm_outliers({str(i): row["update_norm"] for i, (_, row) in enumerate(candidates)},
                                 update_norm_multiple)
        good = []
        for i, (r, row) in enumerate(candidates):
            if str(i) in outliers:
                rows.append({**row, "kind": "rejected", "reason": outliers[str(i)]})
                log.warning("round %d: rejected the update of %s: %s", base["round"], row["site"], outliers[str(i)])
                continue
            row["num_examples"] = int(row["num_examples"])
            rows.append(row)
            good.append(r)
        return good, rows, answered

    def _reply_row(self, r, base: dict, sent: dict[str, int], down: dict) -> dict:
        """The metrics row of one train reply: kind "refused", "error" or "train" (to be checked)."""
        node = node_of(r, sent)
        site = self.site_of(r, node)
        rnd = base["round"]
        status = "" if r.has_error() else str(r.content.config_records.get(SITE_KEY, {}).get("status", ""))
        if status == STATUS_REFUSED:
            info = r.content.config_records[SITE_KEY]
            m = dict(r.content[METRICS_KEY]) if METRICS_KEY in r.content.metric_records else {}
            log.warning("round %d: %s refused to train: %s", rnd, site, info.get("reason", ""))
            return {"kind": "refused", **base, "site": site, "node_id": node, "reason": str(info.get("reason", "")), **m}
        if r.has_error() or ARRAYS_KEY not in r.content.array_records or METRICS_KEY not in r.content.metric_records:
            reason = failure_reason(r, "reply without weights/metrics")
            log.warning("round %d: %s failed: %s", rnd, site, reason)
            return {"kind": "error", **base, "site": site, "node_id": node, "reason": reason}
        m = dict(r.content[METRICS_KEY])
        return {"kind": "train", **base, "site": site, "node_id": node, "num_examples": m.pop(NUM_EXAMPLES, None),
                **m, "bytes_down": down.get(node, 0), "bytes_up": record_nbytes(r.content[ARRAYS_KEY])}
