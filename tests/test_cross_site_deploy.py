"""Cross-site evaluation (issue #25) in a real TLS deployment on loopback: ``addiff server start
--cross-site --set personalize-epochs=1`` and two SuperNodes (``addiff client start``, each
message a ClientApp process). hospital_a's site file shares its models, hospital_b's does not.
Tiny U-Net, one round. Every process is stopped by PID at the end."""
from __future__ import annotations

import json

import pytest

from helpers.federation import exit_code, site_file_variant
from test_federation_failures import Deployment

pytestmark = pytest.mark.slow


def test_cross_site_over_tls(tmp_path, procs):
    dep = Deployment(tmp_path, procs, n_sites=2)
    shared = site_file_variant(dep.sites["hospital_a"], tmp_path / "shared" / "hospital_a.yaml",
                               share_models_for_evaluation=True, state_dir=str(tmp_path / "state_a"))
    server = dep.new_run(rounds="1", min_sites=2, round_timeout=300,
                         extra=("--model", "unet", "--cross-site", "--set", "personalize-epochs=1", "--wait-sites", 2))
    dep.client("hospital_a", site_file=shared)
    dep.client("hospital_b")
    assert exit_code(server, 600) == 0, dep.logs()
    assert "--cross-site" in " ".join(server.args) and "insecure" not in dep.log("server.log").lower()
    doc = json.loads((dep.run_dir / "cross_site.json").read_text())
    cells = {(c["model"], c["site"]) for c in doc["cells"] if c["mae_gy"] is not None}
    sites = ("hospital_a", "hospital_b")
    assert {("global", s) for s in sites} | {(f"hospital_a {m}", s) for m in ("local", "personalized") for s in sites} \
        | {("hospital_b local", "hospital_b"), ("hospital_b personalized", "hospital_b")} == cells, doc
    assert (tmp_path / "state_a" / "personalized.pt").is_file()
    rows = {r["site"]: r for r in json.loads((dep.run_dir / "final_metrics.json").read_text())}
    assert all(rows[s]["personalized_mae_gy"] > 0 for s in sites)
    # hospital_b's models never left it: nothing of them in the server's run folder
    assert not list(dep.run_dir.rglob("*personalized*.pt")) and not list(dep.run_dir.rglob("*local*.pt"))
