"""Helpers for the federation tests: an in-process Grid that hands messages to the ClientApp.

``FakeGrid`` implements the two Grid methods the ServerApp uses (``get_node_ids``,
``send_and_receive``) and calls the real ``client.client_app.app`` with a per-node Context,
so the server loop, the strategies and the ClientApp run unchanged, without Ray or sockets.
"""
from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


class FakeGrid:
    def __init__(self, n_nodes: int, client_app=None, node_configs: list[dict] | None = None, run_config=None):
        from client.client_app import app as default_app

        set_task_identity()
        self.client_app = client_app or default_app
        self.node_ids = [1000 + i for i in range(n_nodes)]
        cfgs = node_configs or [{"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)]
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(),
                                      run_config=dict(run_config or {}))
                         for nid, cfg in zip(self.node_ids, cfgs)}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            out.append(self.client_app(message=m, context=self.contexts[m.metadata.dst_node_id]))
        return out
