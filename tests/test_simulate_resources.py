"""How `addiff simulate` shares the cores among the simulated sites (server.simulate)."""
from __future__ import annotations

import math

import pytest

from addiff_core.config import ConfigError
from server.simulate import check_cpus_per_site, client_resources, concurrent_sites, sites_at_once


def round_cost(n_sites: int, cpus: int, actors: int) -> float:
    """One site's work = 1: waves of ``actors`` sites, each wave slowed when actors outnumber cores."""
    return math.ceil(n_sites / actors) * max(1.0, actors / cpus)


@pytest.mark.parametrize("n_sites,cpus,want", [
    (1, 2, 1), (2, 2, 2), (3, 2, 3), (4, 2, 2), (5, 2, 2), (10, 2, 2),
    (3, 4, 3), (5, 4, 5), (6, 4, 6), (9, 4, 5), (3, 16, 3), (40, 16, 20),
])
def test_concurrent_sites_gives_the_shortest_round_with_the_fewest_actors(n_sites, cpus, want):
    assert concurrent_sites(n_sites, cpus) == want
    # by brute force: no other actor count gives a shorter round, and none fewer an equal one
    costs = {a: round_cost(n_sites, cpus, a) for a in range(1, min(n_sites, 2 * cpus) + 1)}
    best = min(costs.values())
    assert costs[want] == best and all(costs[a] > best for a in costs if a < want)


def test_three_sites_on_two_cores_all_train_at_once():
    # the old default (cores // sites, at least 1) ran 2 at a time: 2 site-works per round, not 1.5
    assert round_cost(3, 2, concurrent_sites(3, 2)) == 1.5 < round_cost(3, 2, 2)


@pytest.mark.parametrize("n_sites,cpus", [(1, 2), (2, 2), (3, 2), (5, 4), (6, 4), (3, 4), (7, 3), (17, 16), (3, 16)])
def test_flower_makes_as_many_actors_as_planned(monkeypatch, n_sites, cpus):
    """Flower's own pool sizing (int(node CPUs / num_cpus)) on a node of ``cpus`` cores: the
    rounded-down share fits exactly the planned actors (3 x 0.6667 would not fit on 2 cores)."""
    import ray

    from server.flower_compat import ray_pool_size

    monkeypatch.setattr(ray, "nodes", lambda: [{"Resources": {"CPU": float(cpus)}}])
    res = client_resources(n_sites, cpus=cpus, gpus=0)
    assert ray_pool_size(res) == concurrent_sites(n_sites, cpus)
    assert sites_at_once(n_sites, res["num_cpus"], cpus=cpus) == concurrent_sites(n_sites, cpus)  # the header's count
    assert res["num_gpus"] == 0.0


def test_explicit_cpus_per_site_and_gpus_are_kept():
    assert client_resources(3, 2, cpus=2, gpus=0) == {"num_cpus": 2, "num_gpus": 0.0}
    assert client_resources(3, 0.5, cpus=2, gpus=0)["num_cpus"] == 0.5
    assert client_resources(4, cpus=8, gpus=2) == {"num_cpus": 2, "num_gpus": 0.5}


@pytest.mark.parametrize("n_sites,cpus,want", [(3, 2, 1), (2, 2, 1), (1, 2, 2), (3, 4, 1), (3, 8, 2), (5, 4, 1)])
def test_flwr_run_gets_whole_cpus(n_sites, cpus, want):
    """`flwr run`'s federation config holds an integer number of CPUs per site."""
    assert client_resources(n_sites, cpus=cpus, gpus=0, whole_cpus=True)["num_cpus"] == want


def test_a_fraction_of_a_cpu_via_flwr_is_a_clear_error(tmp_path, capsys):
    from addiff_core import cli

    run_dir = tmp_path / "run"
    code = cli.main(["simulate", "--via", "flwr", "--cpus-per-site", "0.5", "--run-dir", str(run_dir),
                     "--data-dir", str(tmp_path / "data"), "--rounds", "1,1"])
    err = capsys.readouterr().err
    assert code != 0 and "--cpus-per-site 0.5" in err and "--via inprocess" in err, err
    assert not run_dir.exists() and not (tmp_path / "data").exists()  # refused before any work


def test_cpus_per_site_beyond_the_cores_is_refused():
    """Flower would fail deep in its engine ("ActorPool is empty") and the server would wait for
    sites that never start."""
    with pytest.raises(ConfigError, match="this machine has 2 CPU core"):
        check_cpus_per_site(4, "inprocess", cpus=2)
    with pytest.raises(ConfigError, match="at most 2"):
        check_cpus_per_site(-1, "inprocess", cpus=2)
    check_cpus_per_site(2, "flwr", cpus=2)
    check_cpus_per_site(0.5, "inprocess", cpus=2)
    check_cpus_per_site(None, "flwr", cpus=2)


# the engine dies under the ServerApp: `--cpus-per-site` beyond the cores, with the up-front check
# taken out, makes Flower's engine fail at its start ("ActorPool is empty")
_ENGINE_DIES = """
import sys
import server.simulate
server.simulate.check_cpus_per_site = lambda *args, **kwargs: None
from addiff_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_when_the_simulation_engine_dies_the_run_fails_at_once(tmp_path):
    """Flower's own wait for replies ignores its engine's stop event: the process used to wait out
    the round timeout (an hour by default) before it could exit."""
    import json
    import os
    import sys
    import time

    from helpers.federation import ROOT, TINY, Processes, flower_test_env, synthetic_sites

    sites = synthetic_sites(tmp_path / "data", n_sites=2, cases_per_site=2)
    run_dir = tmp_path / "run"
    procs = Processes()
    t0 = time.monotonic()
    try:
        p = procs.start([sys.executable, "-c", _ENGINE_DIES, "simulate", "--site-files", ",".join(map(str, sites)),
                         "--config", TINY, "--rounds", "1,1", "--run-dir", run_dir,
                         "--cpus-per-site", (os.cpu_count() or 1) + 2], env=flower_test_env(tmp_path),
                        log_file=tmp_path / "log", cwd=ROOT)
        rc = p.wait(timeout=240)
    finally:
        leftover = procs.stop_all()
    out = (tmp_path / "log").read_text(errors="replace")
    assert rc != 0 and "ActorPool is empty" in out, out[-3000:]
    assert time.monotonic() - t0 < 200, out[-3000:]  # not the hour of the round timeout
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "simulation engine stopped" in run["error"], run
    assert not leftover, f"processes left running: {leftover}"
