"""The hospital starts its own ClientApp processes and checks each run's app bundle first.

With ``approved_bundles`` in the site file, ``addiff client start`` runs the SuperNode in Flower's
``--isolation process`` mode: the SuperNode then starts no ClientApp process of its own (no
``flower-superexec``); it only queues a task per message on its local Runtime API
(127.0.0.1:PORT). Beside it runs this module's *launcher* (the role Flower's SuperExec plays in
the default mode): it claims each ClientApp task (``AcquireTask``) and starts one *guarded
ClientApp* process for it. That process is Flower's own ``flwr-clientapp``
(its runner reached through :mod:`client.flower_compat`) with one check put in front of the bundle's
installation:

1. Flower pulls the task's input (message, context, run, bundle bytes) from the SuperNode;
2. before ``install_from_fab`` (unzip into ``$FLWR_HOME/apps``) the guard hashes the bytes,
   ``sha256(fab)``, and refuses unless the hash is in the site's ``approved_bundles`` and the
   run's claimed hash, app id and version match the bundle (Flower loads the app from a folder
   named after the *claimed* values); an approved bundle is unpacked afresh, never taken from a
   folder an earlier process left;
3. on a refusal nothing of the bundle is unpacked or imported: Flower's error path answers the
   message with ``Error(INVALID_FAB)`` (the code Flower's own ``--trusted-entities`` refusal
   uses; the server logs "Flower error 7: invalid fab" and leaves the site out), the bundle is
   kept under ``$FLWR_HOME/refused-bundles/SHA256.fab`` for review, and the process exits.

Fail-closed: if the launcher is not running, no ClientApp runs at all (the server sees an absent
site); ``addiff client start`` stops the SuperNode when the launcher dies.

The guarded process imports the approved bundle's ``client``/``server`` packages from the folder
Flower unpacked it into, as the plain ``flwr-clientapp`` does (never this installation's copies,
which it used for the check itself); ``addiff_core``, torch and Flower come from the hospital's
installation.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import flower_compat as flower
from .bundle_approval import BundleRefused, bundle_sha256, check_bundle, normalize_hashes

GUARD_MODULE = "client.clientapp_guard"
REFUSED_DIR = "refused-bundles"  # under FLWR_HOME
MAX_REFUSED_KEPT = 20  # a coordinator sending bundle after bundle cannot fill the disk
POLL_SECONDS = 1.0  # as Flower's SuperExec (FLWR_SUPEREXEC_TASK_POLL_INTERVAL)
RUNTIME_HOST = "127.0.0.1"  # flower-supernode --host default: the Runtime API is on loopback only


def _python() -> list[str]:
    # -P: do not put the current directory on sys.path (a folder named client/ or server/ there
    # must not stand in for this module or for the bundle's packages)
    return [sys.executable, "-P"]


def launcher_cmd(approved, runtime_address: str, parent_pid: int) -> list[str]:
    cmd = [*_python(), "-m", GUARD_MODULE, "launcher", "--runtime-api-address", runtime_address,
           "--parent-pid", str(parent_pid)]
    for h in sorted(normalize_hashes(approved)):
        cmd += ["--approved", h]
    return cmd


def run_guarded(run_foreground, cmd, *, approved, runtime_port: int, env: dict, **kwargs) -> int:
    """``run_foreground(cmd, env=env, **kwargs)`` (the SuperNode, started with ``--isolation
    process``) with the launcher beside it; the launcher is stopped (by PID) when the SuperNode
    ends, and the SuperNode is stopped (SIGTERM to this process's main thread, which
    ``launch.exit_on_sigterm`` turns into SystemExit) when the launcher dies."""
    if "--isolation" not in cmd or cmd[cmd.index("--isolation") + 1] != "process":
        raise ValueError("the SuperNode must run with --isolation process beside the bundle guard")
    launcher = subprocess.Popen(launcher_cmd(approved, f"{RUNTIME_HOST}:{runtime_port}", os.getpid()),
                                env=env, stdin=subprocess.DEVNULL)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if launcher.poll() is not None:
                if launcher.returncode == 0 or done.wait(1.0):  # stopped by a signal (Ctrl-C) or by us
                    return
                print(f"addiff: error: the app-bundle guard (ClientApp launcher) exited with status "
                      f"{launcher.returncode}: no ClientApp can run; stopping the SuperNode", file=sys.stderr, flush=True)
                if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return run_foreground(cmd, env=env, **kwargs)
    finally:
        done.set()
        _stop(launcher)


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ------------------------------------------------------------------------------------------
# launcher: claims ClientApp tasks from the SuperNode's Runtime API, one guarded process each
# ------------------------------------------------------------------------------------------
def launcher_main(args) -> int:
    import httpx

    approved = normalize_hashes(args.approved)
    if not approved:
        print("addiff: error: the bundle guard needs at least one --approved SHA-256", file=sys.stderr)
        return 2
    if args.parent_pid:
        flower.start_parent_process_monitor(args.parent_pid)  # SIGINT to itself when `addiff client start` is gone

    def _exit(signum, frame):  # noqa: ARG001
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    client = flower.runtime_api_client(args.runtime_api_address)
    children: list[subprocess.Popen] = []
    print(f"app-bundle guard: ClientApps run only for approved bundles ({len(approved)} approved)", flush=True)
    try:
        while True:
            try:
                token = flower.acquire_clientapp_task(client)
            except (httpx.HTTPError, OSError):
                token = None  # the SuperNode's Runtime API is not up yet (or going down)
            if token:
                cmd = [*_python(), "-m", GUARD_MODULE, "clientapp", "--runtime-api-address",
                       args.runtime_api_address, "--token", token, "--insecure", "--parent-pid", str(os.getpid())]
                for h in sorted(approved):
                    cmd += ["--approved", h]
                children.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
            children = [c for c in children if c.poll() is None]
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        return 0
    finally:
        for c in children:
            _stop(c, timeout=5.0)
        client.close()


# ------------------------------------------------------------------------------------------
# guarded ClientApp process: Flower's flwr-clientapp with the bundle checked before it is unpacked
# ------------------------------------------------------------------------------------------
class _Guard:
    """What the guarded process saw: the task input Flower pulled, and the verdict on its bundle."""

    def __init__(self, approved: frozenset[str]):
        self.approved = approved
        self.message = self.run = self.fab = None
        self.refused: str | None = None


def install_guard(approved: frozenset[str]) -> _Guard:
    """Wrap three steps of Flower's ClientApp runner (``flower_compat.wrap_clientapp_runtime``):
    the task input pull (to see the run's claims), the bundle's installation (the check, before
    anything of the bundle is unpacked) and the reply push (a refusal answers ``INVALID_FAB``).
    Raises RuntimeError (nothing runs) if Flower's runner does not look as expected."""
    guard = _Guard(approved)

    def guarded_pull(pull, client):
        message, context, run, fab = pull(client)
        guard.message, guard.run, guard.fab = message, run, fab
        return message, context, run, fab

    def guarded_install(install, fab_file, install_dir=None, skip_prompt=False):
        run, fab = guard.run, guard.fab
        try:
            if run is None or fab is None or not isinstance(fab_file, bytes) or install_dir is not None:
                raise BundleRefused("the app bundle did not come the way the guard expects")
            info = check_bundle(fab_file, guard.approved, claimed_hash=fab.hash_str, run_fab_hash=run.fab_hash,
                                run_fab_id=run.fab_id, run_fab_version=run.fab_version)
            apps = (flower.flwr_home() / "apps").resolve()
            target = flower.app_install_dir(run.fab_id, run.fab_version, info.sha256)
            if target.parent.resolve() != apps or target.name != info.install_dir_name:
                raise BundleRefused(f"app bundle sha256 {info.sha256}: unexpected install folder {target.name!r}")
            if target.exists() or target.is_symlink():  # unpack the approved bytes afresh
                if target.is_symlink() or not target.is_dir():
                    target.unlink()
                else:
                    shutil.rmtree(target)
        except BundleRefused as e:
            guard.refused = str(e)
            _report_refusal(guard, fab_file, flower.flwr_home())
            raise
        path = install(fab_file, install_dir, skip_prompt)
        if Path(path).resolve() != target.resolve():
            guard.refused = f"app bundle sha256 {info.sha256} was unpacked to an unexpected folder"
            raise BundleRefused(guard.refused)
        print(f"app-bundle guard: run {run.run_id}: bundle sha256 {info.sha256} ({info.fab_id} {info.version}) "
              "is approved", file=sys.stderr, flush=True)
        return path

    def guarded_push(push, client, message, context):
        if guard.refused is not None and guard.message is not None:
            message = flower.invalid_fab_reply(guard.message, "app bundle not approved by this site")
        return push(client, message, context)

    flower.wrap_clientapp_runtime(guarded_pull, guarded_install, guarded_push)
    return guard


def _report_refusal(guard: _Guard, content, flwr_home: Path) -> None:
    """One line to the site's console, and the bundle kept for review (data only: never unpacked)."""
    run_id = getattr(guard.run, "run_id", "?")
    kept = ""
    if isinstance(content, bytes):
        d = Path(flwr_home) / REFUSED_DIR
        f = d / f"{bundle_sha256(content)}.fab"
        try:
            d.mkdir(parents=True, exist_ok=True)
            if f.is_file():
                kept = f"; kept at {f}"
            elif len(list(d.glob("*.fab"))) < MAX_REFUSED_KEPT:
                tmp = f.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(content)
                os.replace(tmp, f)
                kept = f"; kept at {f}"
        except OSError:
            pass
    print(f"addiff: REFUSED run {run_id}: {guard.refused}; nothing of it was unpacked or run{kept}. Review it "
          "(it is a zip file) and approve it with its hash (addiff client bundle-hash FILE) in the site file's "
          "approved_bundles if it is what you agreed to run", file=sys.stderr, flush=True)


def _forget_app_packages() -> None:
    """Drop this installation's ``client``/``server`` packages from ``sys.modules`` (the guard was
    imported as ``client.clientapp_guard``): Flower then imports ``client.client_app`` from the
    approved bundle's folder, which it puts first on ``sys.path``, as the plain flwr-clientapp does."""
    for name in list(sys.modules):
        if name in ("client", "server") or name.startswith(("client.", "server.")):
            del sys.modules[name]


def clientapp_main(args, flower_args: list[str]) -> int:
    approved = normalize_hashes(args.approved)
    if not approved:
        print("addiff: error: the guarded ClientApp needs at least one --approved SHA-256", file=sys.stderr)
        return 2
    if "--allow-runtime-dependency-installation" in flower_args:
        print("addiff: error: the guarded ClientApp does not install a bundle's dependencies", file=sys.stderr)
        return 2
    install_guard(approved)
    _forget_app_packages()
    sys.argv = ["flwr-clientapp", *flower_args]
    flower.flwr_clientapp_main()  # exits (flwr_exit)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {GUARD_MODULE}",
                                description="addiff's app-bundle guard (started by addiff client start)")
    sub = p.add_subparsers(dest="role", required=True)
    la = sub.add_parser("launcher", help="claim ClientApp tasks and start a guarded ClientApp for each")
    la.add_argument("--runtime-api-address", required=True)
    la.add_argument("--parent-pid", type=int)
    la.add_argument("--approved", action="append", default=[])
    ca = sub.add_parser("clientapp", help="Flower's flwr-clientapp, with the bundle checked first")
    ca.add_argument("--approved", action="append", default=[])
    args, rest = p.parse_known_args(argv)
    try:
        if args.role == "launcher":
            if rest:
                p.error(f"unrecognized arguments: {' '.join(rest)}")
            return launcher_main(args)
        return clientapp_main(args, rest)
    except ValueError as e:  # a malformed --approved
        print(f"addiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
