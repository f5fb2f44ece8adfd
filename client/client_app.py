"""The ClientApp (``[tool.flwr.app.components] clientapp = "client.client_app:app"``).

Thin: find this SuperNode's site file, build (once per process and site) an
:class:`addiff_core.fl_task.SiteTask`, and turn messages into ``SiteTask.train`` /
``SiteTask.evaluate`` calls. Only numbers and weights leave the site; case ids never do.

Which site am I?
* deployment: the SuperNode's node config ``site-config="sites/hospital_a.yaml"``
  (``addiff client start --site ...`` sets it);
* simulation: node config ``partition-id`` indexes the run's ``site-files`` list (run config,
  or the train config when the run was started in-process).
Relative paths resolve against the project root (``client.protocol.project_root``).
"""
from __future__ import annotations

import functools
import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from addiff_core.case_io import CaseError
from addiff_core.checkpoint import CheckpointError
from addiff_core.config import ConfigError, SiteConfig, load_site_config, resolve_device
from addiff_core.fl_task import MissingGlobalWeights, SiteTask, state_to_arrays
from addiff_core.privacy import PrivacyBudgetExhausted

from .protocol import (
    ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, METRICS_KEY, NUM_EXAMPLES, PACKED, SITE_ERROR_CLASSES, SITE_KEY,
    STATUS_FAILED, STATUS_NEED_VAE, STATUS_REFUSED, decode, encode, fingerprint, from_record, layout_from_json,
    model_config_from_json, resolve_path, split_list, to_record,
)
from .secagg_mod import check_update, flat_update, secure_aggregation_mod, secure_reply
from .site_models import ADAPT_ACTION, CROSS_ACTION, adapt_reply, cross_reply, planned_epochs, stage_epochs

log = logging.getLogger("flwr.addiff.client")

app = ClientApp()

# one SiteTask per (run, site file, model config) in this process: data are loaded once a run.
# A process can serve several sites (the serial simulation backend) and several runs (a SuperNode
# without process isolation, a test): a new run starts from the site's files as they are now.
_TASKS: dict[tuple[int, str, str], SiteTask] = {}


def site_file_for(context: Context, config) -> Path:
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


def task_for(site_file: Path, model_json: str, where: dict | None = None, run_id: int = 0) -> SiteTask:
    """The site's task (cached for the run). ``where`` records the phase reached and the site,
    for the failure reply (:func:`_never_raises`)."""
    where = where if where is not None else {}
    key = (int(run_id), str(site_file), model_json)
    task = _TASKS.get(key)
    if task is None:
        for k in [k for k in _TASKS if k[0] != key[0] or k[1] == key[1]]:  # another run's, or another model
            del _TASKS[k]
        where["phase"] = "site-config"
        site = load_site_config(site_file)
        where["site"] = site
        where["phase"] = "model-config"
        cfg = model_config_from_json(model_json)
        where["phase"] = "device"
        resolve_device(site.device)
        where["phase"] = "data"
        with site_log(site):
            task = SiteTask(site, cfg)
        _TASKS[key] = task
    where["site"] = task.site
    return task


def message_task(context: Context, cfg, where: dict) -> SiteTask:
    """The task of the site this node serves, for a message's config (:func:`task_for`)."""
    return task_for(site_file_for(context, cfg), str(cfg["model-config"]), where, context.run_id)


# ------------------------------------------------------------------------------------------
# failures stay at the site
# ------------------------------------------------------------------------------------------
# Flower copies str(exception) of a ClientApp into the error reply the server stores, and an
# exception message may name a data path or a case id (a case folder is often named after the
# patient). So no exception leaves this ClientApp: a failure is answered with a fixed status,
# an error class and a code from closed lists (``client.protocol``), and the details (message,
# traceback) go to the site's own log, ``STATE_DIR/site.log``, which never leaves the site.
CASE_LOGGER = "addiff_core.data.cases"  # per-case messages (skipped cases and why) of addiff_core.data


@contextmanager
def site_log(site: SiteConfig | None):
    """While inside: per-case messages and failure details go to the site's own log file
    (``STATE_DIR/site.log``) only, not to the console (in simulation the console is the
    coordinator's too)."""
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


