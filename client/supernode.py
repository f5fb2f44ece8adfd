"""``addiff client start``: one hospital's SuperNode (``flower-supernode``) for its site file.

The site file is checked first (and its cases counted) so that a wrong path fails here, with
one line, rather than inside the first round. The SuperNode runs in the foreground, in this
command's process group (Ctrl-C or SIGTERM to the group ends it and its ClientApp processes).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# what flower-supernode prints when the SuperLink refuses to activate it (its exit status is 1):
# the SuperLink (up, authentication on) holds no node with this public key, or the node with this
# key is still marked online (a SuperNode with this key stopped less than ~60 s ago, or runs
# elsewhere). Its own log says which ("No SuperNode found with the given public key" / "could
# not be activated").
ACTIVATION_FAILED = "Failed to activate SuperNode"
# ... and when the SuperLink requires authentication but this node has no --auth-key
AUTH_REQUIRED = "All SuperNodes must be registered via the CLI"
RETRY_SECONDS = 5


def _refused(superlink: str, key: Path | None) -> str:
    if key is None:
        return (f"the SuperLink at {superlink} refused to activate this SuperNode; ask the server operator "
                "(SuperLink log) why")
    pub = key.with_name(key.name + ".pub")
    return (f"the SuperLink at {superlink} refused to activate this SuperNode: its public key "
            f"({pub if pub.is_file() else 'the public half of ' + str(key)}) is not registered there (send it "
            "to the server operator: addiff server start --auth --authorized-keys KEY.pub), or a SuperNode "
            "with this key is still connected (one stopped less than a minute ago counts)")


def cmd_client_start(args) -> int:
    from addiff_core.options import check_address, check_options

    from addiff_core import processes as launch

    check_options(args, "--port", "--threads", "--max-retries", "--activation-retries")  # before any work
    check_address("--superlink", args.superlink)
    site_file, site, n_cases = _checked_site(args)
    cmd, key = _supernode_command(args, site_file, site)
    extra = {}
    if args.threads:
        extra = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env = launch.flower_env(_resolve(args.flwr_home) if args.flwr_home else None, **extra)
    clear_unpacked_apps(env)
    print(f"site {site.name}: {n_cases} case folder(s) in {site.data_dir}; device {site.device}; "
          f"SuperNode -> {args.superlink} (runtime API port {args.port})", flush=True)
    run = _runner(args, site)
    launch.exit_on_sigterm()
    return _run_until_joined(run, cmd, env, args, key)


def clear_unpacked_apps(env: dict[str, str]) -> Path:
    """Empty this SuperNode's cache of unpacked app bundles (``$FLWR_HOME/apps``); returns it.

    Flower 1.42 unpacks a run's bundle into a folder there and reuses the folder whenever it
    exists (``flwr.cli.install.validate_and_install``). A SuperNode killed while it unpacks
    leaves a partial folder, and every later message of that run then fails at this site
    ("load client app exception") even after a restart. Each run's bundle comes with its
    messages, so an empty cache costs one unpacking."""
    import shutil

    from .flower_compat import apps_dir

    apps = apps_dir(env)
    if apps.is_dir():
        shutil.rmtree(apps)
    return apps


def _resolve(path: str) -> Path:
    from addiff_core.project import resolve_path

    return resolve_path(path, Path.cwd())


def _checked_site(args):
    """(site file, SiteConfig, number of case folders): a wrong path fails here, in one line."""
    from addiff_core.case_io import list_cases
    from addiff_core.config import ConfigError, load_site_config

    site_file = _resolve(args.site)
    site = load_site_config(site_file)
    if not site.data_dir.is_dir():
        raise ConfigError(f"{site_file}: data_dir {site.data_dir} does not exist")
    n_cases = len(list_cases(site.data_dir))
    if n_cases == 0:
        raise ConfigError(f"{site_file}: no case folders in {site.data_dir}")
    return site_file, site, n_cases


def _supernode_command(args, site_file: Path, site) -> tuple[list[str], Path | None]:
    """The flower-supernode command line (transport, authentication) and the private key, if any."""
    from addiff_core.errors import UserError

    from addiff_core import processes as launch
    from .bundle_approval import site_approval

    cmd = [launch.executable("flower-supernode"), "--superlink", args.superlink,
           "--node-config", f"site-config={json.dumps(str(site_file))}", "--port", str(args.port),
           "--isolation", "process" if site_approval(site) is not None else "subprocess"]
    if args.insecure and args.auth_key:
        raise UserError("--auth-key (SuperNode authentication) needs TLS: drop --insecure, pass --ca")
    if args.insecure:
        print("WARNING: this SuperNode connects WITHOUT TLS (--insecure): model weights and metrics cross the "
              "network unencrypted. Use this only for a test on one machine.", file=sys.stderr, flush=True)
        cmd.append("--insecure")
    else:
        if not args.ca:
            raise UserError("--ca CA_CERT is required (the federation's ca.crt), or --insecure for a local test")
        ca = _resolve(args.ca)
        if not ca.is_file():
            raise UserError(f"{ca}: CA certificate not found")
        cmd += ["--root-certificates", str(ca)]
    key = None
    if args.auth_key:
        key = _resolve(args.auth_key)
        if not key.is_file():
            raise UserError(f"{key}: private key not found (addiff certs node-key DIR NAME)")
        cmd += ["--auth-supernode-private-key", str(key)]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    return cmd, key


def _runner(args, site):
    """How the SuperNode runs: in the foreground, its ClientApps started by the hospital itself
    (each after checking the bundle's hash) when the site file lists approved bundles."""
    from addiff_core import processes as launch

    if site.approved_bundles:  # the hospital starts its ClientApps itself, each after checking the bundle's hash
        from functools import partial

        from . import clientapp_guard
        return partial(clientapp_guard.run_guarded, launch.run_foreground, approved=site.approved_bundles,
                       runtime_port=args.port)
    print(f"site {site.name}: no approved_bundles in the site file: this site runs whatever app bundle (code) "
          "the server sends (docs/FEDERATION.md#what-a-hospital-trusts-the-coordinator-with)", flush=True)
    return launch.run_foreground


def _run_until_joined(run, cmd: list[str], env: dict, args, key: Path | None) -> int:
    """Run the SuperNode; while the SuperLink refuses to activate it, try again (up to
    ``--activation-retries`` times, RETRY_SECONDS apart). Returns its exit status."""
    rc = 1
    for attempt in range(args.activation_retries + 1):
        seen: set[str] = set()
        rc = run(cmd, env=env, watch=[ACTIVATION_FAILED, AUTH_REQUIRED], seen=seen)
        if rc == 0:
            return 0
        if AUTH_REQUIRED in seen:
            print(f"addiff: error: the SuperLink at {args.superlink} requires SuperNode authentication: pass "
                  "--auth-key with this site's private key (addiff certs node-key) whose public key the server "
                  "operator registered", file=sys.stderr, flush=True)
            return rc
        if ACTIVATION_FAILED not in seen:
            return rc
        if attempt == args.activation_retries:
            print(f"addiff: error: {_refused(args.superlink, key)}; gave up after {attempt + 1} attempt(s)",
                  file=sys.stderr, flush=True)
            return rc
        print(f"SuperNode could not join yet: {_refused(args.superlink, key)}; retrying in {RETRY_SECONDS} s "
              f"({args.activation_retries - attempt} retries left)", file=sys.stderr, flush=True)
        time.sleep(RETRY_SECONDS)
    return rc


def add_parser(sub) -> None:
    c = sub.add_parser("client", help="run a hospital's federation client (SuperNode)")
    csub = c.add_subparsers(dest="client_command", metavar="CLIENT_COMMAND", required=True)
    s = csub.add_parser("start", help="connect this site to the federation server and train when asked")
    s.add_argument("--site", required=True, help="this hospital's site file (sites/NAME.yaml)")
    s.add_argument("--superlink", required=True, help="server address HOST:PORT")
    s.add_argument("--ca", help="the federation's CA certificate (ca.crt from the server operator)")
    s.add_argument("--insecure", action="store_true", help="no TLS (tests on one machine only; prints a warning)")
    s.add_argument("--auth-key", help="private key for SuperNode authentication (addiff certs node-key)")
    s.add_argument("--port", type=int, default=9094,
                   help="local port of this SuperNode's runtime (ClientApp IO) API; one per SuperNode on a machine")
    s.add_argument("--threads", type=int, help="CPU threads for training (OMP_NUM_THREADS)")
    s.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    s.add_argument("--activation-retries", type=int, default=60,
                   help=f"retry joining this often ({RETRY_SECONDS} s apart) while the SuperLink refuses this node "
                        "(its key not registered yet, or a SuperNode with this key stopped less than a minute ago; "
                        "default 60). A SuperLink that is not up yet is waited for without limit (--max-retries)")
    s.add_argument("--flwr-home", help="Flower's state folder for this SuperNode (default $FLWR_HOME or ~/.flwr)")
    s.set_defaults(func=cmd_client_start)
    from .bundle_approval import add_parser as add_bundle_hash_parser

    add_bundle_hash_parser(csub)
