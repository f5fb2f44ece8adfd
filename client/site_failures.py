"""Failures stay at the site: no exception leaves a ClientApp handler.

Flower copies str(exception) of a ClientApp into the error reply the server stores, and an
exception message may name a data path or a case id. So a failure is answered with a fixed
status, an error class and a code from the closed lists of :mod:`addiff_core.wire`; the message
and traceback go to the site's own log, ``STATE_DIR/site.log``, which never leaves the site.
A handler runs its steps in :func:`phase` blocks; the phase decides the code.
"""
from __future__ import annotations

import functools
import logging
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

from flwr.app import ConfigRecord, Context, Message, RecordDict

from addiff_core.config import ConfigError, SiteConfig
from addiff_core.errors import CaseError, CheckpointError
from addiff_core.site_task import MissingGlobalWeights
from addiff_core.wire import SITE_ERROR_CLASSES, SITE_KEY, STATUS_FAILED

log = logging.getLogger("flwr.addiff.client")
CASE_LOGGER = "addiff_core.data.cases"  # per-case messages (skipped cases and why) of addiff_core.data
_CLASSES = (ConfigError, CaseError, CheckpointError, MissingGlobalWeights, MemoryError, FloatingPointError, OSError,
            ValueError, RuntimeError)


class UpdateNotMasked(ValueError):
    """The site's own check of its update before masking failed (``secagg_mod.check_update``)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class SiteFailure(Exception):
    """A failure classified in the phase it happened in; ``__cause__`` is the original."""

    def __init__(self, code: str, error: str, site: SiteConfig | None):
        super().__init__(code)
        self.code, self.error, self.site = code, error, site


def classify(exc: BaseException, phase_name: str) -> tuple[str, str]:
    """(code, error class) of a failure, both from the closed lists of ``addiff_core.wire``."""
    import torch

    cls = next((c.__name__ for c in _CLASSES if isinstance(exc, c)), "Exception")
    if isinstance(exc, torch.OutOfMemoryError):
        cls = "MemoryError"
    assert cls in SITE_ERROR_CLASSES
    if isinstance(exc, UpdateNotMasked):
        return exc.code, cls
    if cls == "MemoryError":
        return "out-of-memory", cls
    if phase_name in ("site-config", "model-config", "round-config", "device"):
        return phase_name, cls
    if phase_name == "data":
        return ("bad-data" if cls == "CaseError" else "data-io" if cls == "OSError" else "no-usable-data"), cls
    if phase_name == "weights":
        return ("missing-weights" if cls == "MissingGlobalWeights" else "bad-weights"), cls
    return {"FloatingPointError": "non-finite", "OSError": "disk"}.get(cls, "internal"), cls


@contextmanager
def phase(name: str, site: SiteConfig | None = None) -> Iterator[None]:
    """Inside: an exception becomes a :class:`SiteFailure` with the code of phase ``name``
    (one raised in an inner phase keeps its own)."""
    try:
        yield
    except SiteFailure:
        raise
    except Exception as e:
        code, cls = classify(e, name)
        raise SiteFailure(code, cls, site) from e


@contextmanager
def site_log(site: SiteConfig | None):
    """While inside: per-case messages and failure details go to the site's own log file
    (``STATE_DIR/site.log``) only, never to the console (in simulation the coordinator's)."""
    handler = None
    case_log = logging.getLogger(CASE_LOGGER)
    old = case_log.propagate
    if site is not None:
        try:
            site.state_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(site.state_dir / "site.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        except OSError:
            handler = None
    case_log.propagate = False  # without a file: dropped rather than shown to the coordinator's console
    if handler is not None:
        case_log.addHandler(handler)
    try:
        yield handler
    finally:
        case_log.propagate = old
        if handler is not None:
            case_log.removeHandler(handler)
            handler.close()


def failure_reply(msg: Message, exc: BaseException) -> Message:
    """The reply of a failed handler: name, status, code and class; the details to the site's log."""
    if isinstance(exc, SiteFailure):
        code, cls, site, exc = exc.code, exc.error, exc.site, exc.__cause__ or exc
    else:
        (code, cls), site = classify(exc, "internal"), None
    name = site.name if site is not None else ""
    with site_log(site) as handler:
        if handler is not None:
            logging.getLogger(CASE_LOGGER).error("%s failed (%s, %s): %s\n%s", msg.metadata.message_type, code, cls,
                                                 exc, "".join(traceback.format_exception(exc)))
    where_to = "details in the site's log (STATE_DIR/site.log)" if handler is not None else \
        "details not logged (no state directory)"
    log.error("site %s: %s failed (%s, %s); %s", name or "?", msg.metadata.message_type, code, cls, where_to)
    return failed(msg, name, code, cls)


def failed(msg: Message, name: str, code: str, cls: str) -> Message:
    """The one failure reply: the site's name, status, a closed code and an exception class, nothing else."""
    return Message(RecordDict({SITE_KEY: ConfigRecord({"name": name, "status": STATUS_FAILED, "code": code,
                                                       "error": cls})}), reply_to=msg)


def never_raises(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run a message handler; any exception becomes a failure reply (see above)."""

    @functools.wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except Exception as e:  # noqa: BLE001 - nothing may leave the site as an exception
            try:
                return failure_reply(msg, e)
            except Exception:  # noqa: BLE001 - even the reply failed: the barest one
                return failed(msg, "", "internal", "Exception")

    return wrapper
