"""Secure aggregation (issue #26) in a real deployment on loopback: a TLS SuperLink started by
``addiff server start --set secure-aggregation=true`` and three SuperNodes (``addiff client
start``, each ClientApp in its own process: Flower's SecAgg+ state lives in the SuperNode's
Context between the protocol's four messages). Tiny U-Net, 32^3 synthetic sites, one round: each
message is a ClientApp process, a secure round four of them per site (both stages of the
diffusion model: tests/test_secagg_federation.py). Every process is stopped by PID at the end."""
from __future__ import annotations

import json

import pytest

from helpers.federation import exit_code, metrics_rows
from test_federation_failures import Deployment

pytestmark = pytest.mark.slow


def test_a_tls_deployment_of_three_supernodes_aggregates_securely(tmp_path, procs):
    dep = Deployment(tmp_path, procs)
    server = dep.new_run(rounds="1", min_sites=3, round_timeout=300,
                         extra=("--model", "unet", "--set", "secure-aggregation=true", "--wait-sites", 3))
    for site in dep.sites:
        dep.client(site)
    assert exit_code(server, 600) == 0, dep.logs()
    rows = metrics_rows(dep.run_dir)
    rounds = [r for r in rows if r["kind"] == "round"]
    assert [r["stage"] for r in rounds] == ["unet"], dep.logs()
    for r in rounds:
        assert r["secure_aggregation"] and r["sites"] == sorted(dep.sites) and r["secagg_dropped"] == {}
        assert 0 < r["secagg_error_bound"] < 1e-3
    assert json.loads((dep.run_dir / "run.json").read_text())["status"] == "complete"
    assert sorted(r["site"] for r in json.loads((dep.run_dir / "final_metrics.json").read_text())) == sorted(dep.sites)
    # the four SecAgg+ stages reached every site, over TLS (no --insecure anywhere)
    assert "secure-aggregation=true" in " ".join(server.args)
    assert all(dep.log(f"client_{s}.log").count("Receiving: train message") == 4 for s in dep.sites), dep.logs()
    assert "insecure" not in dep.log("server.log").lower()
