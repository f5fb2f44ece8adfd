"""The serial simulation backend (server.serial_backend) and how `addiff simulate` picks one.

The end-to-end check that a serial run ends with exactly the weights of a Ray run is in
tests/test_federation_simulation.py (the stopped run is serial, the uninterrupted one Ray)."""
from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from addiff_core.config import ConfigError
from client.flower_compat import set_task_identity
from server.flower_compat import ClientAppException, engine_backend_factory, engine_builds_ray_backend_by_name
from server.serial_backend import SerialBackend, serial_backend
from server.simulate import check_backend, choose_backend


# ------------------------------------------------------------------------------------------
# choosing
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_sites, cpus, want", [
    (3, 2, "serial"),   # this laptop: Ray's actors would only share the 2 cores
    (3, 4, "serial"),   # 4 cores cannot give 3 sites two each
    (3, 6, "ray"),      # two cores of its own for every site
    (3, 16, "ray"),
    (1, 1, "serial"),
    (1, 2, "ray"),
    (10, 8, "serial"),
])
def test_auto_is_ray_only_when_every_site_gets_two_cores(n_sites, cpus, want):
    assert choose_backend("auto", n_sites, cpus=cpus) == want


def test_auto_is_ray_when_ray_is_asked_for_and_an_explicit_choice_stands():
    assert choose_backend("auto", 3, via="flwr", cpus=2) == "ray"  # a local SuperLink's simulation is Ray's
    assert choose_backend("auto", 3, cpus_per_site=1, cpus=2) == "ray"  # Ray's CPUs per site
    assert choose_backend("ray", 3, cpus=2) == "ray"
    assert choose_backend("serial", 3, cpus=64) == "serial"


def test_serial_with_options_only_ray_honours_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="--backend serial.*--via inprocess"):
        check_backend("serial", "flwr", None)
    with pytest.raises(ConfigError, match="--cpus-per-site.*--backend ray"):
        check_backend("serial", "inprocess", 2)
    check_backend("serial", "inprocess", None)
    check_backend("ray", "flwr", 2)
    check_backend("auto", "flwr", 2)


# ------------------------------------------------------------------------------------------
# the seam in Flower
# ------------------------------------------------------------------------------------------
def test_flower_still_builds_its_backend_by_the_name_serial_backend_replaces():
    """Fails if a Flower upgrade moves the seam: then --backend serial would silently run Ray."""
    assert engine_builds_ray_backend_by_name()
    original = engine_backend_factory()
    with serial_backend():
        assert isinstance(engine_backend_factory()({}), SerialBackend)  # what start_vce's backend_fn builds
    assert engine_backend_factory() is original


def test_the_seam_is_restored_after_an_error():
    original = engine_backend_factory()
    with pytest.raises(RuntimeError, match="boom"):
        with serial_backend():
            raise RuntimeError("boom")
    assert engine_backend_factory() is original


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------
def _message(text: str) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"text": text})}), dst_node_id=7, message_type="query")


