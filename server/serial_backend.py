"""The ``serial`` simulation backend: the simulated sites take turns in this process.

Flower 1.42's Simulation Engine ships one backend, Ray's, which starts a process per site; on a
machine with fewer than two cores per site those processes only share the cores and spend their
start-up importing torch (BENCHMARKS.md, "Federation overhead"). Here the engine's one worker thread runs
each message's ClientApp itself, one site after another; the rest of Flower's path (ServerApp,
LinkState, each SuperNode's Context, error replies) is as with Ray. The swap goes through
:func:`server.flower_compat.ray_backend_replaced`; tests/test_simulate_backend.py fails if a
Flower upgrade moves that seam.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .flower_compat import Backend, BackendConfig, ClientAppException, LoadClientAppError, ray_backend_replaced


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
    with ray_backend_replaced(functools.partial(SerialBackend, site_loggers=site_loggers)):
        yield
