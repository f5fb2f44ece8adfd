"""A site's answer to the server's ``train.adapt`` message after the last round (issue #25).

Request: ``{"arrays": the final global model (packed, ``config["layout"]``), "config"}`` with
``personalize-epochs``, ``personalize-stages``, ``cross-site``, ``stage-plan``,
``local-epochs``, ``eval-steps``, ``seed``, ``run-tag``.

The site fine-tunes the global model (:func:`addiff_core.personalize.fine_tune`, as many epochs
as the run asks and its site file allows) and, with ``cross-site``, trains its local model
(unless its site file says ``train_local_model: false``); it evaluates each on its own held-out
cases. Reply: ``{"metrics": MetricRecord, "site": ConfigRecord}``:

* ``metrics``: ``personalized.<metric>`` / ``local.<metric>`` (held-out means, numbers only; the
  held-out case count as ``<model>.num-cases``) and what the site's accountant has spent
  (``dp_enabled``, ``epsilon``, ``delta``);
* ``site``: ``name``, ``personalized`` / ``local``: a status from :data:`MODEL_STATUSES`,
  ``shared``: whether the weights come along.

Only with ``share_models_for_evaluation: true`` in the site file does the reply also hold
``personalized-arrays`` / ``local-arrays`` (packed exactly like the request), for the server to
have the other sites evaluate them. Without it no weights leave the site.
"""
from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from addiff_core.cross_site import prefixed_metrics
from addiff_core.site_task import SiteTask, initial_arrays
from addiff_core.personalize import evaluate_at_home, fine_tune, train_local
from addiff_core.privacy import PrivacyBudgetExhausted
from addiff_core.round_plan import EvalPlan, RunPlan, site_epochs
from addiff_core.wire import (ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, METRICS_KEY, SITE_KEY, decode, encode_like,
                              layout_from_json)

from .records import from_record, to_record
from .site_failures import phase

log = logging.getLogger("flwr.addiff.client")

ADAPT_ACTION = "adapt"  # message type "train.adapt"
CROSS_ACTION = "cross"  # message type "evaluate.cross": other sites' shared models, all in one message
MODELS = ("personalized", "local")
# what a site says of each of its models: done (metrics sent), off (not asked, or its site file
# refuses it), refused (its privacy budget does not cover the training)
MODEL_STATUSES = ("done", "off", "refused")


def arrays_key(model: str) -> str:
    return f"{model}-arrays"


def shared_key(i: int) -> str:
    """The ArrayRecord of the i-th model of an ``evaluate.cross`` message (metrics: ``m<i>.<metric>``)."""
    return f"m{int(i)}"


def adapt_reply(msg: Message, task: SiteTask) -> Message:
    """Fine-tune / train locally, evaluate at home, reply with numbers (and weights if shared)."""
    cfg = msg.content[CONFIG_KEY]
    with phase("round-config", task.site):
        run = RunPlan.from_config(cfg)
        plan = EvalPlan.from_config(cfg, task.cfg.train_timesteps)
    with phase("weights", task.site):
        layout = layout_from_json(str(cfg.get(LAYOUT_KEY, "")))
        global_arrays = decode(from_record(msg.content[ARRAYS_KEY]), layout)
    with phase("train", task.site):
        planned = run.planned_epochs(task.site, task.cfg.kind)
        arrays, status = _site_models(task, cfg, run, global_arrays, plan.seed, plan.run_tag, planned)
    with phase("evaluate", task.site):
        metrics: dict[str, float] = {}
        for model, a in arrays.items():
            metrics.update(_metrics_at_home(task, a, plan, model))
        metrics.update(task.privacy_spent())
        shared = task.site.share_models_for_evaluation
        content = RecordDict({METRICS_KEY: MetricRecord(metrics),
                              SITE_KEY: ConfigRecord({"name": task.site.name, **status, "shared": bool(shared)})})
        if shared:  # the site file allows its models to be evaluated elsewhere: packed like the request
            for model, a in arrays.items():
                content[arrays_key(model)] = to_record(encode_like(a, msg.content[ARRAYS_KEY].keys(), layout, layout))
    return Message(content, reply_to=msg)


def _site_models(task: SiteTask, cfg, run: RunPlan, global_arrays: dict, seed: int, run_tag: str,
                 planned: int) -> tuple[dict[str, dict], dict[str, str]]:
    """The personalized and the local model as the run asks and the site file allows.

    Args:
        task: the site's task.
        cfg: the ``train.adapt`` config (``cross-site``).
        run: what the run asks (personalization epochs and stages, each stage's epochs).
        global_arrays: the final global model.
        seed, run_tag: the run's seed and tag (each model's optimiser states apart).
        planned: the run's epochs at this site (a DP site's noise covers them all).

    Returns:
        (arrays per model, status per model); a DP budget that does not cover one: "refused".
    """
    status = {m: "off" for m in MODELS}
    arrays: dict[str, dict] = {}
    epochs = site_epochs(task.site, run.personalize_epochs)
    try:
        if epochs > 0:
            arrays["personalized"] = fine_tune(task, global_arrays, epochs=epochs, seed=seed, run_tag=run_tag,
                                               which=run.personalize_stages, planned_epochs=planned)
            status["personalized"] = "done"
    except PrivacyBudgetExhausted as e:
        log.warning("site %s: no personalization: %s", task.site.name, e)
        status["personalized"] = "refused"
    try:
        if bool(cfg.get("cross-site", False)) and task.site.train_local_model:
            arrays["local"] = train_local(task, initial_arrays(task.cfg, seed), run.run_epochs(task.site.training),
                                          seed=seed, run_tag=run_tag, planned_epochs=planned)
            status["local"] = "done"
    except PrivacyBudgetExhausted as e:
        log.warning("site %s: no local model: %s", task.site.name, e)
        status["local"] = "refused"
    return arrays, status


def _metrics_at_home(task: SiteTask, arrays: dict, plan: EvalPlan, prefix: str) -> dict[str, float]:
    """A model's held-out metrics at this site (no gamma), keyed as
    ``addiff_core.cross_site.prefixed_metrics`` writes them."""
    res = evaluate_at_home(task, arrays, seed=plan.seed, steps=plan.steps, gamma=False)
    return prefixed_metrics(prefix, int(res.pop("num_cases")), res)


def cross_reply(msg: Message, task: SiteTask) -> Message:
    """``evaluate.cross``: each model of the message (``m0``, ``m1``, ... packed like the request's
    layout) on this site's held-out cases, numbers back (``m<i>.<metric>``, ``m<i>.num-cases``).
    The models are put into the site's model directly: none becomes its cached global VAE."""
    cfg = msg.content[CONFIG_KEY]
    with phase("round-config", task.site):
        plan = EvalPlan.from_config(cfg, task.cfg.train_timesteps)
    with phase("weights", task.site):
        layout = layout_from_json(str(cfg.get(LAYOUT_KEY, "")))
    metrics: dict[str, float] = {}
    for i in range(int(cfg.get("models", 0))):
        with phase("weights", task.site):
            arrays = decode(from_record(msg.content[shared_key(i)]), layout)
        with phase("evaluate", task.site):
            metrics.update(_metrics_at_home(task, arrays, plan, shared_key(i)))
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics), SITE_KEY: ConfigRecord({"name": task.site.name})}),
                   reply_to=msg)
