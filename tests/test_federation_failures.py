"""Failures of a real deployment on loopback (TLS SuperLink via ``addiff server start``,
SuperNodes via ``addiff client start``; tiny model, 32^3 synthetic sites):

* a SuperNode crashes (SIGKILL of its whole process tree) while it trains round 1: the round
  goes on with the other sites, the crashed site is recorded as an error of that round, and
  the site, restarted, trains again in the next round;
* the server crashes (SIGKILL of the SuperLink, the ServerApp and everything else under
  ``addiff server start``) after round 1: ``addiff server start --resume`` finishes the run with
  the same SuperNodes, which reconnect by themselves (this is also the suite's plain TLS +
  authentication deployment: HTTPS, all sites every round, checkpoints, the final table);
  a SuperNode whose key is not registered, and one without a key, are refused there (clear
  message, non-zero exit) and never train, while the registered ones do;
* in a TLS deployment, one site approves the app bundle the server sends and trains, one site's
  ``approved_bundles`` does not hold it (it refuses every message before anything of the bundle
  is unpacked), and one site's cases are all broken and named like patients: the run finishes with
  the first, records the other two as failed sites, and nothing the server side wrote names the
  patients or the broken site's data folder.

Timing facts of Flower 1.42 these tests rely on (see docs/FEDERATION.md): a SuperNode sends a
heartbeat every 17.5-22.5 s (``HEARTBEAT_DEFAULT_INTERVAL`` 30 s minus the 5-s call timeout,
times 0.7-0.9) and the SuperLink holds it online until 2 x 30 s after the last one; once that
has passed, pulling the reply of a message sent to it yields an error reply
``NODE_UNAVAILABLE`` (from the SuperLink, ``src_node_id`` 1). So a crashed site costs its
round at most ~63 s (60 s + the ServerApp's 3-s pull interval), well within ``--round-timeout``.
SuperNodes retry a SuperLink that went away forever (backoff up to 20 s) and, with the
SuperLink's state database kept, continue with their node ids when it is back.

Every process is stopped by PID at the end, also when a test fails.
"""
from __future__ import annotations

import csv
import json
import re
import time

import pytest

from addiff_core.config import load_site_config
from client.bundle_approval import bundle_of_path, bundle_sha256
from helpers.federation import (
    ROOT, TINY, Processes, cli, exit_code, flower_test_env, kill_tree, metrics_rows, read_text, site_file_variant,
    synthetic_sites, tail_logs, wait_until,
)
from helpers.site_privacy import PATIENTS, broken_site, server_side_leaks, template_case
from server.certs import create_certificates, create_node_key
from addiff_core.processes import descendants, free_port

pytestmark = pytest.mark.slow

NODE_ID = re.compile(r"SuperNode ID: (\d+)")
TRAIN_RECEIVED = "Receiving: train message"
CLIENTAPP_STARTED = "Start `flwr-clientapp` process"


class Deployment:
    """Paths, certificates and command lines of one loopback federation."""

    def __init__(self, tmp_path, procs: Processes, *, n_sites: int = 3):
        self.tmp = tmp_path
        self.procs = procs
        self.sites = {f.stem: f for f in synthetic_sites(tmp_path / "sites", n_sites=n_sites)}
        self.certs = tmp_path / "certs"
        create_certificates(self.certs, ["localhost"])
        self.env = flower_test_env(tmp_path)
        self.port = free_port()
        self.run_dir = tmp_path / "run"
        self.keys: dict[str, tuple] = {}

    def key(self, site: str):
        if site not in self.keys:
            self.keys[site] = create_node_key(self.tmp / "keys", site)
        return self.keys[site]

    def server(self, *args, log: str = "server.log", auth_sites=()):
        cmd = ["server", "start", "--certs", self.certs, "--host", "127.0.0.1", "--port", self.port, *args]
        if auth_sites:
            cmd.append("--auth")
            for s in auth_sites:
                cmd += ["--authorized-keys", self.key(s)[1]]
        return self.procs.start(cli(*cmd), env=self.env, log_file=self.tmp / log, cwd=ROOT)

    def new_run(self, *, rounds: str, min_sites: int, round_timeout: float, extra=(), auth_sites=(),
                figures: bool = False):
        return self.server("--min-sites", min_sites, "--config", TINY, "--rounds", rounds, "--local-epochs", 1,
                           "--eval-steps", 2, "--no-gamma", "--set", f"report-figures={str(figures).lower()}",
                           "--run-dir", self.run_dir, "--round-timeout", round_timeout, *extra, auth_sites=auth_sites)

    def client(self, site: str, *, log: str | None = None, home: str | None = None, auth: bool = False,
               key: str | None = None, site_file=None, extra=()):
        """``addiff client start`` for ``site`` (or ``site_file``); ``auth``: with the site's node key,
        ``key``: with the node key of that name instead."""
        cmd = ["client", "start", "--site", site_file or self.sites[site], "--superlink", f"127.0.0.1:{self.port}",
               "--ca", self.certs / "ca.crt", "--port", free_port(), "--threads", 1,
               "--flwr-home", self.tmp / f"flwr-home-{home or site}", *extra]
        if auth or key:
            cmd += ["--auth-key", self.key(key or site)[0]]
        return self.procs.start(cli(*cmd), env=self.env, log_file=self.tmp / (log or f"client_{site}.log"), cwd=ROOT)

    def log(self, name: str) -> str:
        return read_text(self.tmp / name)

    def logs(self) -> str:
        return tail_logs(self.tmp)

    def checkpoints(self) -> list[str]:
        return sorted(p.name for p in (self.run_dir / "checkpoints").glob("round_*.pt"))

    def train_sites(self, rnd: int) -> list[str]:
        return sorted(r["site"] for r in metrics_rows(self.run_dir) if r["kind"] == "train" and r["round"] == rnd)

    def round_row(self, rnd: int) -> dict:
        rows = [r for r in metrics_rows(self.run_dir) if r["kind"] == "round" and r["round"] == rnd]
        assert len(rows) == 1, f"round {rnd}: {len(rows)} 'round' rows\n{self.logs()}"
        return rows[0]


