"""Secure aggregation (issue #26), unit level: the server's SecAgg+ driver against Flower's own
client mod (no model, no training), what secure aggregation refuses at start, and the checks a
site makes on its update before masking."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from addiff_core.config import ConfigError
from client.flower_compat import RECORD_KEY_CONFIGS, Key, Stage, set_task_identity
from helpers.federation import TINY
from client.secagg_mod import (BUFFER_SCALE, UPDATE_KEY, check_update, flat_update, secure_aggregation_mod,
                               secure_reply, unflatten)
from server.secagg import SecAggError, SecAggParams, SecAggRound, error_bound, majority, weight_ratio
from server.settings import from_run_config

PARAMS = SecAggParams(clip=8.0, quantization=2 ** 26, max_weight=10.0, threshold=2)


class Sites:
    """Fake sites behind a send function: Flower's ``secaggplus_mod`` (via the project's wrapper)
    with a handler answering a fixed update per node. ``silent``: node -> the first stage it no
    longer answers (a dropout); ``tamper``: node -> a function changing its collect reply."""

    def __init__(self, updates: dict[int, np.ndarray], weights: dict[int, int], silent=None, tamper=None):
        set_task_identity()
        self.updates, self.weights = updates, weights
        self.silent, self.tamper = dict(silent or {}), dict(tamper or {})
        self.ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in updates}
        self.received: list[Message] = []  # every reply the server got
        self.masked: list[bytes] = []  # the masked vectors among them, as received

    def handler(self, nid):
        def call_next(msg, ctxt):
            return Message(secure_reply(self.updates[nid], self.weights[nid], {"num-examples": self.weights[nid]},
                                        ConfigRecord({"name": f"site{nid}"})), reply_to=msg)
        return call_next

    def send(self, msgs):
        out = []
        for m in msgs:
            nid = m.metadata.dst_node_id
            stage = m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if nid in self.silent and Stage.all().index(stage) >= Stage.all().index(self.silent[nid]):
                continue
            r = secure_aggregation_mod(m, self.ctx[nid], self.handler(nid))
            if stage == Stage.COLLECT_MASKED_VECTORS and nid in self.tamper:
                self.tamper[nid](r)
            self.received.append(r)
            self.masked += list(r.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS, []))
            out.append(r)
        return out


def _round(sites: Sites, params=PARAMS, accepted=None):
    n = len(next(iter(sites.updates.values())))
    sa = SecAggRound(sites.send, list(sites.updates), params)
    sa.setup()
    sa.share_keys()
    msgs = {nid: Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=nid, message_type="train")
            for nid in sites.updates}
    replies = sa.collect(msgs, [(1,), (n,)])
    weights, (mean,) = sa.unmask(list(replies) if accepted is None else accepted)
    return sa, weights, mean


def _updates(k: int, n: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {100 + i: rng.normal(0, 0.05, n) for i in range(k)}, {100 + i: 3 + 2 * i for i in range(k)}


def _weighted(updates, weights, nodes):
    w = np.array([weight_ratio(weights[n], PARAMS.max_weight, PARAMS.quantization) for n in nodes], float)
    return sum(wi * updates[n] for wi, n in zip(w, nodes)) / w.sum(), [int(x) for x in w]


def test_the_unmasked_mean_is_the_weighted_mean_within_the_stated_bound():
    updates, weights = _updates(3)
    sites = Sites(updates, weights)
    _, total, mean = _round(sites)
    want, ratios = _weighted(updates, weights, list(updates))
    assert total == sum(ratios)
    err = float(np.max(np.abs(mean - want)))
    assert 0 < err <= error_bound(PARAMS, ratios), (err, error_bound(PARAMS, ratios))


def test_no_reply_the_server_gets_holds_a_site_update():
    """Everything the server received (keys, shares, masked vectors) is uncorrelated with every
    site's update: the masked vectors are uniform in [0, 2^32)."""
    from flwr.common import bytes_to_ndarray

    updates, weights = _updates(3)
    sites = Sites(updates, weights)
    _round(sites)
    vectors = [bytes_to_ndarray(b) for b in sites.masked]
    big = [v.astype(float) for v in vectors if v.size == 500]
    assert len(big) == 3 and not any(r.content.array_records for r in sites.received)
    for v in big:
        for u in updates.values():
            assert abs(np.corrcoef(v, u)[0, 1]) < 0.2


