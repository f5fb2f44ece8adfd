"""GDP-HMM plans are pickles (``arr_0`` of ``np.savez_compressed(path, dict)``): read with a
restricted unpickler that builds containers, strings, numbers and numpy arrays/scalars only and
refuses anything else before it runs (issue #30)."""
from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest

from addiff_core.gdp_hmm import safe_npz
from addiff_core.gdp_hmm.safe_npz import UnsafeNpz, load_plan_dict, restricted_loads
from helpers.gdp_hmm import plan_dict


class Payload:
    """Unpickling this runs ``exec(code)``: the kind of object a hostile plan file would carry."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_a_plan_in_the_challenge_layout_reads_back_whole(tmp_path):
    d = plan_dict("HNC_001", 1, vmat=True, seed=0)
    path = tmp_path / "HNC_001+A4Ac+MOS_25934.npz"
    np.savez_compressed(path, d)  # as DICOM2NPZ.py writes a plan
    got = load_plan_dict(path)
    assert set(got) == set(d)
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
        else:
            assert got[k] == v, k
    assert type(got["isocenter"][0]) is np.float32 and got["isVMAT"] is True and got["size"] == d["size"]


def test_a_plan_written_by_numpy_1_reads_too(tmp_path):
    """The challenge's files were written by numpy 1.x: its pickles name numpy.core.multiarray."""
    d = plan_dict("0617-259694", 2, vmat=False, seed=1)
    arr = np.empty((), dtype=object)
    arr[()] = d
    body = pickle.dumps(arr, protocol=3)  # numpy 1.x's format.write_array: pickle protocol 3
    assert b"cnumpy._core.multiarray\n" in body  # GLOBAL opcodes name the module in text
    body = body.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|O", "fortran_order": False, "shape": ()})
    with zipfile.ZipFile(tmp_path / "old.npz", "w") as zf:
        zf.writestr("arr_0.npy", head.getvalue() + body)
    got = load_plan_dict(tmp_path / "old.npz")
    assert np.array_equal(got["dose"], d["dose"]) and got["isocenter"] == d["isocenter"]


def test_only_numpy_array_dtype_and_scalar_rebuilders_are_allowed():
    names = {name for _, name in safe_npz._ALLOWED}
    modules = {mod for mod, _ in safe_npz._ALLOWED}
    assert names == {"_reconstruct", "scalar", "ndarray", "dtype"}
    assert modules == {"numpy.core.multiarray", "numpy._core.multiarray", "numpy"}


def test_a_payload_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran.txt"
    d = plan_dict("HNC_001", 1, vmat=False, seed=0)
    d["Body"] = Payload(f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "HNC_001+9Ag+MOS_25934.npz"
    np.savez_compressed(path, d)
    with pytest.raises(UnsafeNpz, match=r"refused: the pickle asks for builtins\.exec.*nothing was run"):
        load_plan_dict(path)
    assert not marker.exists()
    # through the command line: that plan skipped with one line, nothing run
    from addiff_core.gdp_hmm.importer import import_gdp_hmm
    from helpers.gdp_hmm import PLANS, write_dataset

    src = write_dataset(tmp_path / "src")
    (src / "data" / f"{PLANS[0][0]}.npz").write_bytes(path.read_bytes())
    summary = import_gdp_hmm(src, tmp_path / "out", progress=False)
    assert [(n, r.split(":")[0]) for n, r in summary.skipped] == [(PLANS[0][0], "refused")]
    assert len(summary.skipped[0][1].splitlines()) == 1
    assert not marker.exists()
    # the payload is live: the challenge's own way of reading a plan runs it
    np.load(path, allow_pickle=True)["arr_0"]
    assert marker.exists()


@pytest.mark.parametrize("stream", [
    b"cos\nsystem\n(S'true'\ntR.",          # protocol 0 GLOBAL + REDUCE
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"cnumpy\nload\n(S'x.npy'\ntR.",                           # numpy, but not an array rebuilder
    b"csubprocess\nPopen\n(S'true'\ntR.",
    pickle.dumps({"img": np.zeros(2), "x": Payload("1")}, protocol=4),
])
def test_any_other_global_is_refused(stream):
    with pytest.raises(UnsafeNpz, match="refused: the pickle asks for"):
        restricted_loads(stream)


def test_not_a_plan_is_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UnsafeNpz, match="not an npz"):
        load_plan_dict(bad)
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("dose.npy", b"")
    with pytest.raises(UnsafeNpz, match="no arr_0 in the npz"):
        load_plan_dict(bad)
    np.savez(bad, [1, 2, 3])
    with pytest.raises(UnsafeNpz, match="arr_0 is a int64 array of shape"):
        load_plan_dict(bad)
    np.savez(bad, np.array(["a", 1], dtype=object))
    with pytest.raises(UnsafeNpz, match="arr_0 holds a ndarray, not the dict"):
        load_plan_dict(bad)
    truncated = pickle.dumps({"a": 1}, protocol=3)[:-3]
    with pytest.raises(UnsafeNpz, match="not a readable pickle"):
        restricted_loads(truncated)
