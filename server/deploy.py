"""``addiff server start``: a SuperLink (TLS by default), optional SuperNode authentication,
then the run is submitted with ``flwr run`` and streamed until it ends.

Processes: the SuperLink runs in this command's process group (Ctrl-C ends both); it is
stopped by PID when the run is over unless ``--keep-running``. Flower's CLI state (the
connection profile, the installed app) lives in a private FLWR_HOME inside the run folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from addiff_core.errors import UserError
from addiff_core.run_folder import RunFolder
from addiff_core import processes as launch
from addiff_core.project import project_root, resolve_path

from .run_config_cli import add_options, check_flags, run_config
from .run_config_schema import SERVER

PROFILE = "addiff"
# what this command writes into the run folder besides the run's own files (RunFolder.guard)
DEPLOY_ENTRIES = ("flwr-home", "superlink.log", "superlink.pid", "superlink-state.db", "flwr-run-config.toml")


def _warn_insecure(what: str) -> None:
    print(f"WARNING: {what} runs WITHOUT TLS (--insecure): model weights and metrics cross the network "
          "unencrypted and unauthenticated. Use this only for a test on one machine.", file=sys.stderr, flush=True)


def _connect_host(bind_host: str, cert: Path | None) -> str:
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    if cert is None:
        return "127.0.0.1"
    from .certs import cert_hosts

    hosts = cert_hosts(cert)
    for h in ("127.0.0.1", "localhost"):
        if h in hosts:
            return h
    return hosts[0] if hosts else "127.0.0.1"


ALREADY_REGISTERED = "Public key already in use"  # flwr supernode register, code 23


def _plain_lines(text: str) -> list[str]:
    """Lines of Flower CLI output without ANSI colours, box drawing and blank lines."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    out = []
    for line in text.splitlines():
        line = line.strip().strip("│╭╮╰╯─┃━ ").strip()
        if line and not line.startswith("Using SuperLink:"):
            out.append(line)
    return out


def register_keys(keys: list[Path], env: dict, flwr_home: Path) -> None:
    """Register each public key with the SuperLink (``flwr supernode register``). A key the
    SuperLink's state database already holds (a restart or ``--resume`` with the same database)
    is fine: that hospital keeps its node id."""
    for key in keys:
        name = key.name[:-4] if key.name.endswith(".pub") else key.stem
        res = subprocess.run([launch.executable("flwr"), "supernode", "register", str(key), PROFILE, "--name", name,
                              "--format", "json"], env=env, capture_output=True, text=True, cwd=str(flwr_home))
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            doc = {}
        if doc.get("success"):
            print(f"registered SuperNode key {key} as {name!r} (node id {doc.get('node-id')})", flush=True)
            continue
        msg = str(doc.get("error-message") or (res.stdout + "\n" + res.stderr))
        if ALREADY_REGISTERED in msg:
            print(f"SuperNode key {key} ({name!r}) is already registered with this SuperLink", flush=True)
            continue
        lines = _plain_lines(msg)
        raise UserError(f"registering {key} failed: {' '.join(lines[:3]) if lines else f'exit {res.returncode}'}")


LIVE_RUN_STATUSES = ("pending", "starting", "running")


def stop_stale_runs(env: dict, flwr_home: Path) -> list[str]:
    """Stop the runs that the SuperLink's state database still holds as pending/running: on
    ``--resume`` they are left over from the start that was interrupted (their ServerApp is
    gone). Flower would mark them failed only when it misses their heartbeat (about a minute
    later); until then a SuperNode that pulls one of their messages waits on it instead of
    training the resumed run, and a ServerApp of the old run that outlived the crash could go
    on next to the resumed one. Returns the run ids stopped."""
    flwr = launch.executable("flwr")
    res = subprocess.run([flwr, "ls", PROFILE, "--format", "json"], env=env, capture_output=True, text=True,
                         cwd=str(flwr_home))
    try:
        runs = json.loads(res.stdout).get("runs", [])
    except ValueError:
        print(f"WARNING: could not list the SuperLink's runs: {' '.join(_plain_lines(res.stdout + res.stderr)[:2])}",
              file=sys.stderr, flush=True)
        return []
    stopped = []
    for run in runs:
        run_id, status = str(run.get("run-id", "")), str(run.get("status", ""))
        if not run_id or not status.startswith(LIVE_RUN_STATUSES):
            continue
        out = subprocess.run([flwr, "stop", run_id, PROFILE, "--format", "json"], env=env, capture_output=True,
                             text=True, cwd=str(flwr_home))
        try:
            ok = bool(json.loads(out.stdout).get("success"))
        except ValueError:
            ok = False
        if ok:
            stopped.append(run_id)
            print(f"stopped run {run_id} ({status}), left over from the interrupted start", flush=True)
        else:
            print(f"WARNING: could not stop the left-over run {run_id} ({status}): "
                  f"{' '.join(_plain_lines(out.stdout + out.stderr)[:3])}", file=sys.stderr, flush=True)
    return stopped


