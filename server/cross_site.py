"""After the last round (issue #25): personalization at each site and the cross-site matrix.

:class:`CrossSiteFederation` is :class:`server.federation.Federation` plus, after the final
evaluation of the global model, when the run config asks (``personalize-epochs`` > 0 or
``cross-site``):

1. one ``train.adapt`` message to every site with the final global model
   (:mod:`client.site_models`): each site fine-tunes it (``personalized.pt``, kept at home) and,
   with ``cross-site``, trains its local model, evaluates them on its own held-out cases and
   replies with numbers; weights only from a site whose file says
   ``share_models_for_evaluation: true``;
2. with ``cross-site``, the shared models in one ``evaluate.cross`` message to each other site
   (numbers back; the models never become a site's cached global VAE);
3. the global model's row of the matrix is the final evaluation itself; the matrix goes to
   ``cross_site.csv/.json/.md`` (:mod:`addiff_core.cross_site`), the personalized numbers into
   the final table beside the global ones.

Every number a site sends is checked where it is used: case counts by ``validation.check_count``,
metrics by ``cross_site.bounded`` (an implausible value is an empty cell), statuses against the
closed list, shared weights against the model's names, shapes, dtypes and finiteness.
"""
from __future__ import annotations

import logging
import math

from addiff_core.cross_site import MATRIX_METRICS, NUM_CASES, Matrix, ModelRow, bounded, cell_of, prefixed_key

from addiff_core.wire import ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, METRICS_KEY, SITE_KEY, decode, encode, layout_to_json

from client.records import from_record, to_record
from client.site_models import ADAPT_ACTION, CROSS_ACTION, MODEL_STATUSES, MODELS, arrays_key, shared_key

from .federation import Federation
from .final_table import expected_sites, final_notes, write_tables
from .replies import sent_to
from .validation import check_arrays, check_count, spec_of

log = logging.getLogger("flwr.addiff")

PERSONALIZED_PREFIX = "personalized_"


class CrossSiteFederation(Federation):
    """A federation whose end may add personalization and the cross-site matrix (module doc)."""

    @property
    def cross_site(self) -> bool:
        return bool(self.settings.raw.get("cross-site", False))

    @property
    def personalize_epochs(self) -> int:
        return int(self.settings.raw.get("personalize-epochs", 0))

    def _base_config(self) -> dict:
        # every message says what comes after the last round: a DP site calibrates its noise for it too
        return {**super()._base_config(), "personalize-epochs": self.personalize_epochs,
                "personalize-stages": str(self.settings.raw.get("personalize-stages", "both")),
                "cross-site": self.cross_site}

    def final_evaluation(self) -> list[dict]:
        rows = super().final_evaluation()
        if self.personalize_epochs <= 0 and not self.cross_site:
            return rows
        self.site_models = SiteModels(self)
        rows = self.site_models.run(rows)
        return rows

    def final_notes(self, rows: list[dict]) -> list[str]:
        extra = getattr(self, "site_models", None)
        return final_notes(self.settings, self.strategy, rows) + (extra.notes if extra else [])


