"""Federation glue without training: aggregation, strategies, run config, site lookup, tables, certs.

FedAvg is checked through the strategy's own aggregation path (Flower Message / ArrayRecord /
MetricRecord objects), against a weighted mean computed by hand.
"""
from __future__ import annotations

import random
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client.flower_compat import set_task_identity
from addiff_core.wire import fingerprint
from client.records import from_record, record_nbytes, to_record
from server.settings import CentralDPParams, FedAdamParams
from server.strategies import StagedFedAdam, StagedFedAvg, build_strategy, ordered

ROOT = Path(__file__).resolve().parents[1]


class _NodeGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def _request(node_id: int) -> Message:
    set_task_identity()
    return Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN)


def _reply(node_id: int, site: str, arrays: dict[str, np.ndarray], n: int, **metrics) -> Message:
    content = RecordDict({"arrays": to_record(arrays),
                          "metrics": MetricRecord({"num-examples": n, **metrics}),
                          "site": ConfigRecord({"name": site})})
    return Message(content, reply_to=_request(node_id))


def test_fedavg_aggregate_is_the_case_weighted_mean():
    a = {"vae.w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "vae.b": np.array([0.5], np.float32)}
    b = {"vae.w": np.array([[5.0, 6.0], [7.0, 8.0]], np.float32), "vae.b": np.array([-1.5], np.float32)}
    replies = [_reply(11, "hospital_a", a, 3, train_loss=1.0), _reply(22, "hospital_b", b, 1, train_loss=3.0)]
    strategy = build_strategy("fedavg", min_sites=2)
    agg, metrics = strategy.aggregate_train(1, replies)
    out = from_record(agg)
    # by hand: (3 * a + 1 * b) / 4
    np.testing.assert_allclose(out["vae.w"], [[2.0, 3.0], [4.0, 5.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["vae.b"], [0.0], atol=1e-6)
    assert metrics["train_loss"] == pytest.approx(1.5)
    assert "num-examples" not in metrics


def test_fedavg_result_does_not_depend_on_reply_order():
    rng = np.random.default_rng(0)
    sites = [(f"hospital_{c}", {"w": rng.normal(size=(64,)).astype(np.float32)}, n)
             for c, n in zip("abcde", (3, 7, 1, 4, 2))]
    replies = [_reply(100 + i, s, arr, n) for i, (s, arr, n) in enumerate(sites)]
    strategy = StagedFedAvg(min_train_nodes=5, min_available_nodes=5)
    ref = from_record(strategy.aggregate_train(1, replies)[0])["w"]
    shuffled = list(replies)
    random.Random(1).shuffle(shuffled)
    again = from_record(strategy.aggregate_train(1, shuffled)[0])["w"]
    assert ref.tobytes() == again.tobytes()  # bit-for-bit: resume gives the same weights
    assert [m.content["site"]["name"] for m in ordered(shuffled)] == [s for s, _, _ in sites]


def test_robust_aggregation_median_and_trimmed_mean():
    """FedMedian / FedTrimmedAvg: element-wise, so one wild site barely moves the result."""
    rng = np.random.default_rng(5)
    good = [rng.normal(size=(5, 8)).astype(np.float32) for _ in range(4)]
    wild = np.full((5, 8), 1e6, np.float32)
    stack = np.stack(good + [wild])

    def replies():  # fresh each time: Flower's FedMedian consumes the replies' arrays
        return [_reply(100 + i, f"hospital_{c}", {"unet.w": w}, n)
                for i, (c, w, n) in enumerate(zip("abcde", good + [wild], (3, 1, 2, 5, 100)))]

    med = from_record(build_strategy("fedmedian", min_sites=5).aggregate_train(1, replies())[0])["unet.w"]
    np.testing.assert_allclose(med, np.median(stack, axis=0), rtol=1e-6)
    assert np.abs(med).max() < 10  # the wild site is out-voted
    # trimmed mean, beta 0.2 of 5 sites: drop the lowest and the highest value of each element
    tm = from_record(build_strategy("fedtrimmedavg", min_sites=5, trim_beta=0.2).aggregate_train(1, replies())[0])["unet.w"]
    np.testing.assert_allclose(tm, np.sort(stack, axis=0)[1:-1].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(tm).max() < 10
    # FedAvg, for contrast, is dragged away by the wild (and heavily weighted) site
    avg = from_record(build_strategy("fedavg", min_sites=5).aggregate_train(1, replies())[0])["unet.w"]
    assert np.abs(avg).min() > 1e5


def test_fedprox_sends_mu_to_the_sites():
    set_task_identity()
    strategy = build_strategy("fedprox", min_sites=2, proximal_mu=0.05)
    msgs = list(strategy.configure_train(3, to_record({"vae.w": np.zeros(2, np.float32)}), ConfigRecord({}),
                                         _NodeGrid([1, 2])))
    assert len(msgs) == 2
    assert all(m.content["config"]["proximal-mu"] == pytest.approx(0.05) for m in msgs)
    assert all(m.content["config"]["server-round"] == 3 for m in msgs)


def test_fedadam_new_stage_fresh_moments_buffers_averaged_and_state_roundtrip():
    set_task_identity()
    grid = _NodeGrid([1, 2])
    s = build_strategy("fedadam", min_sites=2, fedadam=FedAdamParams(eta=0.01, tau=1e-6),
                       buffer_keys=["diffusion.latent_scale"])
    assert isinstance(s, StagedFedAdam)
    g_vae = {"vae.w": np.zeros(4, np.float32)}
    list(s.configure_train(1, to_record(g_vae), ConfigRecord({}), grid))
    s.aggregate_train(1, [_reply(1, "a", {"vae.w": np.full(4, 0.1, np.float32)}, 1),
                          _reply(2, "b", {"vae.w": np.full(4, 0.3, np.float32)}, 1)])
    assert set(s.m_t) == {"vae.w"}
    # stage 2: other keys; the moments restart, the buffer is averaged, not stepped
    g_diff = {"diffusion.w": np.zeros(3, np.float32), "diffusion.latent_scale": np.array(0.0, np.float32)}
    list(s.configure_train(2, to_record(g_diff), ConfigRecord({}), grid))
    assert s.m_t is None
    agg, _ = s.aggregate_train(2, [
        _reply(1, "a", {"diffusion.w": np.full(3, 1.0, np.float32), "diffusion.latent_scale": np.array(2.0, np.float32)}, 1),
        _reply(2, "b", {"diffusion.w": np.full(3, 1.0, np.float32), "diffusion.latent_scale": np.array(4.0, np.float32)}, 3)])
    out = from_record(agg)
    assert out["diffusion.latent_scale"].item() == pytest.approx(3.5)  # (2 * 1 + 4 * 3) / 4
    assert np.all(out["diffusion.w"] > 0) and np.all(out["diffusion.w"] < 1.0)  # an Adam step towards the mean
    state = s.state_dict()
    s2 = build_strategy("fedadam", min_sites=2)
    s2.load_state_dict(state)
    assert set(s2.m_t) == set(s.m_t) and s2.stage_keys == s.stage_keys
    for k in s.m_t:
        np.testing.assert_array_equal(s2.m_t[k], s.m_t[k])
        np.testing.assert_array_equal(s2.v_t[k], s.v_t[k])


def test_packing_roundtrip_and_fedavg_on_packed_equals_fedavg_per_tensor():
    from addiff_core.wire import decode, encode

    rng = np.random.default_rng(3)
    def model(seed_shift):
        return {"diffusion.a.weight": rng.normal(size=(4, 3, 3)).astype(np.float32),
                "diffusion.a.bias": rng.normal(size=(4,)).astype(np.float32),
                "diffusion.latent_scale": np.array(1.5 + seed_shift, np.float32),
                "diffusion.b.weight": rng.normal(size=(2, 4)).astype(np.float32)}

    a, b = model(0), model(1)
    wire, layout = encode(a, ["diffusion"], separate={"diffusion.latent_scale"})
    assert set(wire) == {"packed:diffusion:float32", "diffusion.latent_scale"}
    back = decode(wire, layout)
    assert all(np.array_equal(back[k], a[k]) and back[k].shape == a[k].shape for k in a)
    wire_b, _ = encode(b, ["diffusion"], separate={"diffusion.latent_scale"}, order=layout)
    strategy = build_strategy("fedavg", min_sites=2)
    packed = decode(from_record(strategy.aggregate_train(1, [_reply(1, "a", wire, 3), _reply(2, "b", wire_b, 1)])[0]),
                    layout)
    plain = from_record(strategy.aggregate_train(1, [_reply(1, "a", a, 3), _reply(2, "b", b, 1)])[0])
    for k in a:
        assert packed[k].tobytes() == plain[k].reshape(a[k].shape).tobytes()  # bit for bit
    with pytest.raises(ValueError, match="layout"):
        encode({**b, "diffusion.extra": np.zeros(1, np.float32)}, ["diffusion"], order=layout)


def test_record_helpers():
    arrays = {"a.x": np.arange(6, dtype=np.float32).reshape(2, 3), "b.y": np.ones(2, np.int64)}
    rec = to_record(arrays)
    back = from_record(rec)
    assert all(np.array_equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype for k in arrays)
    assert record_nbytes(rec) >= 6 * 4 + 2 * 8
    assert fingerprint(arrays, "a.") == fingerprint({"a.x": arrays["a.x"].copy()}, "a.")
    assert fingerprint(arrays, "a.") != fingerprint({"a.x": arrays["a.x"] + 1}, "a.")


# ------------------------------------------------------------------------------------------
# run config
# ------------------------------------------------------------------------------------------
def test_run_config_defaults_match_pyproject():
    from server.settings import DEFAULTS

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg == DEFAULTS
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"], \
        "flwr run would rewrite pyproject.toml to migrate a [tool.flwr.federations] section"


def test_run_settings_defaults_are_the_run_config_defaults():
    import dataclasses

    from addiff_core.config import ModelConfig
    from server.settings import DEFAULTS, RunSettings

    s = RunSettings(run_dir=ROOT, site_files=(), model=ModelConfig(), model_config_file=None)
    defaulted = {f.name for f in dataclasses.fields(RunSettings) if f.default is not dataclasses.MISSING}
    checked = [k for k in DEFAULTS if k.replace("-", "_") in defaulted]
    assert len(checked) >= 18
    for key in checked:
        assert getattr(s, key.replace("-", "_")) == DEFAULTS[key], key


def test_strategy_registry_builds_every_strategy_with_its_hyper_parameters():
    from addiff_core.config import ConfigError
    from server.run_config_schema import strategy_help
    from server.settings import DEFAULTS, STRATEGIES, check_central_dp

    assert list(STRATEGIES) == ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"]
    for name, info in STRATEGIES.items():
        assert set(info.params) <= set(DEFAULTS), name  # hyper-parameters are run-config keys
        s = build_strategy(name, min_sites=2, buffer_keys=["diffusion.latent_scale"])
        assert type(s).__name__ == info.cls and s.buffer_keys == {"diffusion.latent_scale"}
        for key, kw in info.params.items():
            assert getattr(s, kw) == DEFAULTS[key], (name, key)
        assert name in strategy_help()
    assert build_strategy("fedprox", min_sites=2, proximal_mu=0.05).proximal_mu == 0.05
    assert build_strategy("fedtrimmedavg", min_sites=2, trim_beta=0.1).beta == 0.1
    # central DP: one rule, for the run config and for build_strategy
    check_central_dp("fedavg", 1.0)
    check_central_dp("fedmedian", 0.0)
    for name in ("fedprox", "fedadam", "fedmedian", "fedtrimmedavg"):
        with pytest.raises(ConfigError, match="central DP needs strategy fedavg"):
            check_central_dp(name, 1.0)
        with pytest.raises(ValueError, match="central DP needs strategy fedavg"):
            build_strategy(name, min_sites=2, central_dp=CentralDPParams(noise=1.0, clip=1.0, delta=1e-3))


def test_run_config_schedule_and_errors(tmp_path):
    from addiff_core.config import ConfigError
    from server.settings import from_run_config

    s = from_run_config({"run-dir": str(tmp_path), "vae-rounds": 2, "diffusion-rounds": 3})
    assert [(r.number, r.stage, r.stage_round) for r in s.schedule] == [
        (1, "vae", 1), (2, "vae", 2), (3, "diffusion", 1), (4, "diffusion", 2), (5, "diffusion", 3)]
    assert s.model.kind == "diffusion" and s.required_sites == 3
    assert s.site_files[0] == ROOT / "sites" / "hospital_a.yaml"  # relative: against the project root
    u = from_run_config({"model-kind": "unet", "unet-rounds": 2})
    assert [r.stage for r in u.schedule] == ["unet", "unet"]
    with pytest.raises(ConfigError, match="unknown key"):
        from_run_config({"num-rounds": 3})
    with pytest.raises(ConfigError, match="strategy"):
        from_run_config({"strategy": "scaffold"})
    with pytest.raises(ConfigError, match="vae-rounds"):
        from_run_config({"vae-rounds": 0})
    with pytest.raises(ConfigError, match="must be int"):
        from_run_config({"vae-rounds": "2"})


# ------------------------------------------------------------------------------------------
# which site is this SuperNode?
# ------------------------------------------------------------------------------------------
def _ctx(node_config, run_config=None):
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def test_site_file_lookup(tmp_path):
    from addiff_core.config import ConfigError
    from client.site_tasks import site_file_for

    # deployment: the node config names the file; relative paths: the project root
    assert site_file_for(_ctx({"site-config": "sites/hospital_b.yaml"}), {}) == ROOT / "sites" / "hospital_b.yaml"
    assert site_file_for(_ctx({"site-config": str(tmp_path / "x.yaml")}), {}) == tmp_path / "x.yaml"
    # simulation: partition-id indexes site-files (run config, or the train config in-process)
    files = f"{tmp_path}/a.yaml, {tmp_path}/b.yaml"
    nc = {"partition-id": 1, "num-partitions": 2}
    assert site_file_for(_ctx(nc, {"site-files": files}), {}) == tmp_path / "b.yaml"
    assert site_file_for(_ctx(nc), {"site-files": files}) == tmp_path / "b.yaml"
    with pytest.raises(ConfigError, match="num-supernodes=2"):
        site_file_for(_ctx({"partition-id": 2, "num-partitions": 3}, {"site-files": files}), {})
    with pytest.raises(ConfigError, match="site-config"):
        site_file_for(_ctx({}), {})


def test_demo_site_files_are_valid():
    from addiff_core.config import load_site_config

    names = set()
    for f in ("hospital_a", "hospital_b", "hospital_c", "TEMPLATE"):
        names.add(load_site_config(ROOT / "sites" / f"{f}.yaml").name)
    assert len(names) == 4


def test_model_configs_are_valid():
    from addiff_core.config import load_model_config

    assert load_model_config(ROOT / "configs" / "demo.yaml").grid.size == 32
    assert load_model_config(ROOT / "configs" / "tiny.yaml").sample_steps <= 4


# ------------------------------------------------------------------------------------------
# final table
# ------------------------------------------------------------------------------------------
def test_final_tables(tmp_path):
    import csv

    from addiff_core.site_table import markdown_table
    from server.final_table import write_tables

    rows = [{"site": "hospital_a", "cases": 3, "mae_gy": 2.0, "gamma_pass_rate": float("nan")},
            {"site": "hospital_b", "cases": 1, "mae_gy": 6.0, "gamma_pass_rate": 90.0}]
    write_tables(tmp_path, rows)
    table = list(csv.DictReader((tmp_path / "final_metrics.csv").open()))
    assert [r["site"] for r in table] == ["hospital_a", "hospital_b", "all sites (case-weighted, 2 of 2 sites)"]
    assert float(table[2]["mae_gy"]) == pytest.approx(3.0)  # (3 * 2 + 1 * 6) / 4
    assert float(table[2]["gamma_pass_rate"]) == pytest.approx(90.0)  # NaN sites left out
    md = (tmp_path / "final_metrics.md").read_text()
    assert "| hospital_a | 3 | 2 | n/a |" in md and md.count("\n|") == 5
    assert markdown_table([]) == "(no site returned metrics)"
    # a planned site without metrics keeps its row, and the overall row says it covers fewer sites
    rows = [{**rows[0], "status": "ok"}, {"site": "hospital_c", "cases": 0, "status": "no reply; trained in no round"}]
    md = markdown_table(rows, planned=3)
    assert "| hospital_c | 0 |" in md and "no reply" in md
    assert "| all sites (case-weighted, 1 of 3 sites) | 3 | 2 |" in md


# ------------------------------------------------------------------------------------------
# certificates and node keys
# ------------------------------------------------------------------------------------------
def test_certificates_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from server.certs import cert_hosts, create_certificates, create_node_key

    paths = create_certificates(tmp_path / "certs", ["fl.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert set(cert_hosts(paths["server_cert"])) == {"fl.example.org", "10.0.0.5", "localhost", "127.0.0.1"}
    assert paths["ca_key"].stat().st_mode & 0o077 == 0 and paths["server_key"].stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        create_certificates(tmp_path / "certs", ["x"])
    priv, pub = create_node_key(tmp_path / "keys", "hospital_a")
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
    # the format Flower's `flwr supernode register` accepts
    from server.flower_compat import load_node_public_key

    assert load_node_public_key(pub)


def test_set_overrides_are_typed_and_checked():
    from addiff_core.config import ConfigError
    from server.run_config_cli import parse_sets
    from server.settings import from_run_config

    got = parse_sets(["min-sites=2", "eval-gamma=false", "update-norm-multiple=5", "strategy=fedmedian",
                      "central-dp-noise=1.5"])
    assert got == {"min-sites": 2, "eval-gamma": False, "update-norm-multiple": 5, "strategy": "fedmedian",
                   "central-dp-noise": 1.5}
    with pytest.raises(ConfigError, match="bogus"):
        parse_sets(["bogus=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["min-sites"])
    for bad, msg in ((dict(got), "central DP needs strategy fedavg"), ({"trim-beta": 0.5}, "trim-beta"),
                     ({"update-norm-multiple": 0.5}, "update-norm-multiple"), ({"min-sites": "abc"}, "must be int"),
                     ({"max-num-examples": 0}, "max-num-examples"), ({"strategy": "krum"}, "strategy")):
        with pytest.raises(ConfigError, match=msg):
            from_run_config(bad)
