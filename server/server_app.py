"""The ServerApp (``[tool.flwr.app.components] serverapp = "server.server_app:app"``).

Thin: parse the run config, then :class:`server.federation.Federation` does the rounds.
"""
from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from addiff_core.config import ConfigError
from addiff_core.run_folder import RunFolder

from .cross_site import CrossSiteFederation
from .demo_data import ensure_demo_data
from .federation import FederationError, StopSignal, log
from .settings import DEFAULTS, from_run_config


def _main(grid: Grid, run_config: Mapping[str, Any], send_site_files: bool, stop: StopSignal | None = None) -> dict:
    settings = from_run_config({k: v for k, v in run_config.items() if k in DEFAULTS})
    try:
        # `flwr run .` on a fresh clone: the default site files' demo data, written before round 1
        # here, in the one ServerApp (the ClientApps may be other processes, and never import server/)
        ensure_demo_data(settings.site_files, DEFAULTS["site-files"].split(","))
    except ConfigError as e:  # stops before any run folder is written
        return {"status": "failed", "run_dir": str(settings.run_dir), "error": str(e), "run_json": None}
    try:
        # the federation, and after its last round personalization / the cross-site matrix when asked (#25)
        return CrossSiteFederation(grid, settings, send_site_files=send_site_files, stop=stop).run()
    except FederationError as e:
        # a clean stop (e.g. "gave up after N attempts"): logged in one line and recorded in run.json
        # (status "failed"), which the launchers read; no Flower traceback, no exit code 201
        # (Federation.run has recorded it in run.json, when the run got that far)
        run_json = RunFolder(settings.run_dir).run_json
        return {"status": "failed", "run_dir": str(settings.run_dir), "error": str(e),
                "run_json": str(run_json) if run_json.is_file() else None}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = _main(grid, dict(context.run_config), send_site_files=False)
    if out.get("status") == "failed":
        # the stream's last line; `flwr run` still exits 0 (Flower 1.42's CLI only prints the logs)
        where = f"status \"failed\" in {out['run_json']}" if out.get("run_json") else "no round was run"
        log.error("the run FAILED (%s): %s", where, out.get("error", ""))


def make_server_app(run_config: Mapping[str, Any], results: list | None = None,
                    stop: StopSignal | None = None) -> ServerApp:
    """A ServerApp with the run config baked in, for ``flwr.simulation.run_simulation`` (which
    passes an empty run config). The site files then travel in the train/evaluate config,
    because the simulated ClientApps cannot see a run config either. ``stop``: set by the caller
    when Flower's engine ended (it died, or Ctrl-C); the ServerApp then stops waiting for replies."""
    sim_app = ServerApp()

    @sim_app.main()
    def _sim_main(grid: Grid, context: Context) -> None:
        out = _main(grid, {**dict(context.run_config), **dict(run_config)}, send_site_files=True, stop=stop)
        if results is not None:
            results.append(out)

    return sim_app
