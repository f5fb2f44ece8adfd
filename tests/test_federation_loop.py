"""The server loop with the real ClientApp, in-process (no Ray, no sockets): rounds, stages,
what travels, checkpoints, metrics, the final table, resume and the VAE on request."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from addiff_core.config import ConfigError
from helpers.federation import TINY, FakeGrid, synthetic_sites
from server.federation import Federation
from addiff_core.wire import layout_from_json
from server.settings import from_run_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("federation_loop")]  # one `full_run` for its tests


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return synthetic_sites(tmp_path_factory.mktemp("fed_loop_sites"))


def settings(run_dir, sites, **kw):
    cfg = {"run-dir": str(run_dir), "site-files": ",".join(map(str, sites)), "model-config": str(TINY),
           "vae-rounds": 1, "diffusion-rounds": 2, "local-epochs": 1, "eval-steps": 2, "eval-gamma": False,
           "report-figures": False}  # figures: test_report and the simulation test
    cfg.update(kw)
    return from_run_config(cfg)


def run(run_dir, sites, vae_sent=None, **kw):
    grid = FakeGrid(len(sites))
    fed = Federation(grid, settings(run_dir, sites, **kw), send_site_files=True)
    if vae_sent is not None:
        fed.vae_sent = vae_sent
    return fed.run(), grid


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, sites):
    run_dir = tmp_path_factory.mktemp("fed_loop") / "full"
    out, grid = run(run_dir, sites)
    return run_dir, out, grid


def test_rounds_stages_checkpoints_metrics_and_table(full_run, sites):
    run_dir, out, grid = full_run
    assert out["status"] == "complete"
    names = sorted(f.stem for f in sites)
    # a checkpoint per round: round number, stage, strategy in its meta
    for rnd, stage in ((1, "vae"), (2, "diffusion"), (3, "diffusion")):
        ck = torch.load(run_dir / "checkpoints" / f"round_{rnd:04d}.pt", weights_only=True)
        assert (ck["meta"]["round"], ck["meta"]["stage"], ck["meta"]["strategy"]) == (rnd, stage, "fedavg")
        assert (run_dir / "checkpoints" / f"round_{rnd:04d}.pt.sha256").is_file()
    # per-round, per-site metrics with the site's name
    train = rows(run_dir, "train")
    assert sorted((r["round"], r["site"]) for r in train) == sorted((r, n) for r in (1, 2, 3) for n in names)
    assert all(r["num_examples"] == 2 and "train_loss" in r and r["stage"] for r in train)
    # stage 2: only diffusion weights travel; the VAE goes out once, in the first stage-2 round
    rnd = {r["round"]: r for r in rows(run_dir, "round")}
    assert rnd[2]["vae_sent"] and not rnd[3]["vae_sent"]
    assert rnd[2]["bytes_up"] == rnd[3]["bytes_up"] < rnd[2]["bytes_down"]
    assert rnd[3]["bytes_down"] == rnd[3]["bytes_up"]
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert [sorted(layout_from_json(m.content["config"]["layout"])) for m in train_msgs] == \
        [["vae"]] * 3 + [["diffusion", "vae"]] * 3 + [["diffusion"]] * 3
    assert all(all("diffusion" in k for k in m.content["arrays"].keys()) for m in train_msgs[-3:])
    # the final per-site table: every site
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert sorted(r["site"] for r in final) == names and all(r["cases"] == 1 and "mae_gy" in r for r in final)
    assert (run_dir / "final_metrics.csv").read_text().count("\n") == len(names) + 2  # header + sites + all
    assert "| all sites (case-weighted, 3 of 3 sites) |" in (run_dir / "final_metrics.md").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_stop_resume_and_vae_on_request_give_the_same_weights(full_run, sites, tmp_path):
    full_dir = full_run[0]
    run_dir = tmp_path / "resumed"
    out, stopped = run(run_dir, sites, **{"stop-after-round": 2})
    assert out["status"] == "stopped" and not (run_dir / "checkpoints" / "round_0003.pt").exists()
    # hospital_b lost its cached VAE, and the server thinks everybody has it: the site asks for it.
    # (Only the VAE cache: the rest of its state folder, e.g. its optimiser state, is the site's
    # own and changes its next update if lost.)
    state_b = next(s for s in sites if s.stem == "hospital_b").parent / "state" / "hospital_b"
    for f in state_b.glob("global_vae.pt*"):
        f.unlink()
    assert not (state_b / "global_vae.pt").exists()
    out, grid = run(run_dir, sites, vae_sent=True, resume=True)
    assert out["status"] == "complete"
    r3 = [r for r in rows(run_dir, "train") if r["round"] == 3]
    by_site = {r["site"]: r["bytes_down"] for r in r3}
    assert by_site["hospital_b"] > by_site["hospital_a"] == by_site["hospital_c"]
    assert [r["round"] for r in rows(run_dir, "round")] == [1, 2, 3]  # no duplicated rows after resume
    assert same(weights(run_dir / "checkpoints" / "round_0003.pt"), weights(full_dir / "checkpoints" / "round_0003.pt"))
    # one run tag for a run and its resumption, another for another run: the sites keep their
    # optimiser states apart by it (test_optimizer_state.py)
    tags = [{str(m.content["config"]["run-tag"]) for m in g.sent if m.metadata.message_type == "train"}
            for g in (stopped, grid, full_run[2])]
    assert tags[0] == tags[1] and len(tags[0]) == 1 and tags[2].isdisjoint(tags[0]), tags
    assert tags[0] == {json.loads((run_dir / "run.json").read_text())["run_tag"]}


def test_resume_skips_a_corrupt_latest_checkpoint(full_run, sites, tmp_path):
    run_dir = tmp_path / "corrupt"
    shutil.copytree(full_run[0], run_dir)
    ck = run_dir / "checkpoints" / "round_0003.pt"
    ck.write_bytes(ck.read_bytes()[:1000])  # truncated: its SHA-256 no longer matches
    (run_dir / "final_model.pt").unlink()
    out, _ = run(run_dir, sites, resume=True)
    assert out["status"] == "complete"
    assert same(weights(ck), weights(full_run[0] / "checkpoints" / "round_0003.pt"))


def test_a_finished_run_folder_is_not_overwritten(full_run, sites):
    with pytest.raises(ConfigError, match="--resume"):
        run(full_run[0], sites)


def test_fedadam_moments_survive_resume(sites, tmp_path):
    kw = {"strategy": "fedadam", "vae-rounds": 2, "diffusion-rounds": 1}
    run(tmp_path / "a", sites, **kw)
    run(tmp_path / "b", sites, **kw, **{"stop-after-round": 1})
    meta = torch.load(tmp_path / "b" / "checkpoints" / "round_0001.pt", weights_only=True)["meta"]
    assert meta["strategy"] == "fedadam" and meta["strategy_state"]["m_t"]  # moments are in the checkpoint
    run(tmp_path / "b", sites, **kw, resume=True)
    assert same(weights(tmp_path / "a" / "checkpoints" / "round_0003.pt"),
                weights(tmp_path / "b" / "checkpoints" / "round_0003.pt"))


def test_unet_baseline_is_a_single_stage(sites, tmp_path):
    out, grid = run(tmp_path / "unet", sites, **{"model-kind": "unet", "unet-rounds": 1})
    assert out["status"] == "complete" and len(out["final"]) == 3
    assert [r["stage"] for r in rows(tmp_path / "unet", "round")] == ["unet"]
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(set(layout_from_json(m.content["config"]["layout"])) == {"unet"} for m in sent)
    assert all(all("unet" in k for k in m.content["arrays"].keys()) for m in sent)


def test_float16_wire_sends_half_the_bytes_and_aggregates_in_float32(full_run, sites, tmp_path):
    """wire-dtype float16: every train message and reply carries its stage in float16, the
    global model stays float32, the sites keep the VAE they got (no VAE re-requests)."""
    import numpy as np

    out, grid = run(tmp_path / "f16", sites, **{"wire-dtype": "float16"})
    assert out["status"] == "complete" and len(out["final"]) == 3
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    packed = [a for m in sent for k, a in m.content["arrays"].items() if k.startswith("packed:") and k.endswith(":float32")]
    assert packed and all(a.numpy().dtype == np.float16 for a in packed)
    assert all(v.dtype == torch.float32 for k, v in weights(tmp_path / "f16" / "final_model.pt").items()
               if v.is_floating_point())
    r16, r32 = rows(tmp_path / "f16", "train"), rows(full_run[0], "train")
    assert len(r16) == len(r32)  # the same replies: no site asked for the VAE again
    for key in ("bytes_up", "bytes_down"):
        b16, b32 = sum(r[key] for r in r16), sum(r[key] for r in r32)
        assert 0.45 * b32 < b16 < 0.55 * b32, (key, b16, b32)
