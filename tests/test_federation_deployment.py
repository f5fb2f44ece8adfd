"""A real deployment on loopback: `addiff server start` (SuperLink with TLS and SuperNode
authentication) and three `addiff client start` SuperNodes, one per site; a short run; a
checkpoint per round and the final table with all three sites. Every process is stopped by
PID at the end, also when the test fails."""
from __future__ import annotations

import json

import pytest

from helpers.federation import ROOT, TINY, cli, exit_code, flower_test_env, synthetic_sites
from server.certs import create_certificates, create_node_key
from client.launch import free_port

pytestmark = pytest.mark.slow


def test_tls_federation_of_three_supernodes(tmp_path, procs):
    sites = synthetic_sites(tmp_path / "sites")
    certs = tmp_path / "certs"
    create_certificates(certs, ["localhost"])
    keys = {f.stem: create_node_key(tmp_path / "keys", f.stem) for f in sites}
    env = flower_test_env(tmp_path)
    port = free_port()
    run_dir = tmp_path / "run"
    server_args = ["server", "start", "--certs", certs, "--host", "127.0.0.1", "--port", port, "--auth",
                   "--min-sites", 3, "--config", TINY, "--rounds", "1,1", "--local-epochs", 1, "--eval-steps", 2,
                   "--no-gamma", "--run-dir", run_dir, "--round-timeout", 300]
    for _, pub in keys.values():
        server_args += ["--authorized-keys", pub]
    server = procs.start(cli(*server_args), env=env, log_file=tmp_path / "server.log", cwd=ROOT)
    for f in sites:
        procs.start(cli("client", "start", "--site", f, "--superlink", f"127.0.0.1:{port}", "--ca", certs / "ca.crt",
                        "--auth-key", keys[f.stem][0], "--port", free_port(), "--threads", 1,
                        "--flwr-home", tmp_path / f"flwr-home-{f.stem}"),
                    env=env, log_file=tmp_path / f"client_{f.stem}.log", cwd=ROOT)
    rc = exit_code(server, 480)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert rc == 0, logs
    # TLS: the SuperLink served HTTPS
    assert "https://127.0.0.1" in (run_dir / "superlink.log").read_text()
    # a checkpoint per round
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.pt")) == ["round_0001.pt", "round_0002.pt"]
    # all three sites trained every round and are in the final table
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    names = sorted(f.stem for f in sites)
    for rnd in (1, 2):
        assert sorted(r["site"] for r in rows if r["kind"] == "train" and r["round"] == rnd) == names
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert sorted(r["site"] for r in final) == names
    md = (run_dir / "final_metrics.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    assert "federated run complete" in (tmp_path / "server.log").read_text()
