"""Which site this node serves, and its :class:`~addiff_core.site_task.SiteTask`, built once a run.

* deployment: the SuperNode's node config ``site-config="sites/hospital_a.yaml"``
  (``addiff client start --site ...`` sets it);
* simulation: node config ``partition-id`` indexes the run's ``site-files`` list (the server's
  train config first, else the run config).

Relative paths resolve against the project root (:func:`addiff_core.project.project_root`).
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from addiff_core.config import ConfigError, load_site_config, resolve_device
from addiff_core.site_task import SiteTask
from addiff_core.project import resolve_path, split_list
from addiff_core.wire import model_config_from_json

from .site_failures import phase, site_log

# one SiteTask per (run, site file, model config) in this process: data are loaded once a run.
# A process can serve several sites (the serial simulation backend) and several runs (a SuperNode
# without process isolation, a test): a new run starts from the site's files as they are now.
_TASKS: dict[tuple[int, str, str], SiteTask] = {}


def site_file_for(context: Context, config) -> Path:
    """The site file of this node (see the module docstring). Raises ConfigError if it has none."""
    nc = context.node_config
    if "site-config" in nc:
        return resolve_path(str(nc["site-config"]))
    # the server's list first: in a simulation it sends the site files resolved where it runs
    files = split_list(config.get("site-files") or context.run_config.get("site-files", ""))
    if "partition-id" not in nc:
        raise ConfigError("this SuperNode has no site file: start it with "
                          "--node-config 'site-config=\"sites/NAME.yaml\"' (addiff client start --site ...)")
    pid = int(nc["partition-id"])
    if not files:
        raise ConfigError("simulation: the run config lists no site-files")
    if pid >= len(files):
        raise ConfigError(f"simulated SuperNode {pid} has no site: the run lists {len(files)} site file(s) "
                          f"(site-files) for {nc.get('num-partitions', '?')} SuperNodes; "
                          f"run with num-supernodes={len(files)}")
    return resolve_path(files[pid])


def task_for(site_file: Path, model_json: str, run_id: int = 0) -> SiteTask:
    """The site's task (cached for the run); each step of building it in its :func:`phase`."""
    key = (int(run_id), str(site_file), model_json)
    task = _TASKS.get(key)
    if task is None:
        for k in [k for k in _TASKS if k[0] != key[0] or k[1] == key[1]]:  # another run's, or another model
            del _TASKS[k]
        with phase("site-config"):
            site = load_site_config(site_file)
        with phase("model-config", site):
            cfg = model_config_from_json(model_json)
        with phase("device", site):
            resolve_device(site.device)
        with phase("data", site), site_log(site):
            task = SiteTask(site, cfg)
        _TASKS[key] = task
    return task


def message_task(context: Context, cfg) -> SiteTask:
    """The task of the site this node serves, for a message's config."""
    with phase("site-config"):
        site_file, model_json = site_file_for(context, cfg), str(cfg["model-config"])
    return task_for(site_file, model_json, context.run_id)
