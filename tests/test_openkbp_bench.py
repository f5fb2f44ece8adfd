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
