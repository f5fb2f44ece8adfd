"""The coordinator's one door to Flower's non-public modules (the hospital's is client/flower_compat.py).

Everything else in ``server/`` (and the tests) uses Flower's public API (``flwr.app``,
``flwr.serverapp``, ``flwr.simulation``, ...) or the names here, so that a Flower upgrade touches
this file and its client twin only. Importing it checks the installed Flower against the tested
versions (``client.flower_compat.TESTED_FLOWER``). The Simulation Engine's modules, slow to
import, are imported inside the functions that need them.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import flwr
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError  # noqa: F401 - the fence's export
from flwr.common.secure_aggregation.crypto.shamir import combine_shares  # noqa: F401
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key  # noqa: F401
from flwr.common.secure_aggregation.ndarrays_arithmetic import (  # noqa: F401
    factor_extract, parameters_addition, parameters_mod, parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize  # noqa: F401
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen  # noqa: F401
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords  # noqa: F401
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key  # noqa: F401

from client.flower_compat import RECORD_KEY_CONFIGS, Key, Stage, check_flower_version, error_code_name  # noqa: F401

check_flower_version(flwr.__version__)


# -- the Grid -----------------------------------------------------------------------------------
def is_in_memory_grid(grid: Any) -> bool:
    """True for the Grid of Flower's simulation runtime (``run_simulation`` or a ``--simulation`` SuperLink)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


class EngineStopped(Exception):
    """The stop check of :func:`send_and_receive` said the replies will not come."""


def send_and_receive(grid: Any, msgs: list, timeout: float, stopped: Callable[[], bool] | None = None) -> list:
    """``grid.send_and_receive(msgs, timeout=timeout)``; with ``stopped``, its push-and-pull loop
    written out, because Flower's does not look at its engine's stop event: once ``stopped()`` is
    true it raises EngineStopped instead of waiting out the timeout."""
    if stopped is None:
        return list(grid.send_and_receive(msgs, timeout=timeout))
    waiting = set(grid.push_messages(msgs))
    end, replies = time.time() + timeout, []
    while waiting and time.time() < end:
        if stopped():
            raise EngineStopped()
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(0.01)  # an in-memory lookup; Flower polls every 0.1 s (BENCHMARKS.md, Federation overhead)
    return replies


# -- the Simulation Engine's backend (server/serial_backend.py) ---------------------------------
def __getattr__(name: str) -> Any:
    """``Backend`` / ``BackendConfig`` (the Simulation Engine's backend API) on first use."""
    if name in ("Backend", "BackendConfig"):
        from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

        return {"Backend": Backend, "BackendConfig": BackendConfig}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def ray_backend_replaced(factory: Callable[..., Any]) -> Iterator[None]:
    """While inside, the Simulation Engine builds its backend with ``factory(backend_config)``
    instead of ``RayBackend`` (Flower 1.42 has no backend registry: ``start_vce`` always builds
    ``RayBackend``, whatever ``backend_name`` says)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend  # where start_vce looks the class up

    original = raybackend.RayBackend
    raybackend.RayBackend = factory  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]


def engine_backend_factory() -> Callable[..., Any]:
    """What ``start_vce`` builds its backend with now (what :func:`ray_backend_replaced` swaps)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    return raybackend.RayBackend


def engine_builds_ray_backend_by_name() -> bool:
    """True while ``start_vce`` looks ``RayBackend`` up where :func:`ray_backend_replaced` swaps it."""
    from flwr.server.superlink.fleet.vce import vce_api

    return "from .backend.raybackend import RayBackend" in inspect.getsource(vce_api.start_vce)


def ray_pool_size(client_resources: dict[str, float]) -> int:
    """How many Ray actors Flower's Simulation Engine starts for ``client_resources`` per site
    (its own sizing over ``ray.nodes()``)."""
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    return pool_size_from_resources(client_resources)


# -- SuperNode keys -----------------------------------------------------------------------------
def load_node_public_key(path: Path) -> bytes:
    """The public key file ``path`` as ``flwr supernode register`` loads it (it raises on a key it refuses)."""
    from flwr.cli.supernode.register import try_load_public_key

    return try_load_public_key(path)