def test_a_site_silent_after_sharing_its_keys_is_left_out_of_the_sum():
    updates, weights = _updates(4)
    sites = Sites(updates, weights, silent={101: Stage.COLLECT_MASKED_VECTORS})
    sa, total, mean = _round(sites, SecAggParams(8.0, 2 ** 26, 10.0, 3))
    want, ratios = _weighted(updates, weights, [100, 102, 103])
    assert sa.dropped == {101: Stage.COLLECT_MASKED_VECTORS} and total == sum(ratios)
    assert float(np.max(np.abs(mean - want))) <= error_bound(PARAMS, ratios)


def test_two_dropouts_and_a_rejected_vector_still_unmask():
    """The pairwise masks of every site not in the sum are rebuilt from its key's shares."""
    updates, weights = _updates(5)
    sites = Sites(updates, weights, silent={101: Stage.COLLECT_MASKED_VECTORS, 103: Stage.COLLECT_MASKED_VECTORS})
    sa, total, mean = _round(sites, SecAggParams(8.0, 2 ** 26, 10.0, 2), accepted=[100, 102])  # 104 rejected
    want, ratios = _weighted(updates, weights, [100, 102])
    assert set(sa.dropped) == {101, 103, 104}
    assert float(np.max(np.abs(mean - want))) <= error_bound(PARAMS, ratios)


def test_below_the_threshold_the_round_fails_with_one_line():
    updates, weights = _updates(3)
    sites = Sites(updates, weights, silent={101: Stage.COLLECT_MASKED_VECTORS, 102: Stage.COLLECT_MASKED_VECTORS})
    with pytest.raises(SecAggError, match=r"^secure aggregation: 1 masked update\(s\) usable, fewer than the "
                                          r"reconstruction threshold 2$"):
        _round(sites)


def test_a_malformed_masked_vector_is_a_dropout_not_a_crash():
    def wrong_shape(reply):
        cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
        cfg[Key.MASKED_PARAMETERS] = cfg[Key.MASKED_PARAMETERS][:1]

    updates, weights = _updates(3)
    sites = Sites(updates, weights, tamper={102: wrong_shape})
    sa, _, mean = _round(sites)
    want, ratios = _weighted(updates, weights, [100, 101])
    assert sa.dropped == {102: Stage.COLLECT_MASKED_VECTORS}
    assert float(np.max(np.abs(mean - want))) <= error_bound(PARAMS, ratios)


def test_too_many_sites_for_the_quantization_range_is_refused():
    with pytest.raises(SecAggError, match="overflow"):
        SecAggRound(lambda m: [], list(range(64)), SecAggParams(8.0, 2 ** 26, 10.0, 2))
    assert majority(3) == 2 and majority(4) == 3 and majority(10) == 6


# -- the site's side -------------------------------------------------------------------------
def test_the_site_checks_its_update_before_masking():
    assert check_update(np.array([0.1, -0.2]), 5, 10, 8.0) is None
    assert check_update(np.array([0.1, np.nan]), 5, 10, 8.0) == "non-finite"
    assert check_update(np.array([0.1, 20.0]), 10, 10, 8.0) == "update-out-of-range"
    assert check_update(np.array([0.1, 20.0]), 3, 10, 8.0) is None  # weighted by 3/10: inside


def test_buffers_are_masked_at_a_smaller_scale_and_scaled_back():
    received = {"b.latent_scale": np.zeros(1, np.float32), "a.w": np.ones((2, 2), np.float32)}
    trained = {"b.latent_scale": np.array([9.6], np.float32), "a.w": np.full((2, 2), 1.5, np.float32)}
    flat = flat_update(trained, received, {"b.latent_scale"})
    assert flat.dtype == np.float64 and np.isclose(flat[-1], 9.6 / BUFFER_SCALE)
    back = unflatten(flat, received, {"b.latent_scale"})
    assert np.allclose(back["b.latent_scale"], 9.6) and np.allclose(back["a.w"], 0.5)


