"""`addiff simulate` end to end (real Ray simulation, tiny model), and stop + resume (serial backend).

The resumed run (stopped after round 1 in-process, resumed through `flwr run` with a local
SuperLink) must end with exactly the weights of the uninterrupted run.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers.federation import ROOT, TINY, Processes, cli, flower_test_env, synthetic_sites

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("federation_simulation")]  # one `uninterrupted` run


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return synthetic_sites(tmp_path_factory.mktemp("fed_sim_sites"))


def simulate(tmp_path, name, *args, timeout=420):
    procs = Processes()
    log = tmp_path / f"{name}.log"
    try:
        p = procs.start(cli("simulate", *args), env=flower_test_env(tmp_path), log_file=log, cwd=ROOT)
        rc = p.wait(timeout=timeout)
    finally:
        leftover = procs.stop_all()
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    assert not leftover, f"processes left running after addiff simulate: {leftover}"
    return out


def base_args(sites, run_dir, cpus_per_site=1):
    """Ray actors of ``cpus_per_site`` CPUs each; ``None``: the serial backend (sites in turn, in-process)."""
    where = ["--cpus-per-site", cpus_per_site] if cpus_per_site else ["--backend", "serial"]
    return ["--site-files", ",".join(map(str, sites)), "--config", TINY, "--rounds", "1,2", "--local-epochs", 1,
            "--eval-steps", 2, "--no-gamma", "--run-dir", run_dir, *where]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sites):
    tmp = tmp_path_factory.mktemp("fed_sim")
    run_dir = tmp / "run"
    out = simulate(tmp, "full", *base_args(sites, run_dir))
    return run_dir, out


def test_simulate_runs_the_federation_and_writes_the_table(uninterrupted, sites):
    run_dir, out = uninterrupted
    assert "per-site table" in out and str(run_dir / "final_metrics.md") in out
    # what ran, in the console header and above the final table (issue #16)
    assert out.count("Aggregation: fedavg (weighted by training cases)") >= 2, out[-4000:]
    assert "Central DP: off" in out and "Per-site DP (DP-SGD): off at every site" in out
    at_once = min(len(sites), os.cpu_count() or 1)  # --cpus-per-site 1: one site per core
    assert "Ray actors of 1 CPU / " in out and f"({at_once} training at once)" in out, out[:2000]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.pt")) == [
        "round_0001.pt", "round_0002.pt", "round_0003.pt"]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert sorted(r["site"] for r in final) == sorted(f.stem for f in sites)
    md = (run_dir / "final_metrics.md").read_text()
    assert all(f"| {f.stem} |" in md for f in sites)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in train if r["kind"] == "train"} == {
        (n, f.stem) for n in (1, 2, 3) for f in sites}
    # the end-of-run report, with its figures (the other federation tests leave them out)
    figures = {p.name for p in (run_dir / "report" / "figures").glob("*.png")}
    assert {f"site_{f.stem}_{kind}.png" for f in sites for kind in ("slices", "dvh")} <= figures, figures
    assert "training_diffusion.png" in figures and "training_vae.png" in figures


def test_stopped_run_resumed_ends_with_the_same_weights(uninterrupted, sites, tmp_path):
    """... also when the stopped run's sites take turns in the coordinator's process (serial
    backend), the resumed run has one Ray actor for all sites (`flwr run`) and the uninterrupted
    run has two: a site's training does not depend on what runs it."""
    run_dir = tmp_path / "run"
    no_figures = ("--set", "report-figures=false")  # the uninterrupted run's report has them
    # stopped after the VAE round: the resumed run starts the diffusion stage
    out = simulate(tmp_path, "stopped", *base_args(sites, run_dir, cpus_per_site=None), "--stop-after-round", 1,
                   *no_figures)
    assert "--resume" in out and not (run_dir / "checkpoints" / "round_0002.pt").exists()
    assert "sites in turn in this process" in out and "Ray actors" not in out, out[:2000]
    simulate(tmp_path, "resumed", "--resume", run_dir, "--via", "flwr", "--cpus-per-site", 2,
             *no_figures)  # `flwr run` with a local SuperLink
    a = torch.load(uninterrupted[0] / "checkpoints" / "round_0003.pt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "round_0003.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "final_metrics.json").read_text()) == \
        json.loads((uninterrupted[0] / "final_metrics.json").read_text())
