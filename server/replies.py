"""Who a reply is about and whether it can be used: the node and site of each reply, the reason a
reply is unusable (in words the server chose), sites that sent nothing or got nothing, and the
screening of a round's train replies before aggregation (:mod:`server.validation`).

A reply is a participant's word, so (issue #29.1-2):

* its name must be a site name (``config.is_site_name``) and is bound to its node at the first
  reply: a node may not change its name, and a second node claiming a known name is refused
  while the node that holds it is connected (a SuperNode restarted under a new node id takes
  its name over once the old node is gone); two nodes claiming one unbound name are both refused;
* its metric keys never shadow the server's (:data:`RESERVED`, in any spelling): such keys are
  dropped and listed in the row's ``ignored_metrics``;
* its example count is checked once and that one number is what the strategy weights by: the
  reply's MetricRecord is rebuilt with it, bounded by the site's first declaration
  (``validation.bounded_count``); a change is logged and metrics.jsonl keeps both numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from addiff_core.config import is_site_name

from addiff_core.wire import (ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, SITE_KEY, STATUS_FAILED, STATUS_REFUSED,
                              describe_failure, widen)

from client.records import from_record, record_nbytes, to_record

from .strategies import ordered
from .validation import bounded_count, check_count, check_reply, norm_outliers, spec_of, update_norm

log = logging.getLogger("flwr.addiff")


def failure_reason(reply, default: str) -> str:
    """Why a reply is unusable, in words the server chose: a site's own failure reply carries a
    code from a closed list (``wire.describe_failure``); of an error reply made by Flower only
    its code is kept (its reason may hold an exception's text, which may name site paths)."""
    if reply.has_error():
        from .flower_compat import error_code_name

        return f"Flower error {reply.error.code}: {error_code_name(reply.error.code)}"
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


# the server's own fields of a metrics row (train, round, final): a site's metric of one of
# these names, in any spelling ("num-examples", "Num_Examples"), is dropped
RESERVED = frozenset({"kind", "round", "stage", "attempt", "site", "node_id", "num_examples", "num_examples_claimed",
                      "ignored_metrics", "bytes_down", "bytes_up", "reason", "update_norm", "cases", "status",
                      "strategy", "sites", "left_out", "vae_sent", "seconds", "central_dp_weight",
                      "central_dp_epsilon"})


def _spelling(key: str) -> str:
    return str(key).strip().lower().replace("-", "_")


def site_metrics(metrics: dict) -> tuple[dict, list[str]]:
    """(the site's metrics without the server's keys, the keys dropped other than num-examples)."""
    keep = {k: v for k, v in metrics.items() if _spelling(k) not in RESERVED}
    return keep, sorted(k for k in metrics if k not in keep and k != NUM_EXAMPLES)


def claimed_name(reply) -> str | None:
    """The name a reply gives itself, None if it gives none (an error reply, a site that failed
    before reading its site file)."""
    try:
        if reply.has_error() or SITE_KEY not in reply.content.config_records:
            return None
        name = reply.content.config_records[SITE_KEY].get("name", "")
    except (KeyError, AttributeError):
        return None
    if name is None or (isinstance(name, str) and not name):
        return None
    return name if isinstance(name, str) else str(name)  # not a string: refused as no site name


@dataclass
class Who:
    """A reply, its node, the site it is recorded under, and why it is refused (None: it is not)."""

    reply: Any
    node: int
    site: str
    refusal: str | None = None

    def unusable(self) -> str | None:
        """Why an evaluation reply cannot be read (a refused name, a failure, no metrics), in
        words the server chose; None if it can."""
        if self.refusal is not None:
            return self.refusal
        if self.reply.has_error() or METRICS_KEY not in self.reply.content.metric_records:
            return failure_reason(self.reply, "reply without metrics")
        return None


class Sites:
    """The sites of a run as the server learns them from their replies: node id -> site name
    (bound at a node's first named reply), and each site's example count at its first
    accepted round."""

    def __init__(self):
        self.names: dict[int, str] = {}
        self.declared: dict[str, int] = {}

    def remember(self, history: list[dict]) -> None:
        """Declared example counts of a resumed run: a site's first accepted train row."""
        for r in history:
            if r.get("kind") in ("train", "discarded") and isinstance(r.get("num_examples"), (int, float)):
                self.declared.setdefault(str(r.get("site")), int(r["num_examples"]))

    # -- names ----------------------------------------------------------------------------------
    def identify(self, replies, sent: dict[str, int], connected: set[int]) -> list[Who]:
        """Each reply (in aggregation order) with its node and site, names bound or refused.
        ``connected``: the nodes messaged in this round (a name's holder among them keeps it)."""
        replies = ordered(replies)
        nodes = [node_of(r, sent) for r in replies]
        claims = [claimed_name(r) for r in replies]
        claimants: dict[str, set[int]] = {}
        for node, name in zip(nodes, claims):
            if name is not None:
                claimants.setdefault(name, set()).add(node)
        contested = {name: len(ns) for name, ns in claimants.items() if len(ns) > 1}
        return [self._bind(r, node, name, connected, contested) for r, node, name in zip(replies, nodes, claims)]

    def _bind(self, reply, node: int, name: str | None, connected: set[int], contested: dict[str, int]) -> Who:
        held = self.names.get(node)
        if name is None:
            return Who(reply, node, held or f"node-{node}")
        if not is_site_name(name):
            return Who(reply, node, held or f"node-{node}", f"the reply's name {ascii(name[:40])} is not a valid site "
                       "name (1-64 letters, digits, '_', '-' or '.')")
        if held is not None:
            return Who(reply, node, held, None if held == name else f"node {node} is {held}; its reply calls itself {name}")
        owner = next((n for n, s in self.names.items() if s == name), None)
        if owner is not None and owner in connected:
            return Who(reply, node, f"node-{node}", f"claims the site name {name}, which node {owner} holds")
        if owner is None and name in contested:
            return Who(reply, node, f"node-{node}", f"{contested[name]} nodes claim the unbound site name {name} at "
                       "once: none of them is used")
        if owner is not None:
            log.warning("%s now answers from node %s (node %s, which had the name, is not connected)", name, node, owner)
            del self.names[owner]
        self.names[node] = name
        return Who(reply, node, name)

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

    def evaluation(self, replies, sent: dict[str, int], connected: set[int], base: dict,
                   max_cases: int) -> tuple[list[dict], list[dict]]:
        """The final evaluation's rows, one per site, and the rows of the replies it cannot use
        (kind "error": failed; "rejected": a name it may not use or an implausible case count)."""
        rows, errors = [], []
        for who in self.identify(replies, sent, connected):
            reason = who.unusable()
            kind = "rejected" if reason is None or who.refusal is not None else "error"
            if reason is None:
                m = dict(who.reply.content[METRICS_KEY])
                reason = check_count(m.get(NUM_EXAMPLES), max_cases, minimum=0)
                if reason is None:
                    rows.append({**self._site_part(m, who.site, base["round"]), "site": who.site,
                                 "cases": int(m[NUM_EXAMPLES])})
                    continue
            errors.append({"kind": kind, **base, "site": who.site, "node_id": who.node, "reason": reason})
            log.warning("final evaluation: %s %s: %s", who.site, "failed" if kind == "error" else "rejected", reason)
        return rows, errors

    def screen(self, replies, wire: dict, down: dict, base: dict, sent: dict[str, int], *,
               max_num_examples: int, update_norm_multiple: float) -> tuple[list, list[dict], int]:
        """Sort the replies of a round: failed (error), refused (privacy budget), rejected (a name
        it may not use, :mod:`server.validation`), or good. ``base``: round, stage, attempt of
        every row; ``down``: bytes sent per node (the nodes messaged this round). Returns (good
        replies, metrics rows, number of sites that answered: good + rejected + refused)."""
        wire = widen(wire)  # float16 on the wire (wire-dtype): checked, measured and aggregated in float32
        spec = spec_of(wire)
        rows: list[dict] = []
        candidates: list[tuple[Who, dict]] = []
        answered = 0
        for who in self.identify(replies, sent, set(down)):
            row = self._reply_row(who, base, down)
            if row["kind"] != "error" and who.refusal is None:  # a node refused its name is no site
                answered += 1
            if row["kind"] != "train":
                rows.append(row)
                continue
            got = widen(from_record(who.reply.content[ARRAYS_KEY]))
            reason = check_reply(got, row["num_examples"], spec, max_num_examples)
            if reason is None:
                who.reply.content[ARRAYS_KEY] = to_record(got)
                row["update_norm"] = update_norm(got, wire)
                candidates.append((who, row))
            else:
                rows.append(self._rejected(row, reason))
        outliers = norm_outliers({str(i): row["update_norm"] for i, (_, row) in enumerate(candidates)},
                                 update_norm_multiple)
        good = []
        for i, (who, row) in enumerate(candidates):
            if str(i) in outliers:
                rows.append(self._rejected(row, outliers[str(i)]))
                continue
            self._weigh(who, row)
            rows.append(row)
            good.append(who.reply)
        return good, rows, answered

    @staticmethod
    def _rejected(row: dict, reason: str) -> dict:
        log.warning("round %d: rejected the update of %s: %s", row["round"], row["site"], reason)
        return {**row, "kind": "rejected", "reason": reason}

    def _weigh(self, who: Who, row: dict) -> None:
        """The example count the strategy weights by (checked, bounded by the site's first
        declaration) into the row and into the reply's rebuilt MetricRecord, beside the site's own
        metrics: the aggregation reads the very number metrics.jsonl records."""
        from flwr.app import MetricRecord

        claimed = int(row["num_examples"])
        declared = self.declared.setdefault(row["site"], claimed)
        used = bounded_count(claimed, declared)
        if claimed != declared:
            log.warning("round %d: %s claims %d training cases, %d at its first round: weighted by %d",
                        row["round"], row["site"], claimed, declared, used)
            row["num_examples_claimed"] = claimed
        row["num_examples"] = used
        metrics, _ = site_metrics(dict(who.reply.content[METRICS_KEY]))
        who.reply.content[METRICS_KEY] = MetricRecord({NUM_EXAMPLES: used, **metrics})

    def _reply_row(self, who: Who, base: dict, down: dict) -> dict:
        """The metrics row of one train reply: kind "rejected" (its name), "refused", "error" or
        "train" (to be checked). The site's metrics never overwrite the server's fields."""
        r, node, site, rnd = who.reply, who.node, who.site, base["round"]
        frame = {**base, "site": site, "node_id": node}
        if who.refusal is not None:
            log.warning("round %d: refused the reply of node %s: %s", rnd, node, who.refusal)
            return {"kind": "rejected", **frame, "reason": who.refusal}
        status = "" if r.has_error() else str(r.content.config_records.get(SITE_KEY, {}).get("status", ""))
        if status == STATUS_REFUSED:
            reason = str(r.content.config_records[SITE_KEY].get("reason", ""))[:500]
            m = dict(r.content[METRICS_KEY]) if METRICS_KEY in r.content.metric_records else {}
            log.warning("round %d: %s refused to train: %s", rnd, site, reason)
            return {**self._site_part(m, site, rnd), "kind": "refused", **frame, "reason": reason}
        if r.has_error() or ARRAYS_KEY not in r.content.array_records or METRICS_KEY not in r.content.metric_records:
            reason = failure_reason(r, "reply without weights/metrics")
            log.warning("round %d: %s failed: %s", rnd, site, reason)
            return {"kind": "error", **frame, "reason": reason}
        m = dict(r.content[METRICS_KEY])
        return {**self._site_part(m, site, rnd), "kind": "train", **frame, "num_examples": m.get(NUM_EXAMPLES),
                "bytes_down": down.get(node, 0), "bytes_up": record_nbytes(r.content[ARRAYS_KEY])}

    @staticmethod
    def _site_part(metrics: dict, site: str, rnd) -> dict:
        """A reply's own metrics for its row; keys of the server's fields dropped, and said so."""
        keep, ignored = site_metrics(metrics)
        if ignored:
            log.warning("round %s: %s sent metric(s) named like the server's fields; ignored: %s", rnd, site,
                        ", ".join(ascii(k)[:40] for k in ignored[:5]))
            keep["ignored_metrics"] = ignored
        return keep