def _clientapp_running(proc) -> bool:
    """A flwr-clientapp process (the site's training) is running below ``proc``."""
    for pid, _ in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"flwr-clientapp" in fh.read():
                    return True
        except OSError:
            continue
    return False


def test_supernode_killed_mid_round(tmp_path, procs):
    """Round 1 of 2 (vae 1, diffusion 1), --min-sites 2, three SuperNodes (TLS, no node keys:
    each SuperNode start registers a fresh node id). hospital_a's SuperNode is killed (its whole
    process tree, SIGKILL) while its ClientApp trains round 1 and is restarted at once: round 1
    ends with hospital_b and hospital_c (and an error row for hospital_a's node once the
    SuperLink declares it unavailable), round 2 and the final evaluation have all three."""
    dep = Deployment(tmp_path, procs)
    victim, survivors = "hospital_a", ["hospital_b", "hospital_c"]
    server = dep.new_run(rounds="1,1", min_sites=2, round_timeout=150, extra=("--wait-sites", 3))
    clients = {s: dep.client(s) for s in dep.sites}

    # round 1 under way at the victim: its ClientApp process was started for a train message
    wait_until(lambda: CLIENTAPP_STARTED in dep.log(f"client_{victim}.log"), 180,
               f"{victim} did not start training round 1", watch=[server], logs=dep.logs)
    wait_until(lambda: _clientapp_running(clients[victim]), 30, f"{victim}: no flwr-clientapp process",
               interval=0.1, logs=dep.logs)
    sampled = re.findall(r"configure_train: Sampled (\d+) nodes", dep.log("server.log"))
    assert sampled[:1] == ["3"], f"round 1 did not start with all three SuperNodes: {sampled}\n{dep.logs()}"
    assert all(TRAIN_RECEIVED in dep.log(f"client_{s}.log") for s in survivors), dep.logs()
    victim_node = int(NODE_ID.search(dep.log(f"client_{victim}.log")).group(1))
    assert not dep.checkpoints(), "round 1 ended before the kill"

    killed = kill_tree(clients[victim])
    t_kill = time.monotonic()
    assert len(killed) >= 3, f"expected the SuperNode, SuperExec and ClientApp: {killed}"
    # the site comes back (new SuperNode process, new node id) while round 1 still waits for it
    restarted = dep.client(victim, log=f"client_{victim}_restarted.log")

    rc = exit_code(server, 400)
    assert rc == 0, dep.logs()
    # the round waited for the crashed node only until the SuperLink declared it unavailable
    t_round1 = dep.round_row(1)["seconds"]
    assert t_round1 < 120, f"round 1 took {t_round1:.0f} s"
    print(f"run finished {time.monotonic() - t_kill:.0f} s after the kill; round 1: {t_round1:.0f} s")

    # round 1: the survivors only; the crash is an error row naming the killed site or its node
    assert dep.train_sites(1) == survivors
    assert dep.round_row(1)["sites"] == survivors
    errors = [r for r in metrics_rows(dep.run_dir) if r["kind"] == "error" and r["round"] == 1]
    assert errors, f"no error row for round 1: {metrics_rows(dep.run_dir)}"
    assert any(r.get("node_id") == victim_node or r.get("site") == victim for r in errors), \
        f"the error row of round 1 should name node {victim_node} ({victim}): {errors}"
    assert any("unavailable" in str(r.get("reason", "")).lower() for r in errors), errors

    # round 2 (and the final evaluation): the restarted site trains again
    assert dep.train_sites(2) == sorted(dep.sites)
    assert dep.round_row(2)["sites"] == sorted(dep.sites)
    assert "Receiving: train message" in dep.log(f"client_{victim}_restarted.log")
    assert dep.checkpoints() == ["round_0001.pt", "round_0002.pt"]
    assert all((dep.run_dir / "checkpoints" / f"round_000{r}.pt.sha256").is_file() for r in (1, 2))
    final = json.loads((dep.run_dir / "final_metrics.json").read_text())
    assert sorted(r["site"] for r in final) == sorted(dep.sites)
    assert json.loads((dep.run_dir / "run.json").read_text())["status"] == "complete"
    assert restarted.poll() is None and all(clients[s].poll() is None for s in survivors)