def _context() -> Context:
    return Context(run_id=3, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_serial_backend_runs_the_clientapp_in_this_thread_with_the_nodes_context():
    import threading

    set_task_identity(run_id=3, node_id=7)
    app = ClientApp()
    seen = {}
    site_log = logging.getLogger("addiff-test-site-logger")
    site_log.setLevel(logging.DEBUG)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        seen["thread"] = threading.get_ident()
        seen["level"] = site_log.level  # a site's info lines stay off the coordinator's console
        context.state["n"] = ConfigRecord({"calls": int(context.state["n"]["calls"]) + 1 if "n" in context.state else 1})
        return Message(RecordDict({"c": ConfigRecord({"echo": str(msg.content["c"]["text"]).upper()})}), reply_to=msg)

    backend = SerialBackend({}, site_loggers=(site_log.name,))
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    ctx = _context()
    for i in (1, 2):
        reply, out_ctx = backend.process_message(_message("hello"), ctx)
        assert reply.content["c"]["echo"] == "HELLO"
        assert out_ctx is ctx and ctx.state["n"]["calls"] == i  # the node's state carries over, as with Ray
    assert seen["thread"] == threading.get_ident() and backend.is_worker_idle()
    assert seen["level"] == logging.WARNING and site_log.level == logging.DEBUG  # restored after the message
    backend.terminate()


def test_an_exception_in_the_clientapp_is_what_flowers_engine_expects():
    set_task_identity(run_id=3, node_id=7)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        raise ValueError("nope")

    backend = SerialBackend({})
    with pytest.raises(ValueError, match="build"):
        backend.process_message(_message("x"), _context())
    backend.build(lambda: app)
    with pytest.raises(ClientAppException, match="nope"):
        backend.process_message(_message("x"), _context())
    assert backend.is_worker_idle()  # free for the next message


# ------------------------------------------------------------------------------------------
# one process, several sites and runs: the ClientApp's per-run cache of site tasks
# ------------------------------------------------------------------------------------------
def test_a_site_task_is_cached_for_its_run_only(tmp_path):
    """With the serial backend one process serves every site, and a process may serve several
    runs: a new run must read the site's data again (a hospital may have added cases)."""
    import client.site_tasks as ca
    from addiff_core.config import load_model_config
    from addiff_core.wire import model_config_to_json
    from helpers.federation import TINY, synthetic_sites

    a, b = synthetic_sites(tmp_path / "sites", n_sites=2, cases_per_site=2)
    model = model_config_to_json(load_model_config(TINY))
    ca._TASKS.clear()
    try:
        run1_a, run1_b = ca.task_for(a, model, run_id=1), ca.task_for(b, model, run_id=1)
        assert run1_a is not run1_b and ca.task_for(a, model, run_id=1) is run1_a  # loaded once a run
        run2_a = ca.task_for(a, model, run_id=2)
        assert run2_a is not run1_a
        assert set(ca._TASKS) == {(2, str(a), model)}  # the earlier run's tasks are let go
    finally:
        ca._TASKS.clear()


# ------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_ends_the_simulation_at_once_and_says_how_to_resume(tmp_path):
    """The signal reaches the main thread only; the ServerApp thread used to go on waiting for
    replies (up to the round timeout, an hour by default), and the process with it."""
    import json
    import signal
    import sys
    import time

    from helpers.federation import (ROOT, TINY, Processes, cli, exit_code, flower_test_env, read_text,
                                    synthetic_sites, wait_until)

    sites = synthetic_sites(tmp_path / "data", n_sites=2, cases_per_site=2)
    run_dir, log = tmp_path / "run", tmp_path / "log"
    # Ctrl-C as in a terminal: whatever started pytest may have set SIGINT to "ignore"
    with_sigint = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.argv[1], sys.argv[1:])"]
    procs = Processes()
    try:
        p = procs.start([*with_sigint, *cli("simulate", "--site-files", ",".join(map(str, sites)), "--config", TINY,
                                             "--rounds", "1,200", "--local-epochs", 1, "--eval-steps", 1,
                                             "--no-gamma", "--run-dir", run_dir, "--backend", "serial")],
                        env=flower_test_env(tmp_path), log_file=log, cwd=ROOT)
        wait_until(lambda: (run_dir / "checkpoints" / "round_0003.pt").is_file(), 180, "round 3", watch=[p],
                   logs=lambda: read_text(log)[-3000:])
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = exit_code(p, 60)
        took = time.monotonic() - t0
    finally:
        leftover = procs.stop_all()
    out = read_text(log)
    assert rc == 130, (rc, out[-3000:])
    assert took < 30, took  # the site's current message at most, not the round timeout
    assert f"addiff simulate --resume {run_dir}" in out, out[-2000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("interrupted (Ctrl-C)"), run
    assert not leftover, f"processes left running: {leftover}"
