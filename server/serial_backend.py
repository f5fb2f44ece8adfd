"""The ``serial`` simulation backend: the simulated sites take turns in this process.

Why it exists: Flower 1.42's Simulation Engine runs each ClientApp through a *backend*
(``flwr.server.superlink.fleet.vce.backend.Backend``) and ships one, Ray's. Ray starts a
process per site that trains at once, and each of them imports torch and MONAI (about 5 CPU-s)
before its first round; Ray itself takes seconds to start. On a laptop with fewer than two cores
per site those processes only share the same cores, so a 24-round demo spent a fifth of its time
starting them (BENCHMARKS.md). Here the engine's one worker thread runs each message's ClientApp
itself, one site after another, with every core for torch. The rest of Flower's path is as it is
with Ray: the ServerApp, the LinkState, each SuperNode's Context, error replies.

How it is plugged in: Flower 1.42 has no backend registry (``start_vce`` always builds
``RayBackend``, whatever ``backend_name`` says), so :func:`serial_backend` puts this class in its
place for the duration of one run. ``tests/test_simulate_backend.py`` fails if a Flower upgrade
moves that seam.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig


class SerialBackend(Backend):
    """One worker: a message's ClientApp runs in the engine's worker thread, one at a time.

    ``site_loggers`` log at WARNING and above while a ClientApp runs: a Ray actor's info lines
    never reach the coordinator's console, and here the sites run in the coordinator's process
    (a DP site's per-epoch loss, for one, is not for the coordinator to read)."""

    def __init__(self, backend_config: BackendConfig, site_loggers: tuple[str, ...] = ()) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None
        self._busy = threading.Lock()
        self._site_loggers = tuple(site_loggers)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1  # one at a time: sites share this process's loggers and torch's thread pool

    def is_worker_idle(self) -> bool:
        return not self._busy.locked()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self._app_fn is None:
            raise ValueError("SerialBackend.build() was not called before the first message")
        with self._busy, _at_least_warning(self._site_loggers):
            app = self._app_fn()
            try:
                return app(message=message, context=context), context
            except LoadClientAppError:
                raise
            except Exception as ex:  # as Flower's Ray actor does: the engine turns it into an error reply
                raise ClientAppException(str(ex)) from ex

    def terminate(self) -> None:
        """Nothing to stop: no process or thread of its own."""


@contextmanager
def _at_least_warning(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def serial_backend(site_loggers: tuple[str, ...] = ()) -> Iterator[None]:
    """While inside, Flower's Simulation Engine builds a :class:`SerialBackend` (quieting
    ``site_loggers`` while a ClientApp runs) instead of Ray's."""
    from flwr.server.superlink.fleet.vce.backend import raybackend  # where start_vce looks the class up

    original = raybackend.RayBackend
    raybackend.RayBackend = functools.partial(SerialBackend, site_loggers=site_loggers)  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