class SiteModels:
    """The adapt exchange, the evaluation of shared models elsewhere, the matrix and the table."""

    def __init__(self, fed: CrossSiteFederation):
        self.fed = fed
        self.notes: list[str] = []
        self.wire, self.layout = encode(fed.arrays, fed.groups, fed.buffers)
        self.personalized: dict[str, dict] = {}  # site -> bounded personalized cell
        self.epsilon: dict[str, float] = {}  # site -> epsilon after the fine-tuning (DP sites)

    def _config(self, **extra) -> dict:
        s = self.fed.settings
        return {**self.fed._base_config(), **extra, "stage-plan": _stage_plan(self.fed), "local-epochs": int(s.local_epochs),
                "eval-steps": int(s.eval_steps), "eval-gamma": False, LAYOUT_KEY: layout_to_json(self.layout)}

    def _messages(self, nodes, message_type: str, wire: dict) -> list:
        from flwr.app import ConfigRecord, Message, RecordDict

        config = self._config()
        return [Message(content=RecordDict({ARRAYS_KEY: to_record(wire), CONFIG_KEY: ConfigRecord(config)}),
                        dst_node_id=int(n), message_type=message_type) for n in nodes]

    # -- 1. at each site -------------------------------------------------------------------
    def run(self, rows: list[dict]) -> list[dict]:
        fed = self.fed
        s = fed.settings
        sites = [str(r["site"]) for r in rows if str(r.get("status", "ok")).startswith("ok")]
        matrix = Matrix(sites=sites)
        matrix.add_row(ModelRow("global", "global", None, True))
        for r in rows:
            if r["site"] in sites:
                matrix.put("global", r["site"], cell_of(r, int(r.get("cases", 0))))
        log.info("after the last round: %s at every site ...", " and ".join(
            (["personalization (%d epoch(s))" % fed.personalize_epochs] if fed.personalize_epochs > 0 else [])
            + (["the local model for the cross-site matrix"] if fed.cross_site else [])))
        msgs = self._messages(fed.grid.get_node_ids(), f"train.{ADAPT_ACTION}", self.wire)
        replies = fed._send_and_receive(msgs)
        sent = sent_to(msgs)
        shared: dict[str, tuple[int, dict]] = {}  # model name -> (owner node, arrays)
        for who in fed.sites.identify(replies, sent, {m.metadata.dst_node_id for m in msgs}):
            shared.update(self._read_reply(who, matrix, s.max_num_examples))
        for row in fed.sites.unanswered(msgs, replies, sent, {"round": s.num_rounds}, s.round_timeout):
            for model in MODELS:
                self._add(matrix, row["site"], model, False, f"failed: {row['reason']}")
        if fed.cross_site:
            self._evaluate_elsewhere(shared, matrix)
            matrix.notes = self._matrix_notes(matrix)
            paths = matrix.write(fed.folder.path)
            log.info("cross-site matrix: %s", ", ".join(p.name for p in paths))
        return self._table(rows)

    def _read_reply(self, who, matrix: Matrix, max_cases: int) -> dict[str, tuple[int, dict]]:
        """A site's adapt reply: its rows and home cells in ``matrix``; returns its shared models."""
        site, r = who.site, who.reply
        why = who.unusable()
        if why is not None:
            log.warning("after the last round: %s: %s", site, why)
            for model in MODELS:
                self._add(matrix, site, model, False, f"failed: {why}")
            return {}
        info = r.content.config_records.get(SITE_KEY, {})
        metrics = dict(r.content[METRICS_KEY])
        is_shared = info.get("shared", False) is True
        out = {}
        for model in MODELS:
            status = str(info.get(model, "off"))
            status = status if status in MODEL_STATUSES else "invalid status"
            name = f"{site} {model}"
            if status != "done":
                self._add(matrix, site, model, False, {"off": "not trained (not asked, or the site's choice)",
                                                       "refused": "refused (privacy budget)"}.get(status, status))
                continue
            cell, bad = prefixed_cell(metrics, model, max_cases)
            if bad is not None:
                self._add(matrix, site, model, False, f"rejected: {bad}")
                continue
            arrays = self._shared_arrays(r, model, site) if is_shared else None
            self._add(matrix, site, model, arrays is not None, "ok")
            matrix.put(name, site, cell)
            if model == "personalized":
                self.personalized[site] = cell
            if arrays is not None:
                out[name] = (who.node, arrays)
        eps = bounded_epsilon(metrics.get("epsilon"))
        if metrics.get("dp_enabled") == 1.0 and eps is not None:
            self.epsilon[site] = eps
        return out

    def _add(self, matrix: Matrix, site: str, model: str, shared: bool, status: str) -> None:
        if model == "local" and not self.fed.cross_site:
            return
        if model == "personalized" and self.fed.personalize_epochs <= 0:
            return
        matrix.add_row(ModelRow(f"{site} {model}", model, site, shared, status))

    def _shared_arrays(self, reply, model: str, site: str) -> dict | None:
        """A shared model's weights if they fit the global model exactly (names, shapes, dtypes, finite)."""
        key = arrays_key(model)
        if key not in reply.content.array_records:
            return None
        try:
            got = decode(from_record(reply.content[key]), self.layout)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("%s %s: shared weights unusable (%s): evaluated at home only", site, model, type(e).__name__)
            return None
        reason = check_arrays(got, spec_of(self.fed.arrays))
        if reason:
            log.warning("%s %s: shared weights do not fit the model (%s): evaluated at home only", site, model, reason)
        return None if reason else got

    # -- 2. shared models at the other sites -----------------------------------------------
    def _evaluate_elsewhere(self, shared: dict[str, tuple[int, dict]], matrix: Matrix) -> None:
        """One ``evaluate.cross`` message per site with every shared model but its own (in a
        deployment each message costs a site a ClientApp process)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        fed = self.fed
        packed = {name: encode(arrays, fed.groups, fed.buffers, order=self.layout)[0]
                  for name, (_, arrays) in shared.items()}
        msgs, names = [], {}
        for node in fed.grid.get_node_ids():
            mine = [n for n, (owner, _) in shared.items() if owner != int(node)]
            if not mine:
                continue
            content = RecordDict({CONFIG_KEY: ConfigRecord(self._config(models=len(mine)))})
            for i, name in enumerate(mine):
                content[shared_key(i)] = to_record(packed[name])
            msgs.append(Message(content=content, dst_node_id=int(node), message_type=f"evaluate.{CROSS_ACTION}"))
            names[int(node)] = mine
        if not msgs:
            return
        log.info("cross-site: %d shared model(s) at the other sites ...", len(shared))
        replies = fed._send_and_receive(msgs)
        sent = sent_to(msgs)
        for who in fed.sites.identify(replies, sent, set(names)):
            why = who.unusable()
            if why is not None:
                log.warning("cross-site: %s: %s", who.site, why)
                continue
            if who.site not in matrix.sites:
                continue
            m = dict(who.reply.content[METRICS_KEY])
            for i, name in enumerate(names.get(who.node, [])):
                cell, bad = prefixed_cell(m, shared_key(i), self.fed.settings.max_num_examples)
                if bad is None:
                    matrix.put(name, who.site, cell)
                else:
                    log.warning("cross-site: %s at %s: %s", name, who.site, bad)

    def _matrix_notes(self, matrix: Matrix) -> list[str]:
        home = [r.model for r in matrix.rows if r.kind != "global" and not r.shared and r.status == "ok"]
        notes = [f"global: the final global model of {self.fed.settings.num_rounds} round(s), the final "
                 "evaluation's numbers; local: each site trained alone from the same initial model with its "
                 "federation budget (rounds x local epochs per stage); personalized: the global model fine-tuned "
                 f"{self.fed.personalize_epochs} epoch(s) per stage at the site."]
        if home:
            notes.append("evaluated at home only (the site file does not share the model): " + ", ".join(home))
        return notes

    # -- 3. the final table ----------------------------------------------------------------
    def _table(self, rows: list[dict]) -> list[dict]:
        """The final rows with each site's personalized numbers beside the global ones, rewritten."""
        fed = self.fed
        if fed.personalize_epochs <= 0:
            return rows
        out = []
        for r in rows:
            r = dict(r)
            cell = self.personalized.get(str(r["site"]))
            for k, _ in MATRIX_METRICS:
                r[PERSONALIZED_PREFIX + k] = cell.get(k) if cell else None
            if str(r["site"]) in self.epsilon:
                r["epsilon_after_personalization"] = self.epsilon[str(r["site"])]
            out.append(r)
        done = len(self.personalized)
        self.notes = [f"personalized: the final global model fine-tuned {fed.personalize_epochs} epoch(s) per stage "
                      f"({fed.settings.raw.get('personalize-stages', 'both')}) on each site's own training cases "
                      f"({done} of {len(rows)} site(s); kept at the site as personalized.pt, never sent); "
                      "personalized_* columns: its held-out metrics beside the global model's"]
        if self.epsilon:
            self.notes.append("DP sites fine-tune from the same privacy budget: epsilon_after_personalization is "
                              "their accountant's total after it")
        write_tables(fed.folder.path, out, planned=expected_sites(out, fed.settings), notes=fed.final_notes(out))
        return out


def prefixed_cell(metrics: dict, prefix: str, max_cases: int) -> tuple[dict | None, str | None]:
    """The matrix cell of the metrics a reply sent under ``prefix.`` (its ``prefix.num-cases``
    bounded by ``max_cases``): (cell, None), or (None, why the count is refused)."""
    key = prefixed_key(prefix, NUM_CASES)
    bad = check_count(metrics.get(key), max_cases, minimum=0, key=key)
    if bad is not None:
        return None, bad
    return cell_of({k: metrics.get(prefixed_key(prefix, k)) for k, _ in MATRIX_METRICS}, int(metrics[key])), None


def bounded_epsilon(v) -> float | None:
    """A reported epsilon if it is a finite number >= 0 (shown, never used to decide anything)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) and 0 <= float(v) < 1e6 else None


def _stage_plan(fed: Federation) -> str:
    from addiff_core.round_plan import format_stage_plan

    return format_stage_plan(fed.stage_plan())


__all__ = ["CrossSiteFederation", "bounded", "PERSONALIZED_PREFIX"]
