"""``addiff simulate``: a whole federation on one machine (demo hospitals unless site files are given).

Two mechanisms, same ServerApp/ClientApp:

* ``inprocess`` (default): ``flwr.simulation.run_simulation`` in this process. Smallest start-up
  cost, nothing to clean up afterwards. Its backend runs the ClientApps:

  - ``serial``: the sites take turns in this process, with every core (``server.serial_backend``);
  - ``ray``: Flower's Ray backend, one actor process per site that trains at once;
  - ``auto`` (default): ``ray`` when every site can have two cores of its own, else ``serial``
    (:func:`choose_backend`).
* ``flwr``: a SuperLink in simulation mode started here (own session, private FLWR_HOME, free
  port), then ``flwr run <project> --stream`` (Ray backend); the SuperLink is stopped by PID
  afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from addiff_core.config import ConfigError
from addiff_core.run_folder import RunFolder

from addiff_core.project import project_root, resolve_path, split_list

from .demo_data import DEMO_CASES, DEMO_DIR, DEMO_SITES, DEMO_SIZE, ensure_demo_sites
from .run_config_cli import add_options, check_flags, run_config as build_run_config
from .run_config_schema import SIMULATE


# ------------------------------------------------------------------------------------------
# resources
# ------------------------------------------------------------------------------------------
def concurrent_sites(n_sites: int, cpus: int, share_cores: bool = True) -> int:
    """How many simulated sites train at once (one Ray actor each) on ``cpus`` cores.

    A round takes ``ceil(sites / actors)`` waves of actors; actors beyond the cores share them
    (the OS time-slices), so a wave of ``a`` actors takes ``max(1, a / cpus)`` times one site's
    work. The plan with the shortest round wins, the one with fewer actors on a tie (each actor
    holds its own torch and data), and never more than ``2 * cpus`` actors. E.g. 3 sites on 2
    cores: 3 actors (a round = 1.5 site-works) rather than 2 (2 site-works: the third site waits
    for a free actor while one core idles). ``share_cores=False``: at most one actor per core."""
    n_sites, cpus = max(1, n_sites), max(1, cpus)
    best_cost, best = float("inf"), 1
    for actors in range(1, min(n_sites, (2 if share_cores else 1) * cpus) + 1):
        cost = math.ceil(n_sites / actors) * max(1.0, actors / cpus)
        if cost < best_cost - 1e-9:
            best_cost, best = cost, actors
    return best


def client_resources(n_sites: int, cpus_per_site: float | None = None, cpus: int | None = None,
                     gpus: int | None = None, whole_cpus: bool = False) -> dict[str, float]:
    """Ray resources per simulated site: the cores split over :func:`concurrent_sites` actors
    (Ray gives an actor ``floor(num_cpus)`` torch threads, at least 1), GPUs shared evenly when
    there are any. ``cpus`` and ``gpus`` default to this machine's. ``whole_cpus``: a whole number
    of CPUs per site (``flwr run``'s federation config holds an integer)."""
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            gpus = 0
    cpus = cpus or os.cpu_count() or 1
    if cpus_per_site:
        num_cpus = float(cpus_per_site)
    elif whole_cpus:
        num_cpus = cpus // concurrent_sites(n_sites, cpus, share_cores=False)
    else:
        # rounded down to Ray's resource precision so that the actors fit: Flower makes
        # int(cpus / num_cpus) actors, and 3 x 0.6667 would not fit on 2 cores
        num_cpus = math.floor(cpus / concurrent_sites(n_sites, cpus) * 1000) / 1000
    num_gpus = (gpus / n_sites) if gpus else 0.0
    return {"num_cpus": int(num_cpus) if num_cpus == int(num_cpus) else num_cpus, "num_gpus": num_gpus}


def sites_at_once(n_sites: int, num_cpus: float, cpus: int | None = None) -> int:
    """How many sites Flower's Ray backend runs at once with ``num_cpus`` per site: its actor
    pool holds ``int(cores / num_cpus)`` actors (``pool_size_from_resources``)."""
    return min(n_sites, int((cpus or os.cpu_count() or 1) / num_cpus))


def choose_backend(backend: str, n_sites: int, via: str = "inprocess", cpus_per_site: float | None = None,
                   cpus: int | None = None) -> str:
    """The simulation backend that runs the ClientApps: ``backend`` unless it is ``auto``.

    ``auto`` is ``ray`` when every site can train on two cores of its own at the same time (or
    Ray was asked for: ``--via flwr``, ``--cpus-per-site``), else ``serial``: with fewer cores Ray's
    sites only share them and each pays a process start-up (BENCHMARKS.md, "Federation overhead")."""
    if backend != "auto":
        return backend
    if via == "flwr" or cpus_per_site:
        return "ray"
    return "ray" if (cpus or os.cpu_count() or 1) >= 2 * max(1, n_sites) else "serial"


def check_backend(backend: str, via: str, cpus_per_site: float | None) -> None:
    """Refuse, before any work, a ``--backend serial`` that cannot be honoured."""
    if backend != "serial":
        return
    if via == "flwr":
        raise ConfigError("--backend serial runs the sites in this process: use it with --via inprocess "
                          "(a local SuperLink's simulation always uses Ray)")
    if cpus_per_site:
        raise ConfigError("--cpus-per-site sets Ray's CPUs per site: use it with --backend ray "
                          "(with --backend serial each site trains on every core, in turn)")


def check_cpus_per_site(cpus_per_site: float | None, via: str, cpus: int | None = None) -> None:
    """Refuse, before any work, a ``--cpus-per-site`` that Flower cannot run (it would fail deep
    in its engine, or wait for sites that never start)."""
    if not cpus_per_site:
        return
    cpus = cpus or os.cpu_count() or 1
    if not 0 < cpus_per_site <= cpus:
        raise ConfigError(f"--cpus-per-site {cpus_per_site}: this machine has {cpus} CPU core(s); "
                          f"a simulated site can have more than 0 and at most {cpus}")
    if via == "flwr" and cpus_per_site != int(cpus_per_site):
        raise ConfigError(f"--cpus-per-site {cpus_per_site}: --via flwr takes a whole number of CPUs per site "
                          "(Flower's federation config holds an integer); use --via inprocess for a fraction")


def _exit_interrupted(folder: RunFolder, wait_s: float = 20.0) -> None:
    """Ctrl-C: once the ServerApp thread has recorded the stop in run.json (it stops waiting at
    once), end the process without finalizing the interpreter: a site may still be training in the
    engine's worker thread, and tearing torch down under it can abort (SIGABRT, seen under load)."""
    deadline = time.monotonic() + wait_s
    while folder.read_run_json().get("status") == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


# ------------------------------------------------------------------------------------------
# the two mechanisms
# ------------------------------------------------------------------------------------------
def run_inprocess(run_config: dict[str, Any], n_sites: int, resources: dict[str, float],
                  backend_name: str = "ray") -> dict:
    """One federated run with ``flwr.simulation.run_simulation``; ``backend_name`` ``ray`` or
    ``serial`` (:mod:`server.serial_backend`)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database: its set-up lines are noise
    import warnings

    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from client.client_app import log as client_log
    from addiff_core.processes import DescendantTracker

    from .federation import StopSignal
    from .serial_backend import serial_backend
    from .server_app import make_server_app

    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines
    results: list = []
    stop = StopSignal()  # set when Flower's engine dies or on Ctrl-C: the ServerApp thread stops waiting for replies
    backend = {"client_resources": {"num_cpus": resources["num_cpus"], "num_gpus": resources["num_gpus"]},
               "init_args": {"logging_level": "error", "log_to_driver": True}}
    engine = (serial_backend(site_loggers=(client_log.name, "addiff_core")) if backend_name == "serial"
              else contextlib.nullcontext())
    with DescendantTracker() as tracker:
        try:
            with warnings.catch_warnings(), engine:
                warnings.simplefilter("ignore", DeprecationWarning)
                run_simulation(server_app=make_server_app(run_config, results, stop=stop), client_app=client_app,
                               num_supernodes=n_sites, backend_config=backend)
        except RuntimeError as e:
            if e.__cause__ is None:  # raised by the ServerApp itself: keep its traceback
                raise
            results[:] = [{"status": "failed"}]  # Flower's engine died ("Ending simulation"); it logged why
        except KeyboardInterrupt:
            # the signal reaches this (main) thread only: without this the ServerApp thread would wait
            # for replies up to the round timeout, and the process with it
            stop.stop(f"interrupted (Ctrl-C); the completed rounds are kept: addiff simulate --resume "
                      f"{run_config['run-dir']}")
            raise
        finally:
            stop.stop()  # whatever ended the engine, nothing more will answer
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except ImportError:
                pass
    # Ray's actor processes exit a few seconds after the simulation; wait for them (by PID)
    tracker.reap()
    return results[0] if results else {"status": "failed"}


def run_via_flwr(run_config: dict[str, Any], n_sites: int, resources: dict[str, float], run_dir: Path) -> dict:
    from addiff_core import processes as launch

    root = project_root()
    flwr_home = Path(tempfile.mkdtemp(prefix="addiff-flwr-home-"))
    env = launch.flower_env(flwr_home)
    port = launch.free_port()
    launch.exit_on_sigterm()
    log_file = run_dir / "superlink-simulation.log"
    superlink = launch.start([launch.executable("flower-superlink"), "--insecure", "--simulation",
                              "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
                              "--disable-runtime-dependency-installation"], env=env, log_file=log_file, cwd=root)
    try:
        launch.wait_for_port("127.0.0.1", port, proc=superlink, what="SuperLink (simulation)")
        launch.write_flwr_config(flwr_home, "addiff-sim", f"127.0.0.1:{port}", insecure=True)
        overrides = launch.write_run_config_toml(run_dir / "flwr-run-config.toml", run_config)
        fed = (f"num-supernodes={n_sites} client-resources-num-cpus={resources['num_cpus']} "
               f"client-resources-num-gpus={resources['num_gpus']}")
        rc = launch.run_foreground([launch.executable("flwr"), "run", str(root), "addiff-sim", "--stream",
                                    "--run-config", str(overrides), "--federation-config", fed], env=env, cwd=root)
        if rc != 0:
            print(f"flwr run exited with status {rc}; SuperLink log: {log_file}", file=sys.stderr)
    finally:
        launch.wait_children_exit(superlink.pid)  # let flwr-simulation finish and be reaped
        launch.stop(superlink)
        shutil.rmtree(flwr_home, ignore_errors=True)
    status = str(RunFolder(run_dir).read_run_json().get("status", "failed"))
    return {"status": "complete" if status == "complete" else ("stopped" if status.startswith("stopped") else "failed"),
            "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    root = project_root()
    t0 = time.perf_counter()
    check_options(args)
    check_cpus_per_site(args.cpus_per_site, args.via)
    check_backend(args.backend, args.via, args.cpus_per_site)
    if args.resume:
        run_dir = resolve_path(args.resume, Path.cwd())
        stored = RunFolder(run_dir).stored_run_config(require=("site-files",))
        n_sites = len(split_list(stored["site-files"]))
        run_config = build_run_config(args, SIMULATE, run_dir, stored=stored)
    else:
        if args.site_files:
            site_files = [resolve_path(p, Path.cwd()) for p in split_list(args.site_files)]
            missing = [str(p) for p in site_files if not p.is_file()]
            if missing:
                raise ConfigError(f"--site-files: not found: {', '.join(missing)}")
        else:
            data_dir = resolve_path(args.data_dir, Path.cwd()) if args.data_dir else root / DEMO_DIR
            site_files = ensure_demo_sites(data_dir, args.sites, args.cases_per_site, args.grid_size or DEMO_SIZE,
                                           args.data_seed)
        n_sites = len(site_files)
        run_dir = (resolve_path(args.run_dir, Path.cwd()) if args.run_dir
                   else root / "runs" / f"simulation-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        run_config = build_run_config(args, SIMULATE, run_dir, site_files=site_files)
    from .settings import from_run_config

    settings = from_run_config(run_config)  # fail early, with one clear line, on a bad setting
    resources = client_resources(n_sites, args.cpus_per_site, whole_cpus=args.via == "flwr")
    backend = choose_backend(args.backend, n_sites, args.via, args.cpus_per_site)
    folder = RunFolder(settings.run_dir)
    if not settings.resume:
        folder.refuse_if_started()
    folder.path.mkdir(parents=True, exist_ok=True)
    # e.g. a planted report/ link to a case folder: refused before any work, in one line
    folder.guard(also=("superlink-simulation.log", "flwr-run-config.toml") if args.via == "flwr" else ())
    print(f"federated simulation: {n_sites} site(s), strategy {settings.strategy}, model {settings.model.kind}, "
          f"{settings.num_rounds} round(s) [{' '.join(sorted({r.stage for r in settings.schedule}, key=['vae', 'diffusion', 'unet'].index))}], "
          f"via {args.via}, {backend_line(backend, n_sites, resources)}\n"
          f"run folder: {settings.run_dir}", flush=True)
    from addiff_core.run_summary import run_lines

    for line in run_lines(settings.to_json(), n_sites=n_sites, privacy=_site_privacy(settings.site_files)):
        print(("  " if not line.startswith("WARNING") else "") + line, flush=True)
    from .federation import FederationError

    try:
        if args.via == "flwr":
            out = run_via_flwr(run_config, n_sites, resources, settings.run_dir)
        else:
            out = run_inprocess(run_config, n_sites, resources, backend)
    except FederationError as e:
        print(f"addiff: error: {e}", file=sys.stderr)
        out = {"status": "failed"}
    except KeyboardInterrupt:
        print(f"\naddiff: interrupted; the rounds completed are kept (checkpoints in {folder.checkpoints}). "
              f"Continue with:\n  addiff simulate --resume {folder.path}", file=sys.stderr)
        _exit_interrupted(folder)
    took = time.perf_counter() - t0
    if out.get("status") == "stopped":
        print(f"\nstopped as asked after round {run_config['stop-after-round']} ({took:.0f} s); continue with:\n"
              f"  addiff simulate --resume {folder.path}")
        return 0
    if out.get("status") != "complete" or not folder.has_final_table():
        why = out.get("error") or folder.read_run_json().get("error") or "the federated run did not complete"
        print(f"addiff: error: {why}; see {folder.metrics}", file=sys.stderr)
        return 1
    from addiff_core.cross_site import CROSS_SITE_MD

    cross_md = folder.path / CROSS_SITE_MD
    print(f"\nfederated run complete in {took:.0f} s\n"
          f"  per-site table : {folder.final_md} (also .csv, .json)\n"
          f"  round metrics  : {folder.metrics}\n"
          f"  checkpoints    : {folder.checkpoints}\n"
          f"  final model    : {folder.final_model}"
          + (f"\n  report         : {folder.report_md} (+ .html, figures/)" if folder.report_md.is_file() else "")
          + (f"\n  cross-site     : {cross_md} (+ .csv, .json)" if cross_md.is_file() else ""))
    return 0


def check_options(args) -> None:
    """Every number of the command line, before any work: one line naming the option (a
    negative --steps or a seed past 2^32 were tracebacks deep in a run)."""
    from addiff_core.options import check_synth

    if not args.site_files and not args.resume:
        check_synth(args.sites, args.cases_per_site, args.grid_size or DEMO_SIZE, args.data_seed, seed_flag="--data-seed")
    check_flags(args, SIMULATE)


def backend_line(backend: str, n_sites: int, resources: dict[str, float]) -> str:
    """How the simulated sites run, for the console header."""
    if backend == "serial":
        import torch

        return f"sites in turn in this process ({torch.get_num_threads()} torch threads; --backend serial)"
    return (f"Ray actors of {resources['num_cpus']} CPU / {resources['num_gpus']:.2f} GPU per site "
            f"({sites_at_once(n_sites, resources['num_cpus'])} training at once)")


def _site_privacy(site_files) -> dict[str, dict] | None:
    """site -> {dp_enabled, epsilon (target), delta} from the site files this machine reads (the
    header's per-site DP line); None if one cannot be read (the run will say why)."""
    from addiff_core.config import load_site_config

    out = {}
    try:
        for f in site_files:
            site = load_site_config(f)
            p = site.privacy
            out[site.name] = {"dp_enabled": 1.0 if p.enabled else 0.0,
                              "target_epsilon": p.target_epsilon if p.enabled else None}
    except Exception:  # noqa: BLE001 - only for the header
        return None
    return out


def add_parser(sub) -> None:
    s = sub.add_parser("simulate", help="federated training of simulated hospitals on this machine "
                                        "(demo data generated if missing), then a per-site evaluation table")
    s.add_argument("--sites", type=int, default=DEMO_SITES, help=f"number of demo hospitals (default {DEMO_SITES})")
    s.add_argument("--cases-per-site", type=int, default=DEMO_CASES,
                   help=f"demo cases per hospital (default {DEMO_CASES}: 6 training, 2 held out)")
    s.add_argument("--data-dir", help="where demo hospitals live (default ./demo_data in the project); --size sizes "
                                      "them too (default 32)")
    s.add_argument("--data-seed", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--via", choices=("inprocess", "flwr"), default="inprocess",
                   help="inprocess: flwr.simulation.run_simulation (default); flwr: a local SuperLink + flwr run")
    s.add_argument("--backend", choices=("auto", "serial", "ray"), default="auto",
                   help="what runs the simulated sites (--via inprocess): serial = in turn in this process, with "
                        "every core; ray = Flower's Ray actors, in parallel; auto (default) = ray when every site "
                        "can have two cores of its own, else serial")
    s.add_argument("--cpus-per-site", type=float,
                   help="Ray CPUs per simulated site (default: the cores shared by the sites that train at once); "
                        "with --backend auto it means ray")
    add_options(s, SIMULATE)  # the run config's flags, --rounds, --set, --resume (docs/RUN_CONFIG.md)
    s.set_defaults(func=cmd_simulate)
