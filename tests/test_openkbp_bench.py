"""bench/openkbp_bench.py: the spacing split, the held-out draw and the skip message (fast; no training)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_openkbp_bench", BENCH / "openkbp_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


def _spacings():
    # 24 patients, in-plane spacing (row, col, slice); several ties at 3.906 mm
    sp = {f"pt_{i}": (3.0 + 0.1 * (i % 12), 3.0 + 0.1 * (i % 12), 2.5) for i in range(1, 25)}
    for pid in ("pt_3", "pt_30", "pt_100", "pt_20"):
        sp[pid] = (3.906, 3.906, 3.0)
    return sp


def test_split_sorted_by_spacing_in_thirds(bench):
    sp = _spacings()
    groups = bench.split_by_spacing(sp, 3)
    sizes = [len(g) for g in groups]
    assert sum(sizes) == len(sp) == 26 and max(sizes) - min(sizes) <= 1
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(sp)  # every patient exactly once
    key = [bench.in_plane_spacing(sp[p]) for p in flat]
    assert key == sorted(key)  # finest spacing first, contiguous cuts
    assert max(bench.in_plane_spacing(sp[p]) for p in groups[0]) <= min(bench.in_plane_spacing(sp[p]) for p in groups[1])
    ties = [p for p in flat if bench.in_plane_spacing(sp[p]) == 3.906]
    assert ties == ["pt_3", "pt_20", "pt_30", "pt_100"]  # ties broken by patient number, not text


def test_split_24_gives_three_sites_of_8(bench):
    sp = {f"pt_{i}": (2.5 + 0.1 * i, 2.5 + 0.1 * i, 2.5) for i in range(24)}
    groups = bench.split_by_spacing(sp, 3)
    assert [len(g) for g in groups] == [8, 8, 8]
    assert groups[0] == [f"pt_{i}" for i in range(8)]
    with pytest.raises(ValueError):
        bench.split_by_spacing({"pt_1": (1, 1, 1)}, 3)


def test_heldout_deterministic_and_disjoint(bench):
    sp = {f"pt_{i}": (2.5 + 0.1 * i, 2.5 + 0.1 * i, 2.5) for i in range(24)}
    split = bench.make_split(sp)
    again = bench.make_split(dict(reversed(list(sp.items()))))  # order of the input does not matter
    assert split == again
    assert [s["site"] for s in split] == list(bench.SITE_NAMES)
    for s in split:
        assert len(s["patients"]) == 8 and len(s["heldout"]) == bench.N_HELDOUT == 2
        assert set(s["heldout"]) <= set(s["patients"])
        assert set(s["train"]) == set(s["patients"]) - set(s["heldout"]) and len(s["train"]) == 6
    held = [p for s in split for p in s["heldout"]]
    assert len(set(held)) == 6
    assert bench.choose_heldout(split[0]["patients"], 2, seed=0, site_index=0) == split[0]["heldout"]
    with pytest.raises(ValueError):
        bench.choose_heldout(["pt_1", "pt_2"], 2)  # nothing left to train on


def test_split_of_the_real_sample(bench, openkbp_dir):
    patients = bench.find_patients(openkbp_dir)
    split = bench.make_split(bench.read_spacings(patients))
    assert [len(s["patients"]) for s in split] == [8, 8, 8]
    maxes = [max(s["in_plane_spacing_mm"].values()) for s in split]
    mins = [min(s["in_plane_spacing_mm"].values()) for s in split]
    assert maxes[0] <= mins[1] and maxes[1] <= mins[2]


def test_missing_sample_skips_with_a_clear_message(bench, tmp_path, capsys):
    missing = tmp_path / "no-such-openkbp-sample"
    rc = bench.main(["--sample", str(missing), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"OpenKBP sample not found at {missing}; skipping" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # nothing written


def test_split_84_gives_three_sites_of_28_with_5_held_out(bench):
    # 84 patients as with the extra pool: ids and spacings shaped like the real ones (many ties)
    sp = {f"pt_{i}": (3.5 + 0.1 * (i % 7), 3.5 + 0.1 * (i % 7), 2.5 if i % 3 else 3.0) for i in range(1, 200, 2)}
    sp = dict(list(sp.items())[:84])
    split = bench.make_split(sp, n_heldout=bench.HELDOUT_WITH_EXTRA)
    assert split == bench.make_split(dict(reversed(list(sp.items()))), n_heldout=5)  # deterministic
    assert [len(s["patients"]) for s in split] == [28, 28, 28]
    assert [len(s["heldout"]) for s in split] == [5, 5, 5] and [len(s["train"]) for s in split] == [23, 23, 23]
    held = [p for s in split for p in s["heldout"]]
    assert len(set(held)) == 15
    for a, b in zip(split, split[1:]):
        assert max(a["in_plane_spacing_mm"].values()) <= min(b["in_plane_spacing_mm"].values())
    for k, s in enumerate(split):
        assert s["heldout"] == bench.choose_heldout(s["patients"], 5, seed=bench.SPLIT_SEED, site_index=k)


def test_extra_archive_is_unpacked_once_and_its_patients_found(bench, tmp_path):
    import tarfile

    src = tmp_path / "src" / "okbp-train"
    for pid in ("pt_5", "pt_16"):
        (src / pid).mkdir(parents=True)
        (src / pid / "ct.csv").write_text(",data\n")
    (src / "README.md").write_text("not a patient")
    archive = tmp_path / "pool.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(src, arcname="okbp-train")
    work = tmp_path / "work"
    folder = bench.resolve_extra(archive, work)
    assert folder == work / "extra"
    found = bench.find_extra_patients(folder)
    assert list(found) == ["pt_5", "pt_16"] and found["pt_5"] == folder / "okbp-train" / "pt_5"
    (folder / "okbp-train" / "pt_5" / "marker").write_text("kept")  # a second call reuses the unpacked folder
    assert bench.resolve_extra(archive, work) == folder and (folder / "okbp-train" / "pt_5" / "marker").exists()
    assert bench.resolve_extra(src.parent, work) == src.parent  # an unpacked folder is read as it is
    assert bench.resolve_extra("none", work) is None
    with pytest.raises(FileNotFoundError):
        bench.resolve_extra(tmp_path / "missing.tar.xz", work)


def test_spearman_in_mask(bench):
    import numpy as np

    rng = np.random.default_rng(0)
    err = rng.random((4, 5, 6))
    mask = np.zeros(err.shape, bool)
    mask[1:3] = True
    assert bench.spearman_in_mask(err * 2 + 1, err, mask) == pytest.approx(1.0)
    assert bench.spearman_in_mask(-err, err, mask) == pytest.approx(-1.0)
    assert bench.spearman_in_mask(np.zeros_like(err), err, mask) is None  # a constant std map: undefined