def classify(exc: BaseException, phase: str) -> tuple[str, str]:
    """(code, error class) of a failure, both from the closed lists of ``client.protocol``."""
    import torch

    cls = next((c.__name__ for c in (ConfigError, CaseError, CheckpointError, MissingGlobalWeights, MemoryError,
                                     FloatingPointError, OSError, ValueError, RuntimeError) if isinstance(exc, c)),
               "Exception")
    if isinstance(exc, torch.OutOfMemoryError):
        cls = "MemoryError"
    assert cls in SITE_ERROR_CLASSES
    if isinstance(exc, UpdateNotMasked):
        code = exc.code
    elif cls == "MemoryError":
        code = "out-of-memory"
    elif phase in ("site-config", "model-config", "device"):
        code = phase
    elif phase == "data":
        code = "bad-data" if cls == "CaseError" else "data-io" if cls == "OSError" else "no-usable-data"
    elif phase == "weights":
        code = "missing-weights" if cls == "MissingGlobalWeights" else "bad-weights"
    elif cls == "FloatingPointError":
        code = "non-finite"
    elif cls == "OSError":
        code = "disk"
    else:
        code = "internal"
    return code, cls


class UpdateNotMasked(ValueError):
    """The site's own check of its update before masking failed (``secagg_mod.check_update``)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _failure_reply(msg: Message, where: dict, exc: BaseException) -> Message:
    site: SiteConfig | None = where.get("site")
    code, cls = classify(exc, where.get("phase", "internal"))
    name = site.name if site is not None else ""
    with site_log(site) as handler:
        detail = logging.getLogger(CASE_LOGGER)
        if handler is not None:
            detail.error("%s failed (%s, %s): %s\n%s", msg.metadata.message_type, code, cls, exc,
                         "".join(traceback.format_exception(exc)))
    where_to = "details in the site's log (STATE_DIR/site.log)" if handler is not None else \
        "details not logged (no state directory)"
    log.error("site %s: %s failed (%s, %s); %s", name or "?", msg.metadata.message_type, code, cls, where_to)
    return Message(RecordDict({SITE_KEY: ConfigRecord({"name": name, "status": STATUS_FAILED, "code": code,
                                                       "error": cls})}), reply_to=msg)


def _never_raises(fn):
    """Run a message handler; any exception becomes a failure reply (see above)."""

    @functools.wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        where: dict = {"phase": "site-config", "site": None}
        try:
            return fn(msg, context, where)
        except Exception as e:  # noqa: BLE001 - nothing may leave the site as an exception
            try:
                return _failure_reply(msg, where, e)
            except Exception:  # noqa: BLE001 - even the reply failed: the barest one
                return Message(RecordDict({SITE_KEY: ConfigRecord({"name": "", "status": STATUS_FAILED,
                                                                   "code": "internal", "error": "Exception"})}),
                               reply_to=msg)

    return wrapper


def _site_record(task: SiteTask, **extra) -> ConfigRecord:
    return ConfigRecord({"name": task.site.name, **extra})


def _has_global_vae(task: SiteTask, arrays: dict, want: str | None) -> bool:
    """True if the VAE this site would use in stage 2 (received now, or cached) is the global one."""
    if any(k.startswith("vae.") for k in arrays):
        return True
    try:
        task.load_global(arrays, "diffusion")
    except MissingGlobalWeights:
        return False
    return not want or fingerprint(state_to_arrays(task.model.state_dict(), "vae.")) == want


@app.train(mods=[secure_aggregation_mod])
@_never_raises
def train(msg: Message, context: Context, where: dict) -> Message:
    cfg = msg.content[CONFIG_KEY]
    task = message_task(context, cfg, where)
    where["phase"] = "weights"
    layout = layout_from_json(str(cfg.get(LAYOUT_KEY, "")))
    arrays = decode(from_record(msg.content[ARRAYS_KEY]), layout)
    stage = str(cfg["stage"])
    if stage == "diffusion" and not _has_global_vae(task, arrays, cfg.get("vae-fingerprint")):
        log.info("site %s: no matching global VAE cached; asking the server for it", task.site.name)
        return Message(RecordDict({SITE_KEY: _site_record(task, status=STATUS_NEED_VAE)}), reply_to=msg)
    if cfg.get("secure-aggregation", False) and RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise UpdateNotMasked("secure-aggregation")  # never an update in the clear: only Flower's mod masks it
    epochs = stage_epochs(task, stage, int(cfg.get("local-epochs", 0)))
    stage_round, stage_rounds = int(cfg.get("stage-round", 1)), int(cfg.get("stage-rounds", 1))
    t0 = time.perf_counter()
    where["phase"] = "train"
    try:
        res = task.train(arrays, stage, epochs=epochs, round_number=int(cfg["server-round"]), seed=int(cfg.get("seed", 0)),
                         proximal_mu=float(cfg.get("proximal-mu", 0.0)), total_epochs=epochs * stage_rounds,
                         epoch_offset=epochs * (stage_round - 1), stage_round=stage_round,
                         run_tag=str(cfg.get("run-tag", "")),
                         planned_epochs=planned_epochs(task, cfg) or None)  # DP noise: the whole run, fine-tuning too
    except PrivacyBudgetExhausted as e:  # a clear refusal, no weights
        log.warning("site %s: refusing round %s: %s", task.site.name, cfg["server-round"], e)
        return Message(RecordDict({SITE_KEY: _site_record(task, status=STATUS_REFUSED, reason=str(e)),
                                   METRICS_KEY: MetricRecord(task.privacy_spent())}), reply_to=msg)
    metrics = {NUM_EXAMPLES: int(res.num_examples), **{k: float(v) for k, v in res.metrics.items()},
               "local_epochs": float(epochs)}
    if not task.site.privacy.enabled:  # with DP, the time a round took (it depends on the data) stays here
        metrics["site_seconds"] = time.perf_counter() - t0
    if cfg.get("secure-aggregation", False):
        return Message(_secure_content(task, msg.content, stage, arrays, res.arrays, metrics),
                       reply_to=msg)
    wire = res.arrays
    if stage in layout:  # reply packed exactly like the request's stage weights
        separate = {k for k in msg.content[ARRAYS_KEY].keys() if not k.startswith(PACKED) and k.startswith(stage + ".")}
        wire, _ = encode(res.arrays, [stage], separate, order=layout, wire_dtype=str(cfg.get("wire-dtype", "float32")))
    return Message(RecordDict({ARRAYS_KEY: to_record(wire), METRICS_KEY: MetricRecord(metrics),
                               SITE_KEY: _site_record(task)}), reply_to=msg)


def _secure_content(task: SiteTask, content: RecordDict, stage: str, received: dict, trained: dict,
                    metrics: dict) -> RecordDict:
    """The update to mask (secure aggregation): trained minus received stage weights, checked here
    (the server sees only the sum); weighted by the training cases, capped like the server caps a
    plain reply's count (``secagg-weight-cap``: the site's first declaration).

    Raises:
        UpdateNotMasked: the site's check of its update failed.
    """
    received = {k: v for k, v in received.items() if k.startswith(stage + ".")}
    buffers = {k for k in content[ARRAYS_KEY].keys() if not k.startswith(PACKED)}  # sent unpacked
    update = flat_update(trained, received, buffers)
    cfg = content[CONFIG_KEY]
    max_weight = float(cfg["secagg-max-weight"])
    weight = int(min(metrics[NUM_EXAMPLES], int(cfg.get("secagg-weight-cap", max_weight)), max_weight))
    code = check_update(update, weight, max_weight, float(cfg["secagg-clip"]))
    if code is not None:
        raise UpdateNotMasked(code)
    return secure_reply(update, weight, metrics, _site_record(task))


@app.evaluate()
@_never_raises
def evaluate(msg: Message, context: Context, where: dict) -> Message:
    cfg = msg.content[CONFIG_KEY]
    task = message_task(context, cfg, where)
    steps = int(cfg.get("eval-steps", 0)) or None
    where["phase"] = "weights"
    arrays = decode(from_record(msg.content[ARRAYS_KEY]), layout_from_json(str(cfg.get(LAYOUT_KEY, ""))))
    where["phase"] = "evaluate"
    res = task.evaluate(arrays, seed=int(cfg.get("seed", 0)), steps=steps,
                        gamma=bool(cfg.get("eval-gamma", True)))
    metrics = {NUM_EXAMPLES: int(res.get("num_cases", 0)),
               **{k: float(v) for k, v in res.items() if k != "num_cases"}, **task.privacy_spent()}
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics), SITE_KEY: _site_record(task)}), reply_to=msg)


@app.train(ADAPT_ACTION)
@_never_raises
def adapt(msg: Message, context: Context, where: dict) -> Message:
    """After the last round: personalization and the local model (``client.site_models``)."""
    cfg = msg.content[CONFIG_KEY]
    task = message_task(context, cfg, where)
    with site_log(task.site):
        return adapt_reply(msg, task, where)


@app.evaluate(CROSS_ACTION)
@_never_raises
def cross(msg: Message, context: Context, where: dict) -> Message:
    """Other sites' shared models on this site's held-out cases (``client.site_models``)."""
    cfg = msg.content[CONFIG_KEY]
    task = message_task(context, cfg, where)
    with site_log(task.site):
        return cross_reply(msg, task, where)
