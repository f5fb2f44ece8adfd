"""The hospital side's one door to Flower's non-public modules (the server's is server/flower_compat.py).

Everything else in ``client/`` (and the tests) uses Flower's public API (``flwr.app``,
``flwr.clientapp``, ...) or the names here, so that a Flower upgrade touches this file and its
server twin only. Importing it checks the installed Flower against the tested versions
(:data:`TESTED_FLOWER`). Heavy modules (the ClientApp runtime, the FAB builder) are imported
inside the functions that need them: ``client`` modules stay quick to import.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr
from flwr.app import Error, Message
from flwr.client.mod import secaggplus_mod  # noqa: F401 - the fence's export
from flwr.common.constant import FAB_CONFIG_FILE, FAB_HASH_TRUNCATION, ErrorCode  # noqa: F401
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: F401
from flwr.supercore.fab import Fab  # noqa: F401
from flwr.supercore.task_identity import TaskIdentity

from addiff_core.errors import UserError

TESTED_FLOWER = ("1.42",)  # major.minor series the project is tested with (pyproject: flwr==1.42.*)


class FlowerVersionError(UserError):
    """The installed Flower is not a version this project was tested with."""


def check_flower_version(installed: str, tested: tuple[str, ...] = TESTED_FLOWER) -> None:
    """Raises FlowerVersionError (one line) unless ``installed`` is in one of the ``tested`` series."""
    if ".".join(str(installed).split(".")[:2]) not in tested:
        series = ", ".join(f"{t}.x" for t in tested)
        raise FlowerVersionError(f"Flower {installed} is installed, but addiff is tested with Flower {series} only "
                                 f"(its non-public modules change between versions): pip install 'flwr[simulation]=="
                                 f"{tested[-1]}.*'")


check_flower_version(flwr.__version__)


# -- messages and tasks -----------------------------------------------------------------------
def set_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """What Flower's runtime sets before a ClientApp runs (a Message built outside it reads it)."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def error_code_name(code: int) -> str:
    """Flower's name of an error code (``ErrorCode``), lower case with spaces; "unknown" if none."""
    names = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
    return names.get(code, "UNKNOWN").lower().replace("_", " ")


def invalid_fab_reply(reply_to: Message, reason: str) -> Message:
    """The error reply Flower's own ``--trusted-entities`` refusal sends (``INVALID_FAB``)."""
    return Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=reply_to)


# -- Flower's home folder and app bundles -------------------------------------------------------
def apps_dir(env: dict[str, str]) -> Path:
    """Where a SuperNode with environment ``env`` unpacks app bundles (``$FLWR_HOME/apps``)."""
    from flwr.common.constant import APP_DIR, FLWR_DIR, FLWR_HOME

    return (Path(env[FLWR_HOME]) if env.get(FLWR_HOME) else Path.home() / FLWR_DIR) / APP_DIR


def flwr_home() -> Path:
    """This process's Flower home folder."""
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home()


def app_install_dir(fab_id: str, fab_version: str, fab_hash: str) -> Path:
    """The folder Flower unpacks (and loads) a run's bundle from, named after the run's claims."""
    from flwr.common.config import get_project_dir

    return get_project_dir(fab_id, fab_version, fab_hash)


def build_fab(app_dir: Path) -> bytes:
    """The bundle ``flwr run APP_DIR`` sends (Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def load_app(ref: str, error_type: type[Exception], project_dir: str | Path) -> Any:
    """Flower's app loader (``module:attribute`` from ``project_dir`` first on ``sys.path``)."""
    from flwr.supercore.object_ref import load_app as flower_load_app

    return flower_load_app(ref, error_type, project_dir)


# -- the ClientApp runtime (the app-bundle guard, client/clientapp_guard.py) --------------------
_RUNTIME_STEPS = ("pull_task_input", "install_from_fab", "push_message")


def run_clientapp_module() -> Any:
    """Flower's ClientApp runner module (``flwr-clientapp``), checked to have the functions the
    guard wraps. Raises RuntimeError (nothing runs) if it does not look as in Flower 1.42."""
    from flwr.supernode.runtime import run_clientapp as rc

    for name in (*_RUNTIME_STEPS, "run_clientapp"):
        if not callable(getattr(rc, name, None)):
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp.{name} not found: this Flower version is "
                               "not supported by the app-bundle guard")
    if getattr(rc.install_from_fab, "__module__", "") != "flwr.cli.install":
        raise RuntimeError("flwr.supernode.runtime.run_clientapp.install_from_fab is not Flower's installer")
    return rc


def wrap_clientapp_runtime(pull_task_input: Callable, install_from_fab: Callable, push_message: Callable) -> None:
    """Replace the runner's task-input pull, bundle installation and reply push by wrappers;
    each wrapper is called as ``wrapper(flowers_function, *args)``."""
    rc = run_clientapp_module()
    for name, wrapper in zip(_RUNTIME_STEPS, (pull_task_input, install_from_fab, push_message)):
        original = getattr(rc, name)
        setattr(rc, name, lambda *args, _w=wrapper, _o=original, **kw: _w(_o, *args, **kw))


def flwr_clientapp_main() -> None:
    """Flower's ``flwr-clientapp`` command (reads ``sys.argv``; exits)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def start_parent_process_monitor(pid: int) -> None:
    """SIGINT to this process once process ``pid`` is gone (Flower's monitor)."""
    from flwr.supercore.app_utils import start_parent_process_monitor as monitor

    monitor(pid)


def runtime_api_client(address: str) -> Any:
    """A client of a SuperNode's local Runtime API at ``address`` (host:port, loopback, insecure),
    introduced as Flower's SuperExec."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])


def acquire_clientapp_task(client: Any) -> str | None:
    """Claim one queued ClientApp task: its token, or None when there is none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return res.token if res.HasField("task") and res.token else None