def build_run_config(args, run_dir: Path) -> dict[str, Any]:
    """The run config of this start (``--resume``: run.json's, with what a resume may change)."""
    stored = RunFolder(run_dir).stored_run_config() if args.resume else None
    return run_config(args, SERVER, run_dir, stored=stored)


def cmd_server_start(args) -> int:
    from .settings import from_run_config

    check_options(args)
    root = project_root()
    run_dir = _run_dir(args, root)
    run_config = build_run_config(args, run_dir)
    settings = from_run_config(run_config)
    if not args.resume:
        RunFolder(run_dir).refuse_if_started()
    tls = _tls_files(args)
    keys = _authorized_keys(args)

    run_dir.mkdir(parents=True, exist_ok=True)
    # e.g. a planted report/ or superlink.log link to a case: one line here, not an error inside the ServerApp
    RunFolder(run_dir).guard(also=DEPLOY_ENTRIES)
    flwr_home = run_dir / "flwr-home"
    env = launch.flower_env(flwr_home)
    log_file = run_dir / "superlink.log"
    connect = f"{_connect_host(args.host, tls.get('cert'))}:{args.port}"
    print(f"starting SuperLink on {args.host}:{args.port} ({'insecure' if args.insecure else 'TLS'}"
          f"{', SuperNode authentication' if args.auth else ''}); log: {log_file}", flush=True)
    launch.exit_on_sigterm()
    superlink = launch.start(_superlink_command(args, run_dir, tls), env=env, log_file=log_file, cwd=root,
                             new_session=False)
    (run_dir / "superlink.pid").write_text(f"{superlink.pid}\n")
    rc = 1
    try:
        launch.wait_for_port(connect.rsplit(":", 1)[0], args.port, proc=superlink, ca_file=tls.get("ca"),
                             what="SuperLink")
        launch.write_flwr_config(flwr_home, PROFILE, connect, root_certificates=tls.get("ca"), insecure=args.insecure)
        if keys:
            register_keys(keys, env, flwr_home)
        if args.resume:
            stop_stale_runs(env, flwr_home)
        if args.no_run:
            print(f"SuperLink running (PID {superlink.pid}); submit with:\n"
                  f"  FLWR_HOME={flwr_home} flwr run {root} {PROFILE} --stream\nCtrl-C stops it.", flush=True)
            superlink.wait()
            return 0
        rc = _submit_and_stream(settings, run_config, run_dir, env, root, connect, log_file)
        if args.keep_running:
            print(f"SuperLink keeps running (PID {superlink.pid}); Ctrl-C stops it.", flush=True)
            superlink.wait()
    finally:
        launch.wait_children_exit(superlink.pid, timeout=10.0)  # flwr-serverapp pushing its last output
        launch.stop(superlink)
        (run_dir / "superlink.pid").unlink(missing_ok=True)
    return rc


def check_options(args) -> None:
    """Every number of the command line, before any work: one line naming the option (a port of
    70000 or a NaN round timeout failed deep inside Flower)."""
    from addiff_core.options import check_options as check_bounds

    check_bounds(args, "--port")
    check_flags(args, SERVER)