def test_a_plain_train_message_never_goes_through_the_protocol():
    set_task_identity()
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)
    assert secure_aggregation_mod(msg, ctx, lambda m, c: reply) is reply


def test_a_protocol_failure_stays_at_the_site(caplog):
    """A stage out of order (Flower's mod raises): a failure reply with a code, no exception text,
    neither in the reply nor on the console (in a simulation, the coordinator's)."""
    set_task_identity()
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.UNMASK,
                                                                Key.ACTIVE_NODE_ID_LIST: [7],
                                                                Key.DEAD_NODE_ID_LIST: [7]})}),
                  dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.DEBUG):
        reply = secure_aggregation_mod(msg, ctx, lambda m, c: None)
    site = reply.content.config_records["site"]
    assert site["status"] == "failed" and site["code"] == "secure-aggregation" and len(reply.content.items()) == 1
    assert "ValueError" in caplog.text and "both active and dropped" not in caplog.text


def test_the_update_travels_only_inside_the_site():
    """The handler's secure answer is only read by the mod: its reply keeps metrics and name."""
    set_task_identity()
    rd = secure_reply(np.ones(3), 2, {"num-examples": 2}, ConfigRecord({"name": "s"}))
    assert UPDATE_KEY in rd.array_records and rd["metrics"]["num-examples"] == 2
    assert isinstance(rd[UPDATE_KEY]["update"], Array) and isinstance(rd[UPDATE_KEY], ArrayRecord)


# -- refused at start ------------------------------------------------------------------------
def _cfg(**kw):
    return {"model-config": str(TINY), "site-files": "a.yaml,b.yaml,c.yaml", "secure-aggregation": True, **kw}


@pytest.mark.parametrize("kw, pattern", [
    ({"strategy": "fedmedian"}, "strategy fedmedian needs every site's update"),
    ({"strategy": "fedtrimmedavg"}, "strategy fedtrimmedavg needs every site's update"),
    ({"central-dp-noise": 1.0}, "central DP .* per-site DP-SGD"),
    ({"update-norm-multiple": 5.0}, "update-norm-multiple compares each site's update"),
    ({"secagg-threshold": 1}, "secagg-threshold 1"),
    ({"secagg-clip": 0.0}, "secagg-clip must be in"),
])
def test_what_does_not_combine_is_refused_with_one_line(kw, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        from_run_config(_cfg(**kw))
    assert "\n" not in str(e.value) and str(e.value).startswith("run config: secure-aggregation: ")


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_the_option_is_accepted_with_the_mean_based_strategies(strategy):
    s = from_run_config(_cfg(strategy=strategy, **{"update-norm-multiple": 0.0}))
    assert s.secure_aggregation and from_run_config(_cfg(strategy=strategy)).secure_aggregation


def test_a_site_never_reveals_both_secrets_of_one_node():
    """An unmask request listing a node as active and dropped (a server after both its mask seed
    and its key, i.e. its update) is refused at the site, before Flower's mod answers it."""
    updates, weights = _updates(3)
    sites = Sites(updates, weights)
    sa = SecAggRound(sites.send, list(updates), PARAMS)
    sa.setup()
    sa.share_keys()
    msgs = {n: Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in updates}
    sa.collect(msgs, [(1,), (500,)])
    ask = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [100, 101, 102],
                        Key.DEAD_NODE_ID_LIST: [101]})
    reply = secure_aggregation_mod(Message(RecordDict({RECORD_KEY_CONFIGS: ask}), dst_node_id=100,
                                           message_type="train"), sites.ctx[100], sites.handler(100))
    assert reply.content.config_records["site"]["code"] == "secure-aggregation"
    assert RECORD_KEY_CONFIGS not in reply.content.config_records