def test_superlink_killed_and_resumed(tmp_path, procs):
    """A TLS deployment with SuperNode authentication and three SuperNodes, a run of 2 rounds
    (vae 1, diffusion 1); once round 1 is checkpointed the whole server side is killed (SIGKILL:
    `addiff server start`, SuperLink, SuperExec, ServerApp). `addiff server start --resume
    RUN_DIR` on the same port (same state database, keys already registered there) finishes the
    run with the same three SuperNode processes, which reconnect by themselves. (This is also
    the suite's plain TLS deployment: HTTPS, every site trains every round, a checkpoint per
    round, the final table with all three sites.)

    Two more SuperNodes try to join at the start: one with a key that is not registered
    (`addiff client start` exits non-zero saying so, the SuperLink logs the refusal) and one
    without a key (refused, with a message saying that the federation requires one); neither
    trains."""
    dep = Deployment(tmp_path, procs)
    names = sorted(dep.sites)
    server = dep.new_run(rounds="1,1", min_sites=3, round_timeout=300, auth_sites=names)
    clients = {s: dep.client(s, auth=True) for s in names}
    intruder = dict(site=names[-1], extra=("--activation-retries", 0))  # a registered site's data
    refused = dep.client(**intruder, key="intruder", home="intruder", log="client_intruder.log")
    keyless = dep.client(**intruder, home="keyless", log="client_keyless.log")

    rc_refused = exit_code(refused, 120)
    out_refused = dep.log("client_intruder.log")
    assert rc_refused not in (None, 0), out_refused
    assert "not registered" in out_refused and str(dep.key("intruder")[1]) in out_refused, out_refused
    assert "No SuperNode found with the given public key" in read_text(dep.run_dir / "superlink.log")
    rc_keyless = exit_code(keyless, 60)
    out_keyless = dep.log("client_keyless.log")
    assert rc_keyless not in (None, 0), out_keyless
    assert "requires SuperNode authentication" in out_keyless and "--auth-key" in out_keyless, out_keyless

    ckpt1 = dep.run_dir / "checkpoints" / "round_0001.pt"
    sha1 = ckpt1.with_name(ckpt1.name + ".sha256")
    wait_until(lambda: sha1.is_file(), 240, "round 1 was not checkpointed", watch=[server], logs=dep.logs)

    killed = kill_tree(server)
    assert len(killed) >= 3, f"expected addiff, SuperLink, flwr run, SuperExec, ServerApp: {killed}"
    before = {p.name: p.read_bytes() for p in (ckpt1, sha1)}
    assert json.loads((dep.run_dir / "run.json").read_text())["status"] == "running"
    done_before = dep.checkpoints()  # round 2 may not have finished; it is not checkpointed then

    resumed = dep.server("--resume", dep.run_dir, "--min-sites", 3, "--no-gamma", "--set", "report-figures=false",
                         log="server_resume.log", auth_sites=names)
    rc = exit_code(resumed, 400)
    assert rc == 0, dep.logs()
    out = dep.log("server_resume.log")
    assert f"after round {len(done_before)}" in out, out[-3000:]

    assert "https://127.0.0.1" in read_text(dep.run_dir / "superlink.log"), "the SuperLink did not serve TLS"
    assert dep.checkpoints() == ["round_0001.pt", "round_0002.pt"]
    assert all(p.with_name(p.name + ".sha256").is_file() for p in (dep.run_dir / "checkpoints").glob("*.pt"))
    assert {p.name: p.read_bytes() for p in (ckpt1, sha1)} == before, "resume changed round 1's checkpoint"
    rows = metrics_rows(dep.run_dir)
    train = [(r["round"], r["site"]) for r in rows if r["kind"] == "train"]
    assert len(train) == len(set(train)), f"duplicated train rows: {sorted(train)}"
    assert sorted(train) == [(rnd, s) for rnd in (1, 2) for s in names]
    assert [r["round"] for r in rows if r["kind"] == "round"] == [1, 2]
    doc = json.loads((dep.run_dir / "run.json").read_text())
    assert doc["status"] == "complete" and len(doc.get("resumed", [])) == 1, doc
    final = json.loads((dep.run_dir / "final_metrics.json").read_text())
    assert sorted(r["site"] for r in final) == names
    md = (dep.run_dir / "final_metrics.md").read_text()
    assert all(f"| {n} |" in md for n in names), md
    assert "federated run complete" in out, out[-3000:]
    # the SuperNodes were never restarted; the refused ones never trained
    assert all(c.poll() is None for c in clients.values()), dep.logs()
    assert TRAIN_RECEIVED not in dep.log("client_intruder.log") + dep.log("client_keyless.log")