def _run_dir(args, root: Path) -> Path:
    """The run folder: ``--resume RUN_DIR`` (which must hold run.json), ``--run-dir``, or a new
    ``runs/federation-<date>-<time>``."""
    if args.resume:
        run_dir = resolve_path(args.resume, Path.cwd())
        RunFolder(run_dir).require_run_json()
        return run_dir
    return (resolve_path(args.run_dir, Path.cwd()) if args.run_dir
            else root / "runs" / f"federation-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def _tls_files(args) -> dict[str, Path]:
    """The SuperLink's CA, certificate and key ({} with ``--insecure``, after a warning)."""
    if args.insecure and args.auth:
        raise UserError("--auth (SuperNode authentication) needs TLS: drop --insecure")
    if args.insecure:
        _warn_insecure("the SuperLink")
        return {}
    certs = resolve_path(args.certs, Path.cwd())
    tls = {"ca": certs / "ca.crt", "cert": certs / "server.pem", "key": certs / "server.key"}
    missing = [str(p) for p in tls.values() if not p.is_file()]
    if missing:
        raise UserError(f"TLS certificate files missing: {', '.join(missing)} (make them with "
                        f"`addiff certs create {args.certs} --host YOUR.SERVER.NAME`, or pass --insecure for a test)")
    return tls


def _authorized_keys(args) -> list[Path]:
    """The hospitals' public keys to register (``--authorized-keys``, only with ``--auth``)."""
    keys = [resolve_path(k, Path.cwd()) for k in (args.authorized_keys or [])]
    if keys and not args.auth:
        raise UserError("--authorized-keys needs --auth (SuperNode authentication)")
    for k in keys:
        if not k.is_file():
            raise UserError(f"{k}: public key file not found (make one with `addiff certs node-key DIR NAME`)")
    return keys


def _superlink_command(args, run_dir: Path, tls: dict[str, Path]) -> list[str]:
    database = resolve_path(args.database, Path.cwd()) if args.database else run_dir / "superlink-state.db"
    cmd = [launch.executable("flower-superlink"), "--host", args.host, "--port", str(args.port),
           "--database", str(database), "--disable-runtime-dependency-installation"]
    cmd += ["--insecure"] if args.insecure else ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile",
                                                 str(tls["cert"]), "--ssl-keyfile", str(tls["key"])]
    if args.auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def _submit_and_stream(settings, run_config: dict[str, Any], run_dir: Path, env: dict, root: Path, connect: str,
                       log_file: Path) -> int:
    """``flwr run`` the federation on the SuperLink, stream it, and say how it ended (exit status)."""
    overrides = launch.write_run_config_toml(run_dir / "flwr-run-config.toml", run_config)
    print(f"submitting the run ({settings.num_rounds} rounds, strategy {settings.strategy}); waiting for "
          f"{settings.required_sites} SuperNode(s) to connect to {connect} ...", flush=True)
    t0 = time.perf_counter()
    launch.run_foreground([launch.executable("flwr"), "run", str(root), PROFILE, "--stream",
                           "--run-config", str(overrides)], env=env, cwd=root)
    folder = RunFolder(run_dir)
    doc = folder.read_run_json()
    status = str(doc.get("status", "failed"))
    if status == "complete":
        print(f"\nfederated run complete in {time.perf_counter() - t0:.0f} s\n"
              f"  per-site table : {folder.final_md} (also .csv, .json)\n"
              f"  round metrics  : {folder.metrics}\n"
              f"  checkpoints    : {folder.checkpoints}", flush=True)
        return 0
    if status.startswith("stopped"):
        print(f"\n{status}; continue with: addiff server start --resume {run_dir} ...", flush=True)
        return 0
    why = doc.get("error") or f"the run did not complete (status: {status})"
    print(f"addiff: error: {why}; SuperLink log: {log_file}", file=sys.stderr)
    return 1


def add_parser(sub) -> None:
    srv = sub.add_parser("server", help="run the federation server (SuperLink + the run)")
    ssub = srv.add_subparsers(dest="server_command", metavar="SERVER_COMMAND", required=True)
    s = ssub.add_parser("start", help="start a SuperLink (TLS), submit the federated run and stream it")
    s.add_argument("--certs", default="certs", help="folder with ca.crt, server.pem, server.key (addiff certs create)")
    s.add_argument("--insecure", action="store_true", help="no TLS (tests on one machine only; prints a warning)")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=9092, help="SuperLink port: Fleet, Control and Runtime APIs (default 9092)")
    s.add_argument("--auth", action="store_true", help="SuperNode authentication: only registered keys may join")
    s.add_argument("--authorized-keys", action="append", metavar="PUBKEY",
                   help="a hospital's public key (addiff certs node-key) to register; repeat per hospital")
    s.add_argument("--database", help="SuperLink state database (default RUN_DIR/superlink-state.db)")
    add_options(s, SERVER)  # the run config's flags, --rounds, --set, --resume (docs/RUN_CONFIG.md)
    s.add_argument("--no-run", action="store_true", help="only start the SuperLink (submit runs yourself)")
    s.add_argument("--keep-running", action="store_true", help="keep the SuperLink up after the run")
    s.set_defaults(func=cmd_server_start)
