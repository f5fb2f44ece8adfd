"""The server side of a federated run: rounds, checkpoints, metrics, final per-site evaluation.

The loop calls the strategy's own ``configure_train`` / ``aggregate_train`` /
``configure_evaluate`` each round (instead of ``Strategy.start``) because a round needs more
than ``start`` offers: a stage schedule (VAE rounds, then diffusion rounds with the VAE frozen),
only the current stage's weights on the wire, a checkpoint and metrics after every round,
resume, and a per-site table at the end.

Run folder::

    run.json                   planned run (resolved run config, model config, schedule), status
    checkpoints/round_0001.pt  global model after round 1 (+ .sha256); meta: round, stage,
                               strategy name and state (FedAdam moments), run config
    metrics.jsonl              one JSON object per line: kind "train" (per site and round),
                               "round" (aggregate, bytes on the wire), "error", "final" (per site)
    final_metrics.csv/.md/.json  held-out metrics of the final global model, one row per site
    final_model.pt             the final global model (same format as a round checkpoint)
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from addiff_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from addiff_core.config import ConfigError
from addiff_core.fl_task import initial_arrays

from .protocol import (
    ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, METRICS_KEY, NUM_EXAMPLES, SITE_KEY, STATUS_FAILED, STATUS_NEED_VAE, STATUS_REFUSED,
    decode, describe_failure, encode,
    fingerprint, from_record, layout_from_json, layout_to_json, model_config_to_json, record_nbytes, to_record,
)
from .settings import Round, RunSettings, settings_for_resume
from .strategies import build_strategy, ordered, site_of
from .validation import check_reply, norm_outliers, spec_of, update_norm

log = logging.getLogger("flwr.addiff")  # a child of Flower's logger: shows up in `flwr run --stream`


class FederationError(RuntimeError):
    """The run cannot go on (e.g. a round failed on every attempt)."""


class RoundFailed(FederationError):
    """One attempt at a round got too few usable replies (it may be retried)."""


# ------------------------------------------------------------------------------------------
# run folder
# ------------------------------------------------------------------------------------------
class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.run_json = self.path / "run.json"

    def checkpoint_path(self, rnd: int) -> Path:
        return self.checkpoints / f"round_{rnd:04d}.pt"

    def rounds_on_disk(self) -> list[int]:
        out = []
        for p in self.checkpoints.glob("round_*.pt"):
            try:
                out.append(int(p.stem.split("_")[1]))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def latest_valid(self) -> tuple[int, dict, Any, dict] | None:
        """(round, state_dict, model_cfg, meta) of the newest checkpoint that loads; corrupt
        ones (SHA-256 mismatch, truncated) are skipped with a warning."""
        for rnd in reversed(self.rounds_on_disk()):
            try:
                state, cfg, meta = load_checkpoint(self.checkpoint_path(rnd))
            except CheckpointError as e:
                log.warning("skipping checkpoint of round %d: %s", rnd, e)
                continue
            if int(meta.get("round", -1)) != rnd:
                log.warning("skipping %s: it says round %s", self.checkpoint_path(rnd), meta.get("round"))
                continue
            return rnd, state, cfg, meta
        return None

    def append_metrics(self, rows: list[dict]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(_jsonable(r)) + "\n")

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (a round that was not checkpointed is rerun)."""
        if not self.metrics.is_file():
            return
        keep = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a half-written last line
            if row.get("kind") != "final" and int(row.get("round", 0)) <= last_round:
                keep.append(line)
        from addiff_core.checkpoint import atomic_write_bytes

        atomic_write_bytes(self.metrics, ("\n".join(keep) + ("\n" if keep else "")).encode())

    def write_run_json(self, doc: dict) -> None:
        from addiff_core.checkpoint import atomic_write_bytes

        atomic_write_bytes(self.run_json, (json.dumps(_jsonable(doc), indent=2) + "\n").encode())

    def read_run_json(self) -> dict:
        from .settings import read_run_doc

        return read_run_doc(self.path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _failure_reason(reply, default: str) -> str:
    """Why a reply is unusable, in words the server chose: a site's own failure reply carries a
    code from a closed list (``protocol.describe_failure``); of an error reply made by Flower only
    its code is kept (its reason may hold an exception's text, which may name site paths)."""
    if reply.has_error():
        from flwr.common.constant import ErrorCode

        names = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
        name = names.get(reply.error.code, "UNKNOWN").lower().replace("_", " ")
        return f"Flower error {reply.error.code}: {name}"
    info = reply.content.config_records.get(SITE_KEY, {})
    if str(info.get("status", "")) == STATUS_FAILED:
        return describe_failure(info.get("code", ""), info.get("error", ""))
    return default


def _ranges(nums: list[int]) -> str:
    """[3, 4, 6] -> '3-4, 6'."""
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------
# the federation
# ------------------------------------------------------------------------------------------
class Federation:
    """Runs the planned rounds of ``settings`` over ``grid`` (Flower's Grid: simulation or SuperLink)."""

    def __init__(self, grid, settings: RunSettings, *, send_site_files: bool = False):
        self.grid = grid
        self.settings = settings_for_resume(settings) if settings.resume else settings
        # a simulation (Flower's InMemoryGrid) sends the site files resolved here: its ClientApps may run
        # in other folders (Ray workers, an app bundle) where relative paths would point elsewhere
        self.send_site_files = send_site_files or is_simulation(grid)
        s = self.settings
        self.rd = RunDir(s.run_dir)
        self.cfg = s.model
        self.model_json = model_config_to_json(self.cfg)
        init = initial_arrays(self.cfg, s.seed)
        self.dtypes = {k: v.dtype for k, v in init.items()}
        self.shapes = {k: v.shape for k, v in init.items()}
        self.arrays = init
        from addiff_core.models import build_model

        params = {n for n, _ in build_model(self.cfg).named_parameters()}
        self.buffers = frozenset(k for k in init if k not in params)  # travel unpacked (see protocol.encode)
        self.groups = list(dict.fromkeys(k.split(".", 1)[0] for k in init))  # vae, diffusion | unet
        self.strategy = build_strategy(s.strategy, min_sites=s.required_sites, proximal_mu=s.proximal_mu,
                                       fedadam=s.fedadam, buffer_keys=self.buffers, trim_beta=s.trim_beta,
                                       central_dp=s.central_dp)
        self.vae_sent = False  # the full VAE went to every site at least once by this server process
        self.site_names: dict[int, str] = {}  # node id -> site name, learnt from the sites' replies
        self.bytes: dict[str, list[int]] = {}
        self.round_seconds: dict[str, list[float]] = {}  # for the time estimate in the round log

    # -- helpers ------------------------------------------------------------------------------
    def _base_config(self) -> dict[str, Any]:
        c = {"model-config": self.model_json, "seed": int(self.settings.seed)}
        if self.send_site_files:
            c["site-files"] = ",".join(str(p) for p in self.settings.site_files)
        return c

    def _with_vae(self, msg, vae: tuple[dict, dict]):
        """The same train message plus the frozen global VAE ``vae`` = ``encode(arrays, ["vae"])``."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        wire, layout = vae
        arrays = ArrayRecord({**dict(msg.content[ARRAYS_KEY].items()), **dict(to_record(wire).items())})
        config = ConfigRecord(dict(msg.content[CONFIG_KEY].items()))
        config[LAYOUT_KEY] = layout_to_json({**layout_from_json(str(config[LAYOUT_KEY])), **layout})
        return Message(content=RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
                       dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

    def _checkpoint(self, rnd: Round, extra: dict) -> Path:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}
        sstate = self.strategy.state_dict()
        sstate_t = {k: ({kk: torch.from_numpy(np.ascontiguousarray(vv)) for kk, vv in v.items()}
                        if isinstance(v, dict) else v) for k, v in sstate.items()}
        meta = {"round": rnd.number, "stage": rnd.stage, "stage_round": rnd.stage_round,
                "num_rounds": self.settings.num_rounds, "strategy": self.settings.strategy,
                "strategy_state": sstate_t, "run_config": self.settings.to_json(), "created": _now(), **extra}
        return save_checkpoint(self.rd.checkpoint_path(rnd.number), state, self.cfg, meta)

    def stage_plan(self) -> dict[str, int]:
        plan: dict[str, int] = {}
        for r in self.settings.schedule:
            plan[r.stage] = r.stage_rounds
        return plan

    @staticmethod
    def _common_metrics(replies) -> None:
        """Flower aggregates MetricRecords only when every reply has the same keys; sites may
        differ (e.g. DP sites report epsilon). Keep the shared keys for aggregation (metrics.jsonl
        already holds every site's full set)."""
        from flwr.app import MetricRecord

        keys = [set(r.content[METRICS_KEY].keys()) for r in replies]
        common = set.intersection(*keys) if keys else set()
        for r, k in zip(replies, keys):
            if k != common:
                r.content[METRICS_KEY] = MetricRecord({kk: v for kk, v in r.content[METRICS_KEY].items()
                                                       if kk in common})

    # -- start / resume -----------------------------------------------------------------------
    def _prepare(self) -> int:
        s = self.settings
        if s.resume:
            found = self.rd.latest_valid()
            doc = self.rd.read_run_json()
            doc.setdefault("resumed", []).append(_now())
            doc["status"] = "running"
            if found is None:
                log.warning("resume %s: no valid checkpoint, starting from round 1", s.run_dir)
                self.rd.truncate_metrics(0)
                self.rd.write_run_json(doc)
                return 1
            rnd, state, cfg, meta = found
            if cfg != self.cfg:
                raise ConfigError(f"{self.rd.checkpoint_path(rnd)}: model config differs from the planned run")
            if meta.get("strategy") != s.strategy:
                raise ConfigError(f"{self.rd.checkpoint_path(rnd)}: strategy {meta.get('strategy')!r} differs "
                                  f"from the planned {s.strategy!r}")
            missing = set(self.arrays) - set(state)
            if missing:
                raise CheckpointError(f"{self.rd.checkpoint_path(rnd)}: lacks weights {sorted(missing)[:3]}")
            self.arrays = {k: state[k].numpy().astype(self.dtypes[k]) for k in self.arrays}
            sstate = {k: ({kk: vv.numpy() for kk, vv in v.items()} if isinstance(v, dict) else v)
                      for k, v in (meta.get("strategy_state") or {}).items()}
            self.strategy.load_state_dict(sstate)
            self.rd.truncate_metrics(rnd)
            self.rd.write_run_json(doc)
            log.info("resuming %s after round %d of %d (%s)", s.run_dir, rnd, s.num_rounds,
                     self.rd.checkpoint_path(rnd).name)
            return rnd + 1
        if self.rd.rounds_on_disk():
            raise ConfigError(f"{s.run_dir} already holds checkpoints: resume it (--resume {s.run_dir}) "
                              "or choose another run folder")
        self.rd.path.mkdir(parents=True, exist_ok=True)
        if self.rd.metrics.exists():
            self.rd.metrics.unlink()
        import flwr

        self.rd.write_run_json({
            "run_config": s.to_json(), "model": self.cfg.to_dict(), "created": _now(), "status": "running",
            "flwr": getattr(flwr, "__version__", "?"), "num_rounds": s.num_rounds,
            "schedule": [{"round": r.number, "stage": r.stage} for r in s.schedule],
            "sites_planned": [str(p) for p in s.site_files]})
        return 1

    # -- who a reply is about ------------------------------------------------------------------
    @staticmethod
    def _sent(msgs) -> dict[str, int]:
        """message id -> destination node of messages the Grid has pushed (it sets the ids)."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}

    @staticmethod
    def _node_of(reply, sent: dict[str, int]) -> int:
        """The SuperNode a reply is about. Error replies the SuperLink makes itself
        (NODE_UNAVAILABLE once a node missed its heartbeats, REPLY_MESSAGE_UNAVAILABLE) come from
        node 1 (SUPERLINK_NODE_ID): the message they answer says which node it went to."""
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _site_of(self, reply, node: int) -> str:
        site = site_of(reply)
        if reply.has_error() or site == f"node-{reply.metadata.src_node_id}":
            return self.site_names.get(node, f"node-{node}")
        self.site_names[node] = site
        return site

    def _unanswered(self, msgs, replies, sent: dict[str, int], base: dict, timeout: float) -> list[dict]:
        """Error rows for the nodes that got a message but sent nothing back within ``timeout``."""
        got = {self._node_of(r, sent) for r in replies}
        rows = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if node not in got:
                site = self.site_names.get(node, f"node-{node}")
                log.warning("round %s: %s (node %s) sent no reply within %.0f s", base["round"], site, node, timeout)
                rows.append({"kind": "error", **base, "site": site, "node_id": node,
                             "reason": f"no reply within the round timeout ({timeout:g} s)"})
        return rows

    def _absent(self, rows: list[dict], base: dict) -> list[dict]:
        """Rows for sites that took part before but got no message in this round (their
        SuperNode is not connected): they are left out too, and recorded as such."""
        present = {x["site"] for x in rows}
        out = []
        for name in sorted(set(self.site_names.values()) - present):
            log.warning("round %s: %s is not connected; left out", base["round"], name)
            out.append({"kind": "absent", **base, "site": name, "reason": "not connected (no message sent)"})
        return out

    # -- one training round -------------------------------------------------------------------
    def _screen_replies(self, replies, wire: dict, down: dict, base: dict, sent: dict[str, int]
                        ) -> tuple[list, list[dict], int]:
        """Sort the replies of a round: failed (error), refused (privacy budget), rejected
        (:mod:`server.validation`), or good. ``base``: round, stage, attempt of every row.
        Returns (good replies, metrics rows, number of sites that answered: good + rejected +
        refused)."""
        s = self.settings
        rnd = base["round"]
        spec = spec_of(wire)
        rows: list[dict] = []
        candidates: list[tuple[Any, dict]] = []
        answered = 0
        for r in ordered(replies):
            node = self._node_of(r, sent)
            site = self._site_of(r, node)
            status = "" if r.has_error() else str(r.content.config_records.get(SITE_KEY, {}).get("status", ""))
            if status == STATUS_REFUSED:
                answered += 1
                info = r.content.config_records[SITE_KEY]
                m = dict(r.content[METRICS_KEY]) if METRICS_KEY in r.content.metric_records else {}
                rows.append({"kind": "refused", **base, "site": site, "node_id": node,
                             "reason": str(info.get("reason", "")), **m})
                log.warning("round %d: %s refused to train: %s", rnd, site, info.get("reason", ""))
                continue
            if r.has_error() or ARRAYS_KEY not in r.content.array_records or METRICS_KEY not in r.content.metric_records:
                reason = _failure_reason(r, "reply without weights/metrics")
                log.warning("round %d: %s failed: %s", rnd, site, reason)
                rows.append({"kind": "error", **base, "site": site, "node_id": node, "reason": reason})
                continue
            answered += 1
            m = dict(r.content[METRICS_KEY])
            got = from_record(r.content[ARRAYS_KEY])
            row = {"kind": "train", **base, "site": site, "node_id": node, "num_examples": m.pop(NUM_EXAMPLES, None),
                   **m, "bytes_down": down.get(node, 0), "bytes_up": record_nbytes(r.content[ARRAYS_KEY])}
            reason = check_reply(got, row["num_examples"], spec, s.max_num_examples)
            if reason is None:
                row["update_norm"] = update_norm(got, wire)
                candidates.append((r, row))
            else:
                rows.append({**row, "kind": "rejected", "reason": reason})
                log.warning("round %d: rejected the update of %s: %s", rnd, site, reason)
        outliers = norm_outliers({str(i): row["update_norm"] for i, (_, row) in enumerate(candidates)},
                                 s.update_norm_multiple)
        good = []
        for i, (r, row) in enumerate(candidates):
            if str(i) in outliers:
                rows.append({**row, "kind": "rejected", "reason": outliers[str(i)]})
                log.warning("round %d: rejected the update of %s: %s", rnd, row["site"], outliers[str(i)])
                continue
            row["num_examples"] = int(row["num_examples"])
            rows.append(row)
            good.append(r)
        return good, rows, answered

    def train_round(self, rnd: Round, attempt: int = 0) -> dict:
        from flwr.app import ConfigRecord

        s = self.settings
        t0 = time.perf_counter()
        prefix = rnd.stage + "."
        stage_arrays = {k: v for k, v in self.arrays.items() if k.startswith(prefix)}
        plan = ",".join(f"{st}:{n}" for st, n in self.stage_plan().items())
        config = {**self._base_config(), "stage": rnd.stage, "stage-round": rnd.stage_round,
                  "stage-rounds": rnd.stage_rounds, "stage-plan": plan, "local-epochs": int(s.local_epochs)}
        if rnd.stage == "diffusion":
            config["vae-fingerprint"] = fingerprint(self.arrays, "vae.")
        wire, layout = encode(stage_arrays, [rnd.stage], self.buffers)
        config[LAYOUT_KEY] = layout_to_json(layout)
        msgs = list(self.strategy.configure_train(rnd.number, to_record(wire), ConfigRecord(config), self.grid))
        if not msgs:
            raise FederationError(f"round {rnd.number}: no site to train")
        send_vae = rnd.stage == "diffusion" and not self.vae_sent
        vae = encode(self.arrays, ["vae"], self.buffers) if send_vae else None  # encoded once per round
        if send_vae:
            msgs = [self._with_vae(m, vae) for m in msgs]
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        down = {m.metadata.dst_node_id: record_nbytes(m.content[ARRAYS_KEY]) for m in msgs}
        replies = list(self.grid.send_and_receive(msgs, timeout=s.round_timeout))
        sent = self._sent(msgs)
        base = {"round": rnd.number, "stage": rnd.stage, "attempt": attempt}
        missing = self._unanswered(msgs, replies, sent, base, s.round_timeout)

        # sites that lack (or hold a different) global VAE get the round again, with it
        need = [r for r in replies if not r.has_error() and r.content.config_records.get(SITE_KEY, {}).get(
            "status") == STATUS_NEED_VAE]
        if need:
            log.info("round %d: sending the global VAE to %s", rnd.number, ", ".join(site_of(r) for r in need))
            vae = vae or encode(self.arrays, ["vae"], self.buffers)
            again = [self._with_vae(by_node[r.metadata.src_node_id], vae) for r in need]
            for m in again:
                down[m.metadata.dst_node_id] += record_nbytes(m.content[ARRAYS_KEY])
            need_ids = {r.metadata.src_node_id for r in need}
            replies = [r for r in replies if r.metadata.src_node_id not in need_ids]
            again_replies = list(self.grid.send_and_receive(again, timeout=s.round_timeout))
            sent.update(self._sent(again))
            missing += self._unanswered(again, again_replies, sent, base, s.round_timeout)
            replies += again_replies
        if rnd.stage == "diffusion":
            self.vae_sent = True

        good, rows, answered = self._screen_replies(replies, wire, down, base, sent)
        rows += missing
        rows += self._absent(rows, base)
        if answered < s.required_sites or not good:
            for row in rows:  # nothing of this attempt is aggregated
                if row["kind"] == "train":
                    row["kind"] = "discarded"
            self.rd.append_metrics(rows)
            why = "; ".join(f"{x['site']} {x['kind']}: {x.get('reason', 'too few replies')}" for x in rows
                            if x["kind"] != "discarded") or "no replies"
            raise RoundFailed(f"round {rnd.number} ({rnd.stage}): {len(good)} usable update(s), {answered} of "
                              f"{len(msgs)} site(s) answered (min-sites {s.required_sites}); {why}")
        self._common_metrics(good)
        agg, agg_metrics = self.strategy.aggregate_train(rnd.number, good)
        if agg is None:
            raise FederationError(f"round {rnd.number}: aggregation failed")
        new = decode(from_record(agg), layout)
        unexpected = set(new) - set(stage_arrays)
        if unexpected:
            raise FederationError(f"round {rnd.number}: sites returned weights outside stage {rnd.stage}: "
                                  f"{sorted(unexpected)[:3]}")
        for k, v in new.items():
            v = np.asarray(v).astype(self.dtypes[k], copy=False)
            if v.shape != self.shapes[k]:
                if v.size != int(np.prod(self.shapes[k], dtype=np.int64)):
                    raise FederationError(f"round {rnd.number}: {k} has shape {v.shape}, the model {self.shapes[k]}")
                v = v.reshape(self.shapes[k])  # Flower returns 0-d arrays as shape (1,)
            self.arrays[k] = v
        seconds = time.perf_counter() - t0
        summary = {"kind": "round", "round": rnd.number, "stage": rnd.stage, "strategy": s.strategy,
                   "sites": [site_of(r) for r in good],
                   "num_examples": int(sum(x["num_examples"] for x in rows if x["kind"] == "train")),
                   "left_out": {x["site"]: x["kind"] for x in rows if x["kind"] != "train"},
                   "epsilon": {x["site"]: x["epsilon"] for x in rows if x.get("epsilon") is not None},
                   **{k: v for k, v in dict(agg_metrics or {}).items()},
                   "bytes_down": int(sum(down.values())), "bytes_up": int(sum(x.get("bytes_up", 0) for x in rows)), "attempt": attempt,
                   "vae_sent": bool(send_vae or need), "seconds": seconds}
        self.bytes.setdefault(rnd.stage, []).append(summary["bytes_down"] + summary["bytes_up"])
        self.rd.append_metrics(rows + [summary])
        path = self._checkpoint(rnd, {"sites": summary["sites"]})
        self.round_seconds.setdefault(rnd.stage, []).append(seconds)
        log.info("round %d/%d (%s %d/%d): %d site(s), loss %.4g, %.1f s, %.2f MB down / %.2f MB up -> %s%s",
                 rnd.number, s.num_rounds, rnd.stage, rnd.stage_round, rnd.stage_rounds, len(good),
                 float(summary.get("train_loss", float("nan"))), seconds, summary["bytes_down"] / 1e6,
                 summary["bytes_up"] / 1e6, path.name, self._eta(rnd))
        return summary

    def _eta(self, rnd: Round) -> str:
        """'; about 3 min left' from the mean round time of each stage so far (a stage not yet
        seen counts like the current one)."""
        left = [r for r in self.settings.schedule if r.number > rnd.number]
        if not left:
            return ""
        mean = {st: sum(v) / len(v) for st, v in self.round_seconds.items()}
        secs = sum(mean.get(r.stage, mean[rnd.stage]) for r in left)
        return f"; {len(left)} round(s) left, about " + (f"{secs:.0f} s" if secs < 90 else f"{secs / 60:.1f} min")

    # -- final evaluation ---------------------------------------------------------------------
    def final_evaluation(self) -> list[dict]:
        from flwr.app import ConfigRecord

        s = self.settings
        wire, layout = encode(self.arrays, self.groups, self.buffers)
        config = {**self._base_config(), "eval-steps": int(s.eval_steps), "eval-gamma": bool(s.eval_gamma),
                  LAYOUT_KEY: layout_to_json(layout)}
        msgs = list(self.strategy.configure_evaluate(s.num_rounds, to_record(wire), ConfigRecord(config), self.grid))
        replies = list(self.grid.send_and_receive(msgs, timeout=s.round_timeout))
        sent = self._sent(msgs)
        rows, errors = [], []
        for r in ordered(replies):
            node = self._node_of(r, sent)
            site = self._site_of(r, node)
            if r.has_error() or METRICS_KEY not in r.content.metric_records:
                reason = _failure_reason(r, "reply without metrics")
                errors.append({"kind": "error", "round": s.num_rounds, "stage": "final", "site": site,
                               "node_id": node, "reason": reason})
                log.warning("final evaluation: %s failed: %s", site, reason)
                continue
            m = dict(r.content[METRICS_KEY])
            rows.append({"site": site, "cases": int(m.pop(NUM_EXAMPLES, 0)), **m})
        errors += self._unanswered(msgs, replies, sent, {"round": s.num_rounds, "stage": "final"}, s.round_timeout)
        rows = self._with_status(rows, errors)
        self.rd.append_metrics(errors + [{"kind": "final", "round": s.num_rounds, **row} for row in rows])
        write_tables(self.rd.path, rows, planned=self._expected_sites(rows), notes=self.final_notes(rows))
        return rows

    def _planned_names(self) -> list[str]:
        """Names of the planned sites where the server can know them: in a simulation, from the
        site files (the ``name`` field; the file name if unreadable). A deployment plans no
        names (``site-files`` is empty): its sites are known from their replies."""
        from addiff_core.config import load_yaml

        names = []
        for f in self.settings.site_files:
            try:
                doc = load_yaml(f)
                name = str(doc.get("name")) if isinstance(doc, dict) and doc.get("name") else f.stem
            except Exception:  # noqa: BLE001 - a name is all we want here
                name = f.stem
            names.append(name)
        return names

    def _expected_sites(self, rows: list[dict]) -> int:
        return max(len(rows), len(self.settings.site_files), self.settings.wait_sites, self.settings.required_sites)

    def _with_status(self, rows: list[dict], errors: list[dict]) -> list[dict]:
        """One row per site that is planned or ever took part, each with its ``status``: "ok",
        "no reply", "final evaluation failed: ..." and the rounds it was left out of."""
        s = self.settings
        history = [r for r in _read_rows(self.rd.metrics) if r.get("kind") != "final"]
        planned = self._planned_names()
        seen = [str(r["site"]) for r in history if r.get("site")] + [str(e["site"]) for e in errors]
        names = list(dict.fromkeys(planned + [r["site"] for r in rows]
                                   + [x for x in seen if not (planned and x.startswith("node-"))]))
        # a node known only by its id (a deployment: it failed before any reply named it) gets a
        # row only while the named sites fall short of the expected number: a SuperNode that was
        # restarted under a new node id has replied by its name, and its old id is not a site
        named = [x for x in names if not x.startswith("node-")]
        room = max(0, self._expected_sites(rows) - len(named))
        names = named + [x for x in names if x.startswith("node-")][:room]
        trained: dict[str, set[int]] = {}
        for r in history:
            if r.get("kind") == "train":
                trained.setdefault(str(r["site"]), set()).add(int(r["round"]))
        failed = {str(e["site"]): str(e.get("reason", "")) for e in errors}
        by_site = {r["site"]: r for r in rows}
        out = []
        for name in names:
            missed = [n for n in range(1, s.num_rounds + 1) if n not in trained.get(name, set())]
            if name in by_site:
                status = "ok"
            elif name in failed:
                status = "final evaluation " + failed[name].replace("site failed", "failed")
            else:
                status = "no reply"
            if not trained.get(name):
                status += "; trained in no round"
            elif missed:
                status += f"; left out in round{'s' if len(missed) > 1 else ''} {_ranges(missed)}"
            row = dict(by_site.get(name, {"site": name, "cases": 0}))
            row["status"] = status
            out.append(row)
        return out

    # -- everything ---------------------------------------------------------------------------
    def _round_with_retries(self, rnd: Round) -> dict:
        s = self.settings
        for attempt in range(s.round_retries + 1):
            try:
                return self.train_round(rnd, attempt)
            except RoundFailed as e:
                if attempt < s.round_retries:
                    log.warning("%s -- trying the round again (%d of %d retries)", e, attempt + 1, s.round_retries)
                    continue
                last = self.rd.rounds_on_disk()
                keep = (f"the last good checkpoint is {self.rd.checkpoint_path(last[-1])}; continue with --resume "
                        f"{s.run_dir} once enough sites are back") if last else "no round had completed"
                msg = f"{e}. Gave up after {s.round_retries + 1} attempt(s); {keep}"
                doc = self.rd.read_run_json()
                doc.update({"status": "failed", "error": msg, "finished": _now()})
                self.rd.write_run_json(doc)
                log.error(msg)
                raise FederationError(msg) from None
        raise AssertionError("unreachable")

    def _check_simulation_size(self) -> None:
        """In a simulation every SuperNode exists from the start (Flower registers them all at
        once), so fewer than the run needs would make Flower's strategies wait for ever (a plain
        ``flwr run .`` starts 2): stop at once with what to do instead."""
        if not is_simulation(self.grid):
            return
        need = max(self.settings.required_sites, self.settings.wait_sites)
        deadline, n = time.monotonic() + 60.0, 0
        while time.monotonic() < deadline:
            n = len(list(self.grid.get_node_ids()))
            if n >= need:
                return
            if n > 0:  # registered in one go: give it a moment, then it is final
                time.sleep(2.0)
                n = len(list(self.grid.get_node_ids()))
                break
            time.sleep(0.2)
        if n >= need:
            return
        files = len(self.settings.site_files)
        msg = (f"this simulation has {n} SuperNode(s) but the run needs {need} (min-sites {self.settings.required_sites}"
               + (f"; {files} site file(s)" if files else "") + "): Flower would wait for ever. Run it with one "
               f"simulated SuperNode per site file: flwr run . --stream --federation-config \"num-supernodes={files or need}\""
               " (or `addiff simulate`)")
        doc = self.rd.read_run_json()
        doc.update({"status": "failed", "error": msg, "finished": _now()})
        self.rd.write_run_json(doc)
        log.error(msg)
        raise FederationError(msg)

    def _log_what_runs(self) -> None:
        from addiff_core.run_summary import run_lines

        s = self.settings
        log.info("run folder %s (relative paths resolve against %s)", s.run_dir, _root_or_env())
        for line in run_lines(s.to_json(), n_sites=len(s.site_files) or s.required_sites):
            (log.warning if line.startswith("WARNING") else log.info)("%s", line)

    def final_notes(self, rows: list[dict]) -> list[str]:
        """What ran (aggregation, central DP with its epsilon, per-site DP) and warnings (a robust
        strategy that trimmed nothing; a site where the model is worse than predicting 0 Gy)."""
        from addiff_core.run_summary import privacy_of_rows, run_lines, worse_than_zero_dose

        s = self.settings
        rc = s.to_json()
        eps = self.strategy.epsilon() if hasattr(self.strategy, "epsilon") else None
        lines = run_lines(rc, n_sites=len(rows) or None, central_epsilon=eps, rounds=s.num_rounds,
                          privacy=privacy_of_rows(rows))
        return lines + worse_than_zero_dose(rows, rc)

    def _wait_for_sites(self) -> None:
        """Before the first round: wait (up to ``round-timeout``) until ``wait-sites`` SuperNodes
        are connected, so that the run starts with everyone expected even if it may later go on
        with fewer (``min-sites``)."""
        s = self.settings
        want = s.wait_sites
        if want <= s.required_sites:
            return  # Flower's strategies wait for min-sites themselves
        t0, last = time.monotonic(), -1
        while (n := len(list(self.grid.get_node_ids()))) < want:
            if n != last:
                log.info("waiting for sites: %d of %d connected (wait-sites)", n, want)
                last = n
            if time.monotonic() - t0 > s.round_timeout:
                log.warning("only %d of %d sites connected after %.0f s; starting with them", n, want, s.round_timeout)
                return
            time.sleep(1.0)

    def run(self) -> dict:
        s = self.settings
        start = self._prepare()
        self._check_simulation_size()
        self._log_what_runs()
        self._wait_for_sites()
        t0 = time.perf_counter()
        for rnd in s.schedule[start - 1:]:
            if s.stop_after_round and rnd.number > s.stop_after_round:
                log.info("stopping after round %d as asked (stop-after-round); resume with --resume %s",
                         s.stop_after_round, s.run_dir)
                doc = self.rd.read_run_json()
                doc["status"] = f"stopped after round {s.stop_after_round}"
                self.rd.write_run_json(doc)
                return {"status": "stopped", "run_dir": str(s.run_dir)}
            self._round_with_retries(rnd)
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}
        save_checkpoint(self.rd.path / "final_model.pt", state, self.cfg,
                        {"round": s.num_rounds, "stage": "final", "strategy": s.strategy,
                         "run_config": s.to_json(), "created": _now()})
        log.info("final evaluation of the global model on every site's held-out cases ...")
        rows = self.final_evaluation()
        table = markdown_table(rows, self._expected_sites(rows))
        notes = self.final_notes(rows)
        doc = self.rd.read_run_json()
        doc.update({"status": "complete", "finished": _now(), "train_seconds_this_process": time.perf_counter() - t0,
                    "sites_evaluated": [r["site"] for r in rows if str(r.get("status", "ok")).startswith("ok")],
                    "warnings": [n[len("WARNING: "):] for n in notes if n.startswith("WARNING: ")]})
        self.rd.write_run_json(doc)
        for n in notes:
            if n.startswith("WARNING: "):
                log.warning("%s", n[len("WARNING: "):])
        print(f"\nFinal global model, held-out metrics per site ({s.run_dir / 'final_metrics.md'}):\n"
              + "".join(f"{n}\n" for n in notes) + f"\n{table}\n",
              flush=True)
        from addiff_core.report import write_report_safely

        log.info("writing the run report ...")
        report = write_report_safely(s.run_dir)  # figures of the sites whose files this machine can read
        if report is not None:
            print(f"run report: {report}", flush=True)
        return {"status": "complete", "run_dir": str(s.run_dir), "final": rows,
                "report": str(report) if report else None}


def is_simulation(grid) -> bool:
    """True for Flower's simulation runtime (``run_simulation`` or a ``--simulation`` SuperLink)."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # pragma: no cover - another Flower layout
        return False
    return isinstance(grid, InMemoryGrid)


def _root_or_env() -> str:
    from .protocol import project_root

    try:
        return str(project_root())
    except ConfigError as e:
        return f"(unknown: {e})"


# ------------------------------------------------------------------------------------------
# per-site table
# ------------------------------------------------------------------------------------------
def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = ["site", "cases"]
    for r in rows:
        cols += [k for k in r if k not in cols and k != "status"]
    return cols + (["status"] if any("status" in r for r in rows) else [])


def with_overall(rows: list[dict], planned: int | None = None) -> list[dict]:
    """Rows plus an 'all sites' row: the case-weighted mean of each metric (NaN-aware), except the
    DVH score, weighted by each site's ``dvh_cells`` (one mean over every DVH cell, as OpenKBP), and
    ``dvh_cells``, summed (``addiff_core.metrics.combine_site_means``). Only sites that returned
    metrics count; the row's name says how many of the ``planned`` sites that is."""
    from addiff_core.metrics import combine_site_means

    covered = [r for r in rows if r.get("cases", 0) > 0 and str(r.get("status", "ok")).startswith("ok")]
    total = max(planned or 0, len(rows))
    if total < 2 and len(covered) == total:
        return list(rows)
    out = {"site": f"all sites (case-weighted, {len(covered)} of {total} sites)",
           "cases": int(sum(r.get("cases", 0) for r in covered))}
    out.update(combine_site_means(covered, [c for c in _columns(rows)[2:] if c != "status"]))
    return list(rows) + [out]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], planned: int | None = None) -> str:
    rows = with_overall(rows, planned)
    if not rows:
        return "(no site returned metrics)"
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_tables(run_dir: Path, rows: list[dict], planned: int | None = None, notes: list[str] = ()) -> None:
    from addiff_core.checkpoint import atomic_write_bytes

    full = with_overall(rows, planned)
    cols = _columns(full) if full else ["site", "cases"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in full:
        w.writerow({c: ("" if isinstance(r.get(c), float) and not math.isfinite(r[c]) else r.get(c, "")) for c in cols})
    atomic_write_bytes(run_dir / "final_metrics.csv", buf.getvalue().encode())
    md = ("# Final global model: held-out metrics per site\n\n"
          "Each site evaluated the final global model on its own held-out cases and returned numbers only.\n\n"
          + "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")
          + markdown_table(rows, planned) + "\n")
    atomic_write_bytes(run_dir / "final_metrics.md", md.encode())
    atomic_write_bytes(run_dir / "final_metrics.json", (json.dumps(_jsonable(rows), indent=2) + "\n").encode())