def test_deployment_sites_that_refuse_or_fail_leak_nothing(tmp_path, procs):
    """A TLS deployment of the U-Net baseline (1 round, --min-sites 1, --wait-sites 3):
    hospital_a approves the bundle the server sends (its site file's ``approved_bundles``) and
    trains; hospital_b's list does not hold it: it refuses every message before anything of the
    bundle is unpacked or imported (no ClientApp code runs there), and the server records Flower's
    INVALID_FAB error; hospital_x's cases are all broken and named like patients: its ClientApp
    answers with a code from a closed list. The run finishes with hospital_a; the SuperLink's log
    and state database, the server's log, its FLWR_HOME and the run folder (report and figures
    included) name neither the patients nor hospital_x's data folder."""
    dep = Deployment(tmp_path, procs, n_sites=2)
    served = bundle_sha256(bundle_of_path(ROOT))  # what `flwr run ROOT` (addiff server start) sends
    good, bad = sorted(dep.sites)
    guarded = {name: site_file_variant(dep.sites[name], dep.sites[name].with_name(f"{name}_guarded.yaml"),
                                       approved_bundles=approved)
               for name, approved in ((good, [served, "ab" * 32]), (bad, ["0" * 64]))}
    broken = broken_site(tmp_path / "broken", template_case(dep.sites[good]))
    server = dep.new_run(rounds="1", min_sites=1, round_timeout=240, extra=("--model", "unet", "--wait-sites", 3),
                         figures=True)
    for name, f in [*guarded.items(), ("hospital_x", broken)]:
        dep.client(name, site_file=f, log=f"sites/client_{name}.log")  # the hospitals' logs: not server side
    rc = exit_code(server, 420)
    assert rc == 0, dep.logs()
    good_log, bad_log = (dep.log(f"sites/client_{n}.log") for n in (good, bad))
    rows = metrics_rows(dep.run_dir)
    table = {r["site"]: r for r in csv.DictReader((dep.run_dir / "final_metrics.csv").open())}
    assert "federated run complete" in dep.log("server.log")

    # the approving site ran the bundle and trained, alone
    assert f"bundle sha256 {served} (addiff/addiff-fl" in good_log and "is approved" in good_log, dep.logs()
    assert (tmp_path / f"flwr-home-{good}" / "apps").is_dir()
    assert (load_site_config(guarded[good]).state_dir / "site.log").is_file()  # where the approving site's ClientApp logged
    assert sorted(r["site"] for r in rows if r["kind"] == "train") == [good]
    # a site that ran no ClientApp sent no name: its row is its node id
    assert {k for k in table if not k.startswith("node-")} == {good, "hospital_x", "all sites (case-weighted, 1 of 3 sites)"}
    assert len(table) == 4, table

    # the refusing site: nothing of the bundle unpacked or imported; kept for review; INVALID_FAB
    assert "REFUSED run" in bad_log and f"app bundle sha256 {served} is not in this site's approved_bundles" in bad_log
    assert "is approved" not in bad_log
    assert not (tmp_path / f"flwr-home-{bad}" / "apps").exists(), dep.logs()
    assert (tmp_path / f"flwr-home-{bad}" / "refused-bundles" / f"{served}.fab").is_file()
    assert not (load_site_config(guarded[bad]).state_dir / "site.log").exists()
    assert any(r["kind"] == "error" and "invalid fab" in r.get("reason", "") for r in rows), rows
    assert "invalid fab; trained in no round" in (dep.run_dir / "final_metrics.md").read_text()

    # the broken site: a code from the closed list at the server, the details in its own log only
    assert any(r["kind"] == "error" and r["site"] == "hospital_x" and "no-usable-data" in r["reason"] for r in rows)
    assert PATIENTS[0] in read_text(load_site_config(broken).state_dir / "site.log")
    assert server_side_leaks([dep.run_dir, tmp_path / "server.log", tmp_path / "flwr-home"]) == []

