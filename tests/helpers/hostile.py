"""Sites that train nothing and may lie: the server's side of a federation in milliseconds.

``FakeSite`` answers a train message with the weights it was sent plus its own ``offset`` (a
plausible, small update) and the metrics it chooses (``metrics(round)``: a liar picks its
example count, shadow keys, ...), and an evaluate message with a fixed held-out row.
``HostileGrid`` delivers messages to such sites by node id; a site may join late
(``joins``: the first round its node is connected) or answer under any name.
(tests/test_hostile_federation.py)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.flower_compat import set_task_identity
from addiff_core.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_KEY
from client.records import from_record, to_record
from helpers.federation import TINY
from server.settings import from_run_config


@dataclass
class FakeSite:
    name: str
    offset: float
    metrics: Callable[[int], dict] = field(default=lambda rnd: {"num-examples": 3})
    joins: int = 1  # the first round its SuperNode is connected
    eval_name: str | None = None  # the name of its evaluate reply (default: ``name``)
    eval_metrics: dict = field(default_factory=dict)  # more held-out metrics (any keys)

    def train(self, msg: Message) -> Message:
        sent = from_record(msg.content[ARRAYS_KEY])
        out = {k: (v + np.asarray(self.offset, v.dtype)) if v.dtype.kind == "f" else v for k, v in sent.items()}
        rnd = int(msg.content[CONFIG_KEY]["server-round"])
        return Message(RecordDict({ARRAYS_KEY: to_record(out), METRICS_KEY: MetricRecord(self.metrics(rnd)),
                                   SITE_KEY: ConfigRecord({"name": self.name})}), reply_to=msg)

    def evaluate(self, msg: Message) -> Message:
        metrics = MetricRecord({"num-examples": 2, "mae_gy": 100.0 * self.offset, **self.eval_metrics})
        return Message(RecordDict({METRICS_KEY: metrics, SITE_KEY: ConfigRecord({"name": self.eval_name or self.name})}),
                       reply_to=msg)


class HostileGrid:
    """Flower's Grid, as far as the ServerApp uses it, over ``FakeSite`` s (node ids 2000, 2001, ...)."""

    def __init__(self, sites: list[FakeSite]):
        set_task_identity()
        self.sites = {2000 + i: s for i, s in enumerate(sites)}
        self.round = 1

    def get_node_ids(self) -> list[int]:
        return [n for n, s in self.sites.items() if s.joins <= self.round]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        out = []
        for m in messages:
            site = self.sites[m.metadata.dst_node_id]
            if m.metadata.message_type == "train":
                out.append(site.train(m))
                self.round = int(m.content[CONFIG_KEY]["server-round"]) + 1  # next round's connections
            else:
                out.append(site.evaluate(m))
        return out


def hostile_settings(run_dir: Path, **kw):
    """A U-Net run of ``configs/tiny.yaml`` with no site files (a deployment: names come from replies)."""
    cfg = {"run-dir": str(run_dir), "model-config": str(TINY), "model-kind": "unet", "unet-rounds": 1,
           "local-epochs": 1, "eval-steps": 1, "eval-gamma": False, "report-figures": False, "min-sites": 2}
    cfg.update(kw)
    return from_run_config(cfg)


def metrics_rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if kind is None or r["kind"] == kind]


def checkpoint_arrays(run_dir: Path, rnd: int) -> dict[str, np.ndarray]:
    from addiff_core.checkpoint import load_checkpoint

    state, _, _ = load_checkpoint(run_dir / "checkpoints" / f"round_{rnd:04d}.pt")
    return {k: v.numpy() for k, v in state.items()}
