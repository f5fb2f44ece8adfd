"""The serial simulation backend (server.serial_backend) and how `addiff simulate` picks one.

The end-to-end check that a serial run ends with exactly the weights of a Ray run is in
tests/test_federation_simulation.py (the stopped run is serial, the uninterrupted one Ray)."""
from __future__ import annotations

import inspect
import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException

from addiff_core.config import ConfigError
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
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    assert "from .backend.raybackend import RayBackend" in inspect.getsource(vce_api.start_vce)
    original = raybackend.RayBackend
    with serial_backend():
        assert raybackend.RayBackend is SerialBackend
    assert raybackend.RayBackend is original


def test_the_seam_and_logger_levels_are_restored_after_an_error():
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    lg = logging.getLogger("addiff-test-site-logger")
    lg.setLevel(logging.DEBUG)
    with pytest.raises(RuntimeError, match="boom"):
        with serial_backend(site_loggers=(lg.name,)):
            assert lg.level == logging.WARNING  # a site's info lines stay off the coordinator's console
            raise RuntimeError("boom")
    assert raybackend.RayBackend is original and lg.level == logging.DEBUG


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------
def _message(text: str) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"text": text})}), dst_node_id=7, message_type="query")


def _context() -> Context:
    return Context(run_id=3, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_serial_backend_runs_the_clientapp_in_this_thread_with_the_nodes_context():
    import threading

    from helpers.federation import set_task_identity

    set_task_identity(run_id=3, node_id=7)
    app = ClientApp()
    seen = {}

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        seen["thread"] = threading.get_ident()
        context.state["n"] = ConfigRecord({"calls": int(context.state["n"]["calls"]) + 1 if "n" in context.state else 1})
        return Message(RecordDict({"c": ConfigRecord({"echo": str(msg.content["c"]["text"]).upper()})}), reply_to=msg)

    backend = SerialBackend({})
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    ctx = _context()
    for i in (1, 2):
        reply, out_ctx = backend.process_message(_message("hello"), ctx)
        assert reply.content["c"]["echo"] == "HELLO"
        assert out_ctx is ctx and ctx.state["n"]["calls"] == i  # the node's state carries over, as with Ray
    assert seen["thread"] == threading.get_ident() and backend.is_worker_idle()
    backend.terminate()


def test_an_exception_in_the_clientapp_is_what_flowers_engine_expects():
    from helpers.federation import set_task_identity

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
    import client.client_app as ca
    from addiff_core.config import load_model_config
    from client.protocol import model_config_to_json
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
