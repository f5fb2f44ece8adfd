"""The ClientApp (``[tool.flwr.app.components] clientapp = "client.client_app:app"``).

Each handler turns a message into a call of this site's :class:`addiff_core.site_task.SiteTask`
(``client.site_tasks``: which site, built once a run) and its result into the reply. Only
numbers and weights leave the site; case ids never do, and no exception does either
(``client.site_failures``: each step runs in a ``phase`` that names its failure code).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from addiff_core.site_task import MissingGlobalWeights, SiteTask, TrainResult, state_to_arrays
from addiff_core.privacy import PrivacyBudgetExhausted
from addiff_core.round_plan import EvalPlan, RoundPlan
from addiff_core.wire import (ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, METRICS_KEY, NUM_EXAMPLES, PACKED, SITE_KEY,
                              STATUS_NEED_VAE, STATUS_REFUSED, decode, encode_like, fingerprint, layout_from_json)

from .flower_compat import RECORD_KEY_CONFIGS
from .records import from_record, to_record
from .secagg_mod import check_update, flat_update, secure_aggregation_mod, secure_reply
from .site_failures import UpdateNotMasked, never_raises, phase, site_log
from .site_models import ADAPT_ACTION, CROSS_ACTION, adapt_reply, cross_reply
from .site_tasks import message_task

log = logging.getLogger("flwr.addiff.client")

app = ClientApp()


@app.train(mods=[secure_aggregation_mod])
@never_raises
def train(msg: Message, context: Context) -> Message:
    """Train the round's stage on this site's cases from the global weights sent."""
    cfg = msg.content[CONFIG_KEY]
    task = message_task(context, cfg)
    with phase("round-config", task.site):
        plan = RoundPlan.from_config(cfg).at_site(task.site, task.cfg.kind)
    with phase("weights", task.site):
        layout = layout_from_json(str(cfg.get(LAYOUT_KEY, "")))
        arrays = decode(from_record(msg.content[ARRAYS_KEY]), layout)
        if plan.stage == "diffusion" and not _has_global_vae(task, arrays, cfg.get("vae-fingerprint")):
            log.info("site %s: no matching global VAE cached; asking the server for it", task.site.name)
            return _reply(msg, task, status=STATUS_NEED_VAE)
    with phase("train", task.site):
        if cfg.get("secure-aggregation", False) and RECORD_KEY_CONFIGS not in msg.content.config_records:
            raise UpdateNotMasked("secure-aggregation")  # never an update in the clear: only Flower's mod masks it
        t0 = time.perf_counter()
        try:
            res = task.train(arrays, plan)
        except PrivacyBudgetExhausted as e:  # a clear refusal, no weights
            log.warning("site %s: refusing round %s: %s", task.site.name, plan.round_number, e)
            return _reply(msg, task, {METRICS_KEY: MetricRecord(task.privacy_spent())}, status=STATUS_REFUSED,
                          reason=str(e))
        return _train_reply(msg, task, plan, arrays, layout, res, time.perf_counter() - t0)


@app.evaluate()
@never_raises
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's held-out metrics at this site."""
    cfg = msg.content[CONFIG_KEY]
    task = message_task(context, cfg)
    with phase("round-config", task.site):  # before the weights are decoded, as in train
        plan = EvalPlan.from_config(cfg, task.cfg.train_timesteps)
    with phase("weights", task.site):
        arrays = decode(from_record(msg.content[ARRAYS_KEY]), layout_from_json(str(cfg.get(LAYOUT_KEY, ""))))
    with phase("evaluate", task.site):
        res = task.evaluate(arrays, seed=plan.seed, steps=plan.steps, gamma=bool(cfg.get("eval-gamma", True)))
        metrics = {NUM_EXAMPLES: int(res.get("num_cases", 0)),
                   **{k: float(v) for k, v in res.items() if k != "num_cases"}, **task.privacy_spent()}
        return _reply(msg, task, {METRICS_KEY: MetricRecord(metrics)})


def _site_models_handler(reply: Callable[[Message, SiteTask], Message]) -> Callable[[Message, Context], Message]:
    """A handler of ``client.site_models``: this site's task, its per-case messages to its own log."""

    @never_raises
    def handler(msg: Message, context: Context) -> Message:
        task = message_task(context, msg.content[CONFIG_KEY])
        with site_log(task.site):
            return reply(msg, task)

    return handler


# after the last round: personalization and the local model; other sites' shared models at home
adapt = app.train(ADAPT_ACTION)(_site_models_handler(adapt_reply))
cross = app.evaluate(CROSS_ACTION)(_site_models_handler(cross_reply))


# ------------------------------------------------------------------------------------------
def _reply(msg: Message, task: SiteTask, records: dict | None = None, **site) -> Message:
    """A reply with the site record (its name and ``site``) beside ``records``."""
    return Message(RecordDict({**(records or {}), SITE_KEY: ConfigRecord({"name": task.site.name, **site})}),
                   reply_to=msg)


def _has_global_vae(task: SiteTask, arrays: dict, want: str | None) -> bool:
    """True if the VAE this site would use in stage 2 (received now, or cached) is the global one."""
    if any(k.startswith("vae.") for k in arrays):
        return True
    try:
        task.load_global(arrays, "diffusion")
    except MissingGlobalWeights:
        return False
    return not want or fingerprint(state_to_arrays(task.model.state_dict(), "vae.")) == want


def _train_reply(msg: Message, task: SiteTask, plan: RoundPlan, received: dict, layout: dict, res: TrainResult,
                 seconds: float) -> Message:
    """The trained stage's weights (packed like the request's, or masked) and the round's numbers.

    Args:
        msg: the train request.
        task: the site's task.
        plan: the round, as the site trained it.
        received: the weights received (the update's origin under secure aggregation).
        layout: the request's wire layout (the reply is packed like it).
        res: what training gave.
        seconds: how long it took (sent only without DP).
    """
    cfg = msg.content[CONFIG_KEY]
    metrics = {NUM_EXAMPLES: int(res.num_examples), **{k: float(v) for k, v in res.metrics.items()},
               "local_epochs": float(plan.epochs)}
    if not task.site.privacy.enabled:  # with DP, the time a round took (it depends on the data) stays here
        metrics["site_seconds"] = seconds
    if cfg.get("secure-aggregation", False):
        return Message(_secure_content(task, msg.content, plan.stage, received, res.arrays, metrics), reply_to=msg)
    wire = res.arrays
    if plan.stage in layout:  # reply packed exactly like the request's stage weights
        wire = encode_like(res.arrays, msg.content[ARRAYS_KEY].keys(), [plan.stage], layout,
                           wire_dtype=str(cfg.get("wire-dtype", "float32")))
    return _reply(msg, task, {ARRAYS_KEY: to_record(wire), METRICS_KEY: MetricRecord(metrics)})


def _secure_content(task: SiteTask, content: RecordDict, stage: str, received: dict, trained: dict,
                    metrics: dict) -> RecordDict:
    """The update to mask (secure aggregation): trained minus received stage weights, checked here
    (the server sees only the sum); weighted by the training cases, capped like the server caps a
    plain reply's count (``secagg-weight-cap``: the site's first declaration).

    Args:
        task: the site's task.
        content: the train request's content.
        stage: the stage trained.
        received, trained: the stage's weights before and after.
        metrics: the reply's numbers (``num-examples`` is the weight).

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
    return secure_reply(update, weight, metrics, ConfigRecord({"name": task.site.name}))
