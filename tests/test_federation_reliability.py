"""Server-side reliability: every reply is checked before aggregation, failed sites are left out
(and come back), too few replies -> retries -> a clear stop with the last good checkpoint, and
nothing but weights and numbers leaves a site.

The federation runs in-process (``FakeGrid`` calls the real ClientApp); hostile or crashing
sites are the real ClientApp with its reply tampered with, or replaced by an error reply as
Flower delivers it for a crashed ClientApp.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from helpers.federation import TINY, FakeGrid, synthetic_sites
from addiff_core.checkpoint import load_checkpoint
from addiff_core.config import load_model_config, load_site_config
from addiff_core.models import build_model
from server.federation import Federation, FederationError
from addiff_core.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_KEY, decode, layout_from_json
from client.records import from_record, to_record
from server.settings import from_run_config
from server.validation import ArraySpec, check_reply, norm_outliers, spec_of, update_norm

# ------------------------------------------------------------------------------------------
# pure checks
# ------------------------------------------------------------------------------------------
SPEC = {"w": ArraySpec((2, 3), "float32"), "b": ArraySpec((3,), "float32")}


def _arrays(**over):
    a = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    a.update(over)
    return a


@pytest.mark.parametrize("arrays,n,expect", [
    (_arrays(), 4, None),
    ({"w": np.zeros((2, 3), np.float32)}, 4, "missing 1 array(s) (b)"),
    (_arrays(extra=np.zeros(1, np.float32)), 4, "unexpected array(s) extra"),
    (_arrays(w=np.zeros((3, 2), np.float32)), 4, "w: shape (3, 2), expected (2, 3)"),
    (_arrays(b=np.ones(3, np.float64)), 4, "b: dtype float64, expected float32"),
    (_arrays(b=np.array([1, np.nan, np.inf], np.float32)), 4, "b: 2 non-finite value(s)"),
    (_arrays(), 0, "num-examples must be a positive whole number"),
    (_arrays(), -3, "num-examples must be a positive whole number"),
    (_arrays(), 2.5, "num-examples must be a positive whole number"),
    (_arrays(), float("nan"), "num-examples must be a positive whole number"),
    (_arrays(), True, "num-examples is not a number"),
    (_arrays(), None, "num-examples is not a number"),
    (_arrays(), 10**7, "num-examples 10000000 exceeds the configured maximum 1000"),
])
def test_check_reply(arrays, n, expect):
    reason = check_reply(arrays, n, SPEC, max_num_examples=1000)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason, reason


def test_update_norm_and_median_outliers():
    old = _arrays()
    new = _arrays(w=np.full((2, 3), 2.0, np.float32))
    assert update_norm(new, old) == pytest.approx(math.sqrt(6 * 4.0))
    assert update_norm(old, old) == 0.0
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}
    out = norm_outliers(norms, 10.0)
    assert list(out) == ["d"] and "median" in out["d"]
    assert norm_outliers(norms, 0.0) == {}  # off
    assert norm_outliers({"a": 1.0, "d": 50.0}, 10.0) == {}  # two updates: nothing to compare with
    assert norm_outliers({"a": 1.0, "b": 1.0, "c": 1.0}, 10.0) == {}


def test_spec_of_reads_names_shapes_dtypes():
    assert spec_of(_arrays()) == SPEC


# ------------------------------------------------------------------------------------------
# in the federation loop
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return synthetic_sites(tmp_path_factory.mktemp("fed_rel_sites"))


def settings(run_dir, sites, **kw):
    cfg = {"run-dir": str(run_dir), "site-files": ",".join(map(str, sites)), "model-config": str(TINY),
           "model-kind": "unet", "unet-rounds": 1, "local-epochs": 1, "eval-steps": 2, "eval-gamma": False,
           "report-figures": False}  # figures: test_report and the simulation test
    cfg.update(kw)
    return from_run_config(cfg)


def rows(run_dir, kind=None):
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if kind is None or r["kind"] == kind]


class Tamper:
    """The real ClientApp; the train reply of site ``index`` goes through ``fn(arrays, metrics)``
    (packed wire arrays and metrics, changed in place) or, with ``crash``, becomes an error reply."""

    def __init__(self, index: int, fn=None, *, crash: bool = False, rounds=None):
        from client.client_app import app

        self.app, self.index, self.fn, self.crash, self.rounds = app, index, fn, crash, rounds

    def __call__(self, message, context):
        hit = (int(context.node_config["partition-id"]) == self.index and message.metadata.message_type == "train"
               and (self.rounds is None or int(message.content[CONFIG_KEY]["server-round"]) in self.rounds))
        if hit and self.crash:
            return Message(Error(code=0, reason="ClientAppException: CUDA out of memory (simulated crash)"),
                           reply_to=message)
        reply = self.app(message=message, context=context)
        if hit and self.fn is not None:
            arrays = from_record(reply.content[ARRAYS_KEY])
            metrics = dict(reply.content[METRICS_KEY])
            self.fn(arrays, metrics)
            from flwr.app import MetricRecord

            reply.content[ARRAYS_KEY] = to_record(arrays)
            reply.content[METRICS_KEY] = MetricRecord(metrics)
        return reply


def _packed(arrays):
    return next(k for k in arrays if k.startswith("packed:"))


def _nan(a, m):
    k = _packed(a)
    a[k] = a[k].copy()
    a[k][7] = np.nan


def _truncate(a, m):
    k = _packed(a)
    a[k] = a[k][:-5].copy()


def _extra(a, m):
    a["unet.backdoor"] = np.zeros((32, 32, 32), np.float32)


def _float64(a, m):
    k = _packed(a)
    a[k] = a[k].astype(np.float64)


def _examples(a, m):
    m["num-examples"] = 10**9


def _boost(a, m):  # a "model replacement" attack: a huge step away from everyone else
    k = _packed(a)
    a[k] = (a[k] * 1000.0).astype(a[k].dtype)


@pytest.fixture(scope="module")
def good_sites_model(sites, tmp_path_factory):
    """The round-1 global model of a run with the two good sites only (sites 0 and 2)."""
    ref_dir = tmp_path_factory.mktemp("fed_rel_ref") / "ref"
    Federation(FakeGrid(2, node_configs=[{"partition-id": 0}, {"partition-id": 1}]),
               settings(ref_dir, [sites[0], sites[2]]), send_site_files=True).run()
    return load_checkpoint(ref_dir / "checkpoints" / "round_0001.pt")[0]


@pytest.mark.slow
@pytest.mark.xdist_group("bad_update")  # one worker computes `good_sites_model` once
@pytest.mark.parametrize("fn,reason", [
    (_nan, "non-finite"), (_truncate, "shape"), (_extra, "unexpected array(s) unet.backdoor"),
    (_float64, "dtype float64"), (_examples, "exceeds the configured maximum"), (_boost, "x the round's median"),
])
def test_a_bad_update_is_rejected_with_its_reason_and_left_out(sites, good_sites_model, tmp_path, fn, reason):
    run_dir = tmp_path / "run"
    grid = FakeGrid(len(sites), client_app=Tamper(1, fn))
    out = Federation(grid, settings(run_dir, sites), send_site_files=True).run()
    assert out["status"] == "complete"
    rejected = rows(run_dir, "rejected")
    assert [r["site"] for r in rejected] == [sites[1].stem] and reason in rejected[0]["reason"], rejected
    rnd = rows(run_dir, "round")[0]
    assert rnd["sites"] == sorted([sites[0].stem, sites[2].stem]) and rnd["left_out"] == {sites[1].stem: "rejected"}
    state, _, _ = load_checkpoint(run_dir / "checkpoints" / "round_0001.pt")
    assert all(torch.isfinite(v).all() for v in state.values())
    # the global model is the FedAvg of the two good sites only: same as a run without the bad site
    ref = good_sites_model
    assert state.keys() == ref.keys() and all(torch.allclose(state[k], ref[k], atol=1e-6) for k in ref)


@pytest.mark.slow
def test_a_failed_site_is_left_out_and_joins_the_next_round(sites, tmp_path):
    run_dir = tmp_path / "run"
    grid = FakeGrid(len(sites), client_app=Tamper(2, crash=True, rounds={1}))
    out = Federation(grid, settings(run_dir, sites, **{"min-sites": 2, "unet-rounds": 2}), send_site_files=True).run()
    assert out["status"] == "complete"
    err = rows(run_dir, "error")
    # recorded by its Flower error code only: the exception text Flower copies may name site paths
    assert len(err) == 1 and err[0]["round"] == 1 and err[0]["reason"] == "Flower error 0: unknown"
    # the node of a crashed ClientApp has no site name yet: the row names its node
    assert err[0]["node_id"] == grid.node_ids[2]
    rr = rows(run_dir, "round")
    assert rr[0]["sites"] == sorted([sites[0].stem, sites[1].stem])
    assert rr[1]["sites"] == sorted(f.stem for f in sites)  # back in round 2
    assert len(json.loads((run_dir / "final_metrics.json").read_text())) == 3


@pytest.mark.slow
def test_too_few_replies_are_retried_then_the_run_stops_with_the_last_good_checkpoint(sites, tmp_path):
    run_dir = tmp_path / "run"
    grid = FakeGrid(len(sites), client_app=Tamper(2, crash=True, rounds={2}))
    fed = Federation(grid, settings(run_dir, sites, **{"unet-rounds": 3, "round-retries": 1}), send_site_files=True)
    with pytest.raises(FederationError) as e:
        fed.run()
    msg = str(e.value)
    assert "round 2" in msg and "2 usable update(s), 2 of 3 site(s) answered (min-sites 3)" in msg
    assert "Gave up after 2 attempt(s)" in msg and "round_0001.pt" in msg and "--resume" in msg
    # two attempts at round 2, each leaving the crashed site's error and discarding the others
    err = rows(run_dir, "error")
    assert [(r["round"], r["attempt"]) for r in err] == [(2, 0), (2, 1)]
    assert len(rows(run_dir, "discarded")) == 4 and not [r for r in rows(run_dir, "train") if r["round"] == 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.pt")) == ["round_0001.pt"]
    load_checkpoint(run_dir / "checkpoints" / "round_0001.pt")  # intact (hash checked)
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["status"] == "failed" and "Gave up" in doc["error"]
    assert not (run_dir / "final_model.pt").exists()


# ------------------------------------------------------------------------------------------
# nothing but weights and numbers leaves a site
# ------------------------------------------------------------------------------------------
class Capture:
    """The real ClientApp, with every message it sends kept."""

    def __init__(self):
        from client.client_app import app

        self.app, self.sent = app, []

    def __call__(self, message, context):
        reply = self.app(message=message, context=context)
        wire = from_record(reply.content[ARRAYS_KEY]) if ARRAYS_KEY in reply.content.array_records else {}
        self.sent.append((message, reply, {k: v.copy() for k, v in wire.items()}))
        return reply


@pytest.mark.slow
def test_every_message_a_site_sends_holds_only_parameter_arrays_and_scalar_metrics(sites, tmp_path):
    run_dir = tmp_path / "run"
    cap = Capture()
    s = settings(run_dir, sites, **{"model-kind": "", "vae-rounds": 1, "diffusion-rounds": 1})
    Federation(FakeGrid(len(sites), client_app=cap), s, send_site_files=True).run()
    model_state = {k: tuple(v.shape) for k, v in build_model(load_model_config(TINY)).state_dict().items()}
    kinds = {}
    volume = 32 ** 3
    case_ids = {c.name for f in sites for c in load_site_config(f).data_dir.iterdir() if c.is_dir()}
    assert len(case_ids) == 9
    assert cap.sent
    for request, reply, _ in cap.sent:
        kinds[reply.metadata.message_type] = kinds.get(reply.metadata.message_type, 0) + 1
        assert not reply.has_error()
        assert set(reply.content.keys()) <= {ARRAYS_KEY, METRICS_KEY, SITE_KEY}
        # arrays: only the model's own parameters, with the model's shapes, once unpacked
        if ARRAYS_KEY in reply.content.array_records:
            assert reply.metadata.message_type == "train"
            wire = from_record(reply.content[ARRAYS_KEY])
            stage = str(request.content[CONFIG_KEY]["stage"])
            layout = layout_from_json(str(request.content[CONFIG_KEY]["layout"]))
            arrays = decode(wire, {stage: layout[stage]})
            assert arrays and all(k in model_state and tuple(v.shape) == model_state[k] for k, v in arrays.items())
            assert all(k.startswith(stage + ".") for k in arrays)
            n_params = sum(int(np.prod(model_state[k])) for k in model_state if k.startswith(stage + "."))
            assert sum(v.size for v in wire.values()) == n_params  # nothing else rides along
            assert not any(v.ndim >= 3 and v.size >= volume for v in arrays.values())
        else:
            assert reply.metadata.message_type == "evaluate"
        # metrics: numbers only
        metrics = dict(reply.content[METRICS_KEY]) if METRICS_KEY in reply.content.metric_records else {}
        for k, v in metrics.items():
            assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
        # the site record: its name (and a status), no paths, no case ids
        site = dict(reply.content[SITE_KEY])
        assert set(site) <= {"name", "status", "reason", "code", "error"} and site["name"] in {f.stem for f in sites}
        for v in site.values():
            assert isinstance(v, str) and "/" not in v and not any(c in v for c in case_ids)
    assert kinds == {"train": 6, "evaluate": 3}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregation_in_the_loop(sites, tmp_path, strategy):
    """Selected in the run config; the round's global model is the element-wise median (or,
    with three sites and beta 0.34, the middle value) of the sites' weights."""
    run_dir = tmp_path / "run"
    cap = Capture()
    Federation(FakeGrid(len(sites), client_app=cap), settings(run_dir, sites, strategy=strategy, **{"trim-beta": 0.34}),
               send_site_files=True).run()
    request = cap.sent[0][0]
    layout = layout_from_json(str(request.content[CONFIG_KEY]["layout"]))
    replies = [decode(w, layout) for _, r, w in cap.sent if r.metadata.message_type == "train"]
    assert len(replies) == 3
    state, _, meta = load_checkpoint(run_dir / "checkpoints" / "round_0001.pt")
    assert meta["strategy"] == strategy
    for k in replies[0]:
        want = np.median(np.stack([r[k] for r in replies]), axis=0)
        np.testing.assert_allclose(state[k].numpy(), want.reshape(state[k].shape), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# optional client-level central DP (Flower's server-side fixed clipping)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_central_dp_clips_each_update_adds_noise_and_accounts_per_round(sites, tmp_path):
    from addiff_core.privacy import epsilon_of

    def run(name, noise, clip):
        cap = Capture()
        run_dir = tmp_path / name
        s = settings(run_dir, sites, **{"unet-rounds": 2, "central-dp-noise": noise, "central-dp-clip": clip,
                                        "central-dp-delta": 1e-3})
        Federation(FakeGrid(len(sites), client_app=cap), s, send_site_files=True).run()
        layout = layout_from_json(str(cap.sent[0][0].content[CONFIG_KEY]["layout"]))
        sent = decode(from_record(cap.sent[0][0].content[ARRAYS_KEY]), layout)
        r1 = [decode(w, layout) for _, r, w in cap.sent[:3]]
        g1, _, _ = load_checkpoint(run_dir / "checkpoints" / "round_0001.pt")
        return run_dir, sent, r1, {k: g1[k].numpy().reshape(sent[k].shape) for k in sent}

    # no effective clipping, negligible noise: the global model is the UNIFORM mean of the sites
    _, sent, r1, g1 = run("wide", 1e-9, 1e3)  # noise std 1e-9 * 1e3 / 3
    for k in sent:
        np.testing.assert_allclose(g1[k], np.mean([r[k] for r in r1], axis=0), rtol=1e-4, atol=5e-6)
    # a tight clip: the global step is at most the clipping norm, whatever the sites did
    run_dir, sent, r1, g1 = run("tight", 1e-9, 1e-3)
    assert max(update_norm(r, sent) for r in r1) > 0.01  # the sites moved far more than the clip
    assert update_norm(g1, sent) <= 1e-3 * (1 + 1e-3)
    # one release per round, RDP-composed (sampling rate 1)
    eps = [r["central_dp_epsilon"] for r in rows(run_dir, "round")]
    assert eps[0] == pytest.approx(epsilon_of([(1e-9, 1.0, 1)], 1e-3)) and eps[1] > eps[0]
    # noise on: the same sites and clip give a different global model, run to run
    _, _, _, g_noisy = run("noisy", 1.0, 1e-3)
    assert any(not np.allclose(g_noisy[k], g1[k]) for k in g1)
    with pytest.raises(Exception, match="fedavg"):
        settings(tmp_path / "x", sites, **{"central-dp-noise": 1.0, "strategy": "fedmedian"})


class SilentGrid(FakeGrid):
    """A site that never answers in the given rounds (hangs past the round timeout)."""

    def __init__(self, n, silent_index: int, rounds):
        super().__init__(n)
        self.silent, self.rounds = self.node_ids[silent_index], set(rounds)

    def send_and_receive(self, messages, *, timeout=None):
        keep = [m for m in messages if not (m.metadata.dst_node_id == self.silent and m.metadata.message_type == "train"
                                            and int(m.content[CONFIG_KEY]["server-round"]) in self.rounds)]
        return super().send_and_receive(keep, timeout=timeout)


@pytest.mark.slow
def test_a_site_that_never_answers_is_recorded_by_name_and_the_round_goes_on(sites, tmp_path):
    run_dir = tmp_path / "run"
    grid = SilentGrid(len(sites), 1, rounds={2})
    out = Federation(grid, settings(run_dir, sites, **{"min-sites": 2, "unet-rounds": 2, "round-timeout": 7.0}),
                     send_site_files=True).run()
    assert out["status"] == "complete"
    err = rows(run_dir, "error")
    # named by the site it was in round 1, with the timeout as the reason
    assert [(r["round"], r["site"], r["node_id"]) for r in err] == [(2, sites[1].stem, grid.node_ids[1])]
    assert "no reply within the round timeout (7 s)" in err[0]["reason"]
    assert rows(run_dir, "round")[1]["sites"] == sorted([sites[0].stem, sites[2].stem])


class LateGrid(FakeGrid):
    """The third SuperNode connects only after the server has looked ``late`` times."""

    def __init__(self, n, late: int):
        super().__init__(n)
        self.late, self.calls = late, 0

    def get_node_ids(self):
        self.calls += 1
        return list(self.node_ids) if self.calls > self.late else list(self.node_ids[:-1])


@pytest.mark.slow
@pytest.mark.parametrize("wait", [0, 3])
def test_wait_sites_holds_the_first_round_for_every_expected_site(sites, tmp_path, wait):
    run_dir = tmp_path / "run"
    grid = LateGrid(len(sites), late=2)
    Federation(grid, settings(run_dir, sites, **{"min-sites": 2, "wait-sites": wait}), send_site_files=True).run()
    first = rows(run_dir, "round")[0]["sites"]
    assert first == (sorted(f.stem for f in sites) if wait == 3 else sorted(f.stem for f in sites[:2]))
