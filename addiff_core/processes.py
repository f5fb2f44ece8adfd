"""Starting and stopping Flower's processes (SuperLink, SuperNode, ``flwr run``) by PID.

Used by both sides (``client/supernode.py``, ``server/deploy.py``, ``server/simulate.py``): it
imports no Flower, so it lives in the core, which both may import.

Every long-running process is started in its own session (``start_new_session``) so that it
and the children it spawns (flwr-serverapp, flwr-clientapp, flwr-simulation, Ray) form one
process group, which :func:`stop` ends by that group's id: never by process name. Processes are
looked up with ``psutil`` and always identified by (PID, creation time), so a reused PID is
never signalled.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence

import psutil

from .project import PROJECT_ENV, project_root


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: no runtime ``uv sync`` (it would download torch), no
    update check or telemetry (nothing leaves a hospital but the model), our project root."""
    env = os.environ.copy()
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault(PROJECT_ENV, str(project_root()))
    env.update(extra)
    return env


def executable(name: str) -> str:
    """A console script of this Python environment (flower-superlink, flwr, ...)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start(cmd: Sequence[str], *, env: dict[str, str], log_file: Path | None = None, cwd: Path | None = None,
          new_session: bool = True) -> subprocess.Popen:
    """Start ``cmd`` in the background (stopped later by :func:`stop`).

    Args:
        cmd: the command line.
        env: its whole environment (:func:`flower_env`).
        log_file: where its output goes (appended), else this process's output.
        cwd: its working directory.
        new_session: in a session (process group) of its own, so that :func:`stop` ends its children too.
    """
    out: IO | int | None = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(list(cmd), env=env, cwd=str(cwd) if cwd else None, stdout=out,
                            stderr=subprocess.STDOUT if out is not None else None, stdin=subprocess.DEVNULL,
                            start_new_session=new_session)
    proc._addiff_log = out  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """Stop a process we started and everything it spawned, by PID.

    SIGTERM to the process (to its whole group when it leads one), then to any descendant still
    alive (Flower's SuperExec and the flwr-serverapp/flwr-clientapp processes it spawns run in
    sessions of their own), SIGKILL to what is left after ``timeout``.
    """
    if proc is None:
        return
    kids = descendants(proc.pid) if proc.poll() is None else set()
    try:
        own = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        own = False

    def alive() -> list[int]:
        return [pid for pid, start in kids if running(pid, start)]

    def signal_all(sig: int) -> None:
        try:
            if own:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        for pid in alive():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    if proc.poll() is None or alive() or (own and _group_alive(proc.pid)):
        try:  # the leader first: it may stop its own children cleanly
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout / 2)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout / 2
        while (proc.poll() is None or alive() or (own and _group_alive(proc.pid))) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None or alive() or (own and _group_alive(proc.pid)):
            signal_all(signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    out = getattr(proc, "_addiff_log", None)
    if out is not None:
        out.close()


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process in process group ``pgid``."""
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def wait_for_port(host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                  ca_file: Path | None = None, what: str = "server") -> None:
    """Wait until ``host:port`` answers /health (HTTP API; HTTPS when ``ca_file``), or fail.

    Args:
        host, port: where the server listens.
        timeout: seconds to wait.
        proc: the server's process: its exit ends the wait at once.
        ca_file: the CA certificate of a TLS server.
        what: the server's name in the error.

    Raises:
        RuntimeError: ``proc`` exited while starting.
        TimeoutError: no answer within ``timeout``.
    """
    import httpx

    scheme = "https" if ca_file else "http"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else False
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            r = httpx.get(f"{scheme}://{host}:{port}/health", timeout=1.0, verify=verify)
            if r.status_code < 500:
                return
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"{what} on {host}:{port} did not answer within {timeout:.0f} s ({last})")


