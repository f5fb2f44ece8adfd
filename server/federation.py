"""The server side of a federated run: the round loop over the stage schedule, with retries, and
the final evaluation.

The loop calls the strategy's own ``configure_train`` / ``aggregate_train`` /
``configure_evaluate`` each round (instead of ``Strategy.start``) because a round needs more
than ``start`` offers: a stage schedule (VAE rounds, then diffusion rounds with the VAE frozen),
only the current stage's weights on the wire, a checkpoint and metrics after every round,
resume, and a per-site table at the end.

The rest lives next to it: :mod:`server.replies` (who a reply is about, screening the replies),
:mod:`server.global_model` (start, checkpoints, final model, resume), :mod:`server.final_table`
(the per-site table and its statuses), :mod:`server.connect` (SuperNodes before the first
round). The run folder's layout belongs to :mod:`addiff_core.run_folder`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from addiff_core.config import ConfigError
from addiff_core.round_plan import format_stage_plan
from addiff_core.run_folder import RunFolder, timestamp
from addiff_core.wire import (ARRAYS_KEY, CONFIG_KEY, LAYOUT_KEY, SITE_KEY, STATUS_NEED_VAE, as_received, decode,
                              encode, fingerprint, layout_from_json, layout_to_json, model_config_to_json)

from client.records import from_record, record_nbytes, to_record

from . import flower_compat, global_model, secure_round
from .connect import is_simulation, simulation_too_small, wait_for_sites
from .final_table import expected_sites, final_notes, terminal_table, with_status, write_tables
from .replies import Sites, common_metrics, sent_to
from .settings import Round, RunSettings, settings_for_resume
from .strategies import build_strategy, site_of

log = logging.getLogger("flwr.addiff")  # a child of Flower's logger: shows up in `flwr run --stream`


class FederationError(RuntimeError):
    """The run cannot go on (e.g. a round failed on every attempt)."""


class RoundFailed(FederationError):
    """One attempt at a round got too few usable replies (it may be retried)."""


@dataclass
class _Outgoing:
    """The train messages of one round attempt and what the server needs to read their replies."""

    msgs: list
    wire: dict[str, np.ndarray]  # the stage's weights as sent (packed)
    layout: dict[str, list]
    stage_arrays: dict[str, np.ndarray]
    vae: tuple | None  # the global VAE, encoded, when it was sent
    down: dict[int, int] = field(default_factory=dict)  # bytes sent per node


class StopSignal(threading.Event):
    """Set by the process running an in-process simulation when the ServerApp must stop waiting
    for replies; ``why`` is recorded in run.json."""

    def __init__(self) -> None:
        super().__init__()
        self.why = "the simulation engine stopped (its error is logged above): no site can answer"

    def stop(self, why: str | None = None) -> None:
        if not self.is_set():
            self.why = why or self.why
        self.set()


class Federation:
    """Runs the planned rounds of ``settings`` over ``grid`` (Flower's Grid: simulation or SuperLink)."""

    def __init__(self, grid, settings: RunSettings, *, send_site_files: bool = False,
                 stop: StopSignal | None = None):
        from addiff_core.site_task import initial_model_state

        self.grid = grid
        self.stop = stop  # in-process simulation: set when Flower's engine ended or on Ctrl-C (see _send_and_receive)
        self.settings = settings_for_resume(settings) if settings.resume else settings
        # a simulation (Flower's InMemoryGrid) sends the site files resolved here: its ClientApps may run
        # in other folders (Ray workers, an app bundle) where relative paths would point elsewhere
        self.send_site_files = send_site_files or is_simulation(grid)
        s = self.settings
        self.folder = RunFolder(s.run_dir)
        self.cfg = s.model
        self.model_json = model_config_to_json(self.cfg)
        init, params = initial_model_state(self.cfg, s.seed)
        self.dtypes = {k: v.dtype for k, v in init.items()}
        self.shapes = {k: v.shape for k, v in init.items()}
        self.arrays = init
        self.buffers = frozenset(k for k in init if k not in params)  # travel unpacked (see wire.encode)
        self.groups = list(dict.fromkeys(k.split(".", 1)[0] for k in init))  # vae, diffusion | unet
        self.strategy = build_strategy(s.strategy, min_sites=s.required_sites, proximal_mu=s.proximal_mu,
                                       fedadam=s.fedadam, buffer_keys=self.buffers, trim_beta=s.trim_beta,
                                       central_dp=s.central_dp)
        self.vae_sent = False  # the full VAE went to every site at least once by this server process
        self.vae_nodes: set[int] = set()  # secure aggregation: nodes that got the VAE from this server process
        self.sites = Sites()  # node id -> site name, learnt from the sites' replies
        self.round_seconds: dict[str, list[float]] = {}  # for the time estimate in the round log
        self.run_tag = ""  # set once run.json exists (run): the sites keep each run's optimiser states apart

    # -- messages -------------------------------------------------------------------------------
    def _base_config(self) -> dict[str, Any]:
        c = {"model-config": self.model_json, "seed": int(self.settings.seed), "wire-dtype": self.settings.wire_dtype,
             "run-tag": self.run_tag}
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

    def _send_and_receive(self, msgs: list) -> list:
        """``grid.send_and_receive`` with the round timeout; with ``self.stop`` (an in-process
        simulation) a dead engine or Ctrl-C ends the wait at once instead of after the timeout."""
        try:
            return flower_compat.send_and_receive(self.grid, msgs, self.settings.round_timeout,
                                                  self.stop.is_set if self.stop is not None else None)
        except flower_compat.EngineStopped:
            raise self._fail(self.stop.why) from None

    def stage_plan(self) -> dict[str, int]:
        plan: dict[str, int] = {}
        for r in self.settings.schedule:
            plan[r.stage] = r.stage_rounds
        return plan

    # -- one training round ---------------------------------------------------------------------
    def _train_messages(self, rnd: Round) -> _Outgoing:
        """The round's train messages: the stage's weights (and the global VAE in the first stage-2
        round this server process runs)."""
        from flwr.app import ConfigRecord

        s = self.settings
        stage_arrays = {k: v for k, v in self.arrays.items() if k.startswith(rnd.stage + ".")}
        config = {**self._base_config(), "stage": rnd.stage, "stage-round": rnd.stage_round,
                  "stage-rounds": rnd.stage_rounds, "stage-plan": format_stage_plan(self.stage_plan()),
                  "local-epochs": int(s.local_epochs)}
        if rnd.stage == "diffusion":
            # of the VAE as the sites hold it (rounded on the way when wire-dtype is float16)
            config["vae-fingerprint"] = fingerprint(as_received(self.arrays, ["vae"], self.buffers, s.wire_dtype), "vae.")
        wire, layout = encode(stage_arrays, [rnd.stage], self.buffers, wire_dtype=s.wire_dtype)
        config[LAYOUT_KEY] = layout_to_json(layout)
        msgs = list(self.strategy.configure_train(rnd.number, to_record(wire), ConfigRecord(config), self.grid))
        if not msgs:
            raise FederationError(f"round {rnd.number}: no site to train")
        send_vae = rnd.stage == "diffusion" and not self.vae_sent
        vae = encode(self.arrays, ["vae"], self.buffers, wire_dtype=s.wire_dtype) if send_vae else None  # encoded once per round
        if send_vae:
            msgs = [self._with_vae(m, vae) for m in msgs]
        down = {m.metadata.dst_node_id: record_nbytes(m.content[ARRAYS_KEY]) for m in msgs}
        return _Outgoing(msgs, wire, layout, stage_arrays, vae, down)

    def _resend_with_vae(self, rnd: Round, out: _Outgoing, replies: list, sent: dict, base: dict,
                         missing: list[dict]) -> list:
        """Sites that lack (or hold a different) global VAE get the round again, with it (``out.vae``
        is then set); returns the round's replies."""
        need = [r for r in replies if not r.has_error() and r.content.config_records.get(SITE_KEY, {}).get(
            "status") == STATUS_NEED_VAE]
        if not need:
            return replies
        log.info("round %d: sending the global VAE to %s", rnd.number, ", ".join(site_of(r) for r in need))
        out.vae = out.vae or encode(self.arrays, ["vae"], self.buffers, wire_dtype=self.settings.wire_dtype)
        by_node = {m.metadata.dst_node_id: m for m in out.msgs}
        again = [self._with_vae(by_node[r.metadata.src_node_id], out.vae) for r in need]
        for m in again:
            out.down[m.metadata.dst_node_id] += record_nbytes(m.content[ARRAYS_KEY])
        need_ids = {r.metadata.src_node_id for r in need}
        replies = [r for r in replies if r.metadata.src_node_id not in need_ids]
        again_replies = self._send_and_receive(again)
        sent.update(sent_to(again))
        missing += self.sites.unanswered(again, again_replies, sent, base, self.settings.round_timeout)
        return replies + again_replies

    def _aggregate(self, rnd: Round, good: list, out: _Outgoing) -> dict:
        """Aggregate the good replies into the global arrays; returns the strategy's metrics."""
        common_metrics(good)
        agg, agg_metrics = self.strategy.aggregate_train(rnd.number, good)
        if agg is None:
            raise FederationError(f"round {rnd.number}: aggregation failed")
        new = decode(from_record(agg), out.layout)
        unexpected = set(new) - set(out.stage_arrays)
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
        return dict(agg_metrics or {})

    def _give_up_attempt(self, rnd: Round, rows: list[dict], good: list, answered: int, n_msgs: int) -> None:
        """Too few usable replies: nothing of this attempt is aggregated (its rows are recorded)."""
        s = self.settings
        for row in rows:
            if row["kind"] == "train":
                row["kind"] = "discarded"
        self.folder.append_metrics(rows)
        why = "; ".join(f"{x['site']} {x['kind']}: {x.get('reason', 'too few replies')}" for x in rows
                        if x["kind"] != "discarded") or "no replies"
        raise RoundFailed(f"round {rnd.number} ({rnd.stage}): {len(good)} usable update(s), {answered} of "
                          f"{n_msgs} site(s) answered (min-sites {s.required_sites}); {why}")

    def _secure_train_round(self, rnd: Round, attempt: int) -> dict:
        """A round whose updates the server only sees summed (issue #26, :mod:`server.secure_round`)."""
        try:
            t0, out, rows, mean, extra = secure_round.train(self, rnd, attempt)
        except secure_round.SecureRoundFailed as e:
            self.folder.append_metrics(e.rows)
            raise RoundFailed(f"round {rnd.number} ({rnd.stage}): {e}") from None
        if rnd.stage == "diffusion":
            self.vae_sent = True
        return self._record_round(rnd, attempt, t0, out, rows, self._aggregate(rnd, mean, out), extra)

    def train_round(self, rnd: Round, attempt: int = 0) -> dict:
        s = self.settings
        if s.secure_aggregation:
            return self._secure_train_round(rnd, attempt)
        t0 = time.perf_counter()
        out = self._train_messages(rnd)
        replies = self._send_and_receive(out.msgs)
        sent = sent_to(out.msgs)
        base = {"round": rnd.number, "stage": rnd.stage, "attempt": attempt}
        missing = self.sites.unanswered(out.msgs, replies, sent, base, s.round_timeout)
        replies = self._resend_with_vae(rnd, out, replies, sent, base, missing)
        if rnd.stage == "diffusion":
            self.vae_sent = True
        good, rows, answered = self.sites.screen(replies, out.wire, out.down, base, sent,
                                                 max_num_examples=s.max_num_examples,
                                                 update_norm_multiple=s.update_norm_multiple)
        rows += missing
        rows += self.sites.absent(rows, base)
        if answered < s.required_sites or not good:
            self._give_up_attempt(rnd, rows, good, answered, len(out.msgs))
        return self._record_round(rnd, attempt, t0, out, rows, self._aggregate(rnd, good, out))

    def _record_round(self, rnd: Round, attempt: int, t0: float, out: _Outgoing, rows: list[dict],
                      agg_metrics: dict, extra: dict | None = None) -> dict:
        """The round's rows and summary in metrics.jsonl, its checkpoint, its log line."""
        s = self.settings
        seconds = time.perf_counter() - t0
        # the strategy's aggregate of the sites' metrics first: the server's own fields win
        summary = {**agg_metrics, "kind": "round", "round": rnd.number, "stage": rnd.stage, "strategy": s.strategy,
                   "sites": [x["site"] for x in rows if x["kind"] == "train"],
                   "num_examples": int(sum(x["num_examples"] for x in rows if x["kind"] == "train")),
                   "left_out": {x["site"]: x["kind"] for x in rows if x["kind"] != "train"},
                   "epsilon": {x["site"]: x["epsilon"] for x in rows if x.get("epsilon") is not None},
                   "bytes_down": int(sum(out.down.values())),
                   "bytes_up": int(sum(x.get("bytes_up", 0) for x in rows)), "attempt": attempt,
                   "vae_sent": out.vae is not None, "seconds": seconds, **(extra or {})}
        self.folder.append_metrics(rows + [summary])
        path = global_model.save_round(self.folder, rnd, self.arrays, self.strategy, s, {"sites": summary["sites"]})
        self.round_seconds.setdefault(rnd.stage, []).append(seconds)
        log.info("round %d/%d (%s %d/%d): %d site(s), loss %.4g, %.1f s, %.2f MB down / %.2f MB up -> %s%s",
                 rnd.number, s.num_rounds, rnd.stage, rnd.stage_round, rnd.stage_rounds, len(summary["sites"]),
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

    # -- final evaluation -----------------------------------------------------------------------
    def final_evaluation(self) -> list[dict]:
        """Every site evaluates the final global model on its held-out cases; the per-site rows
        (with their status) are recorded and the final table written."""
        from flwr.app import ConfigRecord

        s = self.settings
        wire, layout = encode(self.arrays, self.groups, self.buffers)
        config = {**self._base_config(), "eval-steps": int(s.eval_steps), "eval-gamma": bool(s.eval_gamma),
                  LAYOUT_KEY: layout_to_json(layout)}
        msgs = list(self.strategy.configure_evaluate(s.num_rounds, to_record(wire), ConfigRecord(config), self.grid))
        replies = self._send_and_receive(msgs)
        sent = sent_to(msgs)
        rows, errors = self.sites.evaluation(replies, sent, {m.metadata.dst_node_id for m in msgs},
                                             {"round": s.num_rounds, "stage": "final"}, s.max_num_examples)
        errors += self.sites.unanswered(msgs, replies, sent, {"round": s.num_rounds, "stage": "final"}, s.round_timeout)
        history = [r for r in self.folder.read_metrics() if r.get("kind") != "final"]
        rows = with_status(rows, errors, history, s)
        self.folder.append_metrics(errors + [{"kind": "final", "round": s.num_rounds, **row} for row in rows])
        write_tables(self.folder.path, rows, planned=expected_sites(rows, s), notes=final_notes(s, self.strategy, rows))
        return rows

    def final_notes(self, rows: list[dict]) -> list[str]:
        return final_notes(self.settings, self.strategy, rows)

    # -- everything -----------------------------------------------------------------------------
    def _fail(self, msg: str) -> FederationError:
        """Record the run as failed (run.json) and log why; the error to raise."""
        self.folder.update_run_json(status="failed", error=msg, finished=timestamp())
        log.error(msg)
        return FederationError(msg)

    def _round_with_retries(self, rnd: Round) -> dict:
        s = self.settings
        for attempt in range(s.round_retries + 1):
            try:
                return self.train_round(rnd, attempt)
            except RoundFailed as e:
                if attempt < s.round_retries:
                    log.warning("%s -- trying the round again (%d of %d retries)", e, attempt + 1, s.round_retries)
                    continue
                last = self.folder.rounds_on_disk()
                keep = (f"the last good checkpoint is {self.folder.checkpoint_path(last[-1])}; continue with --resume "
                        f"{s.run_dir} once enough sites are back") if last else "no round had completed"
                raise self._fail(f"{e}. Gave up after {s.round_retries + 1} attempt(s); {keep}") from None
        raise AssertionError("unreachable")

    def _log_what_runs(self) -> None:
        from addiff_core.run_summary import run_lines

        s = self.settings
        log.info("run folder %s (relative paths resolve against %s)", s.run_dir, _root_or_env())
        for line in run_lines(s.to_json(), n_sites=len(s.site_files) or s.required_sites):
            (log.warning if line.startswith("WARNING") else log.info)("%s", line)

    def _start(self) -> int:
        """The first round to run: a new run (the folder prepared) or a resumed one."""
        if not self.settings.resume:
            global_model.start(self.folder, self.settings)
            return 1
        start, self.arrays = global_model.resume(self.folder, self.settings, self.arrays, self.strategy)
        self.sites.remember(self.folder.read_metrics())  # each site's first declared example count
        return start

    def _finish(self, t0: float) -> dict:
        """The final model, the final evaluation and table, run.json complete, the report."""
        s = self.settings
        global_model.save_final(self.folder, self.arrays, s)
        log.info("final evaluation of the global model on every site's held-out cases ...")
        rows = self.final_evaluation()
        table = terminal_table(rows, expected_sites(rows, s))
        notes = self.final_notes(rows)
        self.folder.update_run_json(
            status="complete", finished=timestamp(), train_seconds_this_process=time.perf_counter() - t0,
            sites_evaluated=[r["site"] for r in rows if str(r.get("status", "ok")).startswith("ok")],
            warnings=[n[len("WARNING: "):] for n in notes if n.startswith("WARNING: ")])
        for n in notes:
            if n.startswith("WARNING: "):
                log.warning("%s", n[len("WARNING: "):])
        print(f"\nFinal global model, held-out metrics per site ({self.folder.final_md}):\n"
              + "".join(f"{n}\n" for n in notes) + f"\n{table}\n", flush=True)
        from addiff_core.report import write_report_safely

        log.info("writing the run report ...")
        # figures of the sites whose files this machine can read
        report = write_report_safely(s.run_dir, figures=s.report_figures)
        if report is not None:
            print(f"run report: {report}", flush=True)
        return {"status": "complete", "run_dir": str(s.run_dir), "final": rows,
                "report": str(report) if report else None}

    def run(self) -> dict:
        """The planned rounds, the final model and its evaluation. A :class:`FederationError`
        leaves run.json "failed" with its message, whichever step raised it (not every one comes
        through :meth:`_fail`), unless run.json already says how the run ended."""
        try:
            return self._run()
        except FederationError as e:
            if self.folder.read_run_json().get("status") == "running":
                self.folder.update_run_json(status="failed", error=str(e), finished=timestamp())
            raise

    def _run(self) -> dict:
        s = self.settings
        start = self._start()
        self.run_tag = str(self.folder.read_run_json().get("run_tag", ""))  # "" for runs begun before run tags
        too_small = simulation_too_small(self.grid, s) if is_simulation(self.grid) else None
        if too_small:
            raise self._fail(too_small)
        self._log_what_runs()
        wait_for_sites(self.grid, s)
        t0 = time.perf_counter()
        for rnd in s.schedule[start - 1:]:
            if s.stop_after_round and rnd.number > s.stop_after_round:
                log.info("stopping after round %d as asked (stop-after-round); resume with --resume %s",
                         s.stop_after_round, s.run_dir)
                self.folder.update_run_json(status=f"stopped after round {s.stop_after_round}")
                return {"status": "stopped", "run_dir": str(s.run_dir)}
            self._round_with_retries(rnd)
        return self._finish(t0)


def _root_or_env() -> str:
    from addiff_core.project import project_root

    try:
        return str(project_root())
    except ConfigError as e:
        return f"(unknown: {e})"
