"""client/site_failures.py: each step of a handler runs in a phase that names its failure code
(closed list); the failure reply carries the site, the code and the class, never the message."""
from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from addiff_core.config import ConfigError, SiteConfig
from addiff_core.errors import CaseError
from addiff_core.site_task import MissingGlobalWeights
from addiff_core.wire import SITE_ERROR_CLASSES, SITE_ERROR_CODES, SITE_KEY, STATUS_FAILED
from client.flower_compat import set_task_identity
from client.site_failures import SiteFailure, UpdateNotMasked, never_raises, phase

SECRET = "/data/patient_0042_SMITH"  # what an exception message may name: never in a reply


def _site(tmp_path: Path) -> SiteConfig:
    return SiteConfig(name="hospital_q", data_dir=tmp_path / "cases", state_dir=tmp_path / "state")


@pytest.mark.parametrize("name, exc, code, cls", [
    ("site-config", ConfigError(SECRET), "site-config", "ConfigError"),
    ("round-config", ValueError(SECRET), "round-config", "ValueError"),
    ("data", CaseError(SECRET, "plan.yaml", "bad"), "bad-data", "CaseError"),
    ("data", OSError(SECRET), "data-io", "OSError"),
    ("data", ValueError(SECRET), "no-usable-data", "ValueError"),
    ("weights", MissingGlobalWeights(SECRET), "missing-weights", "MissingGlobalWeights"),
    ("weights", ValueError(SECRET), "bad-weights", "ValueError"),
    ("train", FloatingPointError(SECRET), "non-finite", "FloatingPointError"),
    ("train", OSError(SECRET), "disk", "OSError"),
    ("train", MemoryError(), "out-of-memory", "MemoryError"),
    ("train", UpdateNotMasked("update-out-of-range"), "update-out-of-range", "ValueError"),
    ("evaluate", KeyError(SECRET), "internal", "Exception"),
])
def test_a_phase_names_the_code_of_its_failure(tmp_path, name, exc, code, cls):
    site = _site(tmp_path)
    with pytest.raises(SiteFailure) as e:
        with phase(name, site):
            raise exc
    assert (e.value.code, e.value.error, e.value.site) == (code, cls, site)
    assert code in SITE_ERROR_CODES and cls in SITE_ERROR_CLASSES and e.value.__cause__ is exc


def test_an_inner_phase_keeps_its_code(tmp_path):
    with pytest.raises(SiteFailure) as e:
        with phase("train", _site(tmp_path)):
            with phase("weights", _site(tmp_path)):
                raise MissingGlobalWeights(SECRET)
    assert e.value.code == "missing-weights"


def _request() -> Message:
    set_task_identity()
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def test_a_handler_that_fails_answers_with_the_site_and_code_only(tmp_path):
    site = _site(tmp_path)

    @never_raises
    def handler(msg, context):
        with phase("data", site):
            raise CaseError(SECRET, "plan.yaml", "unreadable")

    reply = handler(_request(), None)
    assert dict(reply.content[SITE_KEY]) == {"name": "hospital_q", "status": STATUS_FAILED, "code": "bad-data",
                                             "error": "CaseError"}
    assert SECRET in (tmp_path / "state" / "site.log").read_text()  # the details stay at the site


def test_a_failure_outside_any_phase_is_internal_and_nameless():
    @never_raises
    def handler(msg, context):
        raise RuntimeError(SECRET)

    assert dict(handler(_request(), None).content[SITE_KEY]) == {"name": "", "status": STATUS_FAILED,
                                                                 "code": "internal", "error": "RuntimeError"}


@pytest.mark.parametrize("change", [{"eval-steps": 10**6}, {"seed": 2**70}])
def test_an_evaluation_message_out_of_bounds_is_refused_before_any_sampling(tmp_path, change):
    """The ClientApp's final evaluation reads seed and DDIM steps bounded (round_plan.EvalPlan):
    a server asking for a million DDIM steps gets a round-config failure, not hours of sampling."""
    from flwr.app import Context

    from addiff_core.config import load_model_config
    from addiff_core.site_task import initial_arrays
    from addiff_core.wire import ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, encode, layout_to_json, model_config_to_json
    from client.client_app import app
    from client.records import to_record
    from helpers.federation import TINY, synthetic_sites

    site_file = synthetic_sites(tmp_path, n_sites=1, cases_per_site=2, size=16)[0]
    cfg = load_model_config(TINY)
    arrays = initial_arrays(cfg, 0)
    wire, layout = encode(arrays, list(dict.fromkeys(k.split(".", 1)[0] for k in arrays)))
    set_task_identity()
    config = {"model-config": model_config_to_json(cfg), "seed": 0, "eval-steps": 0, "eval-gamma": False,
              LAYOUT_KEY: layout_to_json(layout), **change}
    msg = Message(RecordDict({CONFIG_KEY: ConfigRecord(config), ARRAYS_KEY: to_record(wire)}), dst_node_id=1,
                  message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_file)}, state=RecordDict(), run_config={})
    site = dict(app(message=msg, context=ctx).content[SITE_KEY])
    assert (site["status"], site["code"], site["error"]) == (STATUS_FAILED, "round-config", "ValueError"), site