def write_flwr_config(flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None,
                      insecure: bool = False) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection profile (the default).

    Args:
        flwr_home: Flower's home folder.
        name: the profile's name.
        address: the SuperLink's ``host:port``.
        root_certificates: the CA certificate of a TLS SuperLink.
        insecure: no TLS (a local SuperLink).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_run_config_toml(path: Path, run_config: dict) -> Path:
    """A TOML file of run-config overrides for ``flwr run --run-config FILE``."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(dict(run_config)).encode())
    return path


# ------------------------------------------------------------------------------------------
# descendants: Ray's workers outlive ray.shutdown() by a few seconds as orphans
# ------------------------------------------------------------------------------------------
def identity(pid: int) -> tuple[int, float] | None:
    """(pid, creation time) of a live process: what tells it from a later one with its PID."""
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def running(pid: int, start: float) -> bool:
    """True if the process ``pid`` created at ``start`` (psutil's create_time) is still alive and
    not a zombie; False once it is gone or its PID belongs to another process."""
    try:
        p = psutil.Process(pid)
        return p.create_time() == start and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(root: int | None = None) -> set[tuple[int, float]]:
    """(pid, creation time) of every live (non-zombie) descendant of ``root`` (default: this process)."""
    try:
        kids = psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.Error:
        return set()
    out = set()
    for p in kids:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add((p.pid, p.create_time()))
        except psutil.Error:
            continue
    return out


def wait_children_exit(pid: int, timeout: float = 15.0) -> bool:
    """Wait until process ``pid`` has no live descendants (e.g. a SuperLink whose flwr-simulation
    or flwr-serverapp is still pushing its last output). True if none are left."""
    deadline = time.monotonic() + timeout
    while descendants(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class DescendantTracker:
    """Remembers every process spawned (directly or not) by ``root`` (default: this process)
    while active, also the ones that get orphaned on the way (Ray's workers, Flower's SuperExec).
    ``reap`` waits for them to exit, ``terminate`` asks them to; both end with SIGKILL for the
    stragglers. Always by PID, with the start time checked (no PID reuse accidents)."""

    def __init__(self, root: int | None = None, interval: float = 0.5):
        import threading

        self.root = root
        self.seen: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.seen |= descendants(self.root)
            self._stop.wait(interval)

    def __enter__(self) -> "DescendantTracker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def alive(self) -> list[int]:
        return [pid for pid, start in self.seen if running(pid, start)]

    def _kill(self, sig: int) -> None:
        for pid in self.alive():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def reap(self, timeout: float = 20.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.alive()
        self._kill(signal.SIGKILL)
        return left

    def terminate(self, timeout: float = 10.0) -> list[int]:
        self._kill(signal.SIGTERM)
        return self.reap(timeout)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so ``finally`` blocks stop the processes we started."""
    def _handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)


def run_foreground(cmd: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
                   watch: Sequence[str] = (), seen: set[str] | None = None) -> int:
    """Run ``cmd``, streaming its output, until it exits; then end whatever it left behind.
    Ctrl-C / SIGTERM (SystemExit via exit_on_sigterm) stop it and its children.

    Args:
        cmd: the command line.
        env: its whole environment.
        cwd: its working directory.
        watch: substrings to look for in its output ...
        seen: ... and the set the ones found are added to.

    Returns:
        its exit status.
    """
    import threading

    pipe = subprocess.PIPE if watch else None
    proc = subprocess.Popen(list(cmd), env=env, cwd=str(cwd) if cwd else None, stdout=pipe,
                            stderr=subprocess.STDOUT if watch else None)

    def relay() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            line = raw.decode(errors="replace")
            for w in watch:
                if w in line and seen is not None:
                    seen.add(w)

    reader = threading.Thread(target=relay, daemon=True) if watch else None
    if reader is not None:
        reader.start()
    with DescendantTracker(proc.pid) as tracker:
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                stop(proc)
    tracker.terminate()  # e.g. a SuperExec orphaned by a SuperNode that gave up
    if reader is not None:
        reader.join(timeout=5)
    return rc
