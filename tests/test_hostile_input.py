"""Hostile input stays cheap (issue #29, points 11-13 and the hidden folders of 15): YAML alias
bombs through the DICOM path, decompression bombs (a deflated RTDOSE, a gzip NIfTI) refused from
their declared sizes, FIFOs / devices / links out of a folder never read, hidden folders named.

The bombs are built small: their headers declare the full attack (4096 x 4096 x 32 frames,
900^3 voxels) but the compressed streams hold only :data:`PAYLOAD` bytes, so that a regression
shows as a failed memory bound, not as a machine out of memory.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from addiff_core.case_io import load_case, read_plan
from addiff_core.errors import CaseError
from addiff_core.cli import main
from addiff_core.config import load_site_config
from addiff_core.data import load_site_data
from addiff_core.dicom.scan import scan_folder
from addiff_core.dicom.writer import export_case
from helpers.models import tiny_site_model

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = 96 * 2 ** 20  # bytes actually compressed into a bomb (its header declares far more)
MEMORY_BOUND = 48 * 2 ** 20  # what refusing a bomb may take (Python allocations, tracemalloc)


def alias_bomb(*keys: str) -> str:
    """A "billion laughs" YAML: nine levels of nine aliases (9^9 = 387 million strings once
    expanded) as the value under ``keys``, where the old code printed or str()-ed it."""
    head = "".join(f"{'  ' * i}{k}:\n" for i, k in enumerate(keys))
    pad = "  " * (len(keys) - 1)  # a block sequence may sit at its key's indentation
    return head + f"{pad}- &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"{pad}- &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def _one_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _zeros_deflated(head: bytes, n_zeros: int, wbits: int = -zlib.MAX_WBITS) -> bytes:
    """``head`` followed by ``n_zeros`` zero bytes, deflated, without compressing them all: after a
    full flush the compressor starts afresh, so one flushed block of zeros repeats verbatim."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = 8 * 2 ** 20
    out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    return b"".join(out + [block] * max(1, n_zeros // chunk) + [c.flush()])


def deflated_rtdose_bomb(rtdose: Path, rows: int = 4096, cols: int = 4096, frames: int = 32) -> None:
    """Rewrite ``rtdose`` as a Deflated Explicit VR Little Endian RTDOSE declaring ``frames`` frames
    of ``rows`` x ``cols`` (its stream holds the header and PAYLOAD zero bytes)."""
    ds = pydicom.dcmread(str(rtdose))
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.GridFrameOffsetVector = [2.5 * k for k in range(frames)]
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n_bytes = rows * cols * frames * int(ds.BitsAllocated) // 8
    head = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_bytes)
    meta = ds.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    rtdose.write_bytes(out.getvalue() + _zeros_deflated(head, PAYLOAD))


def nifti_bomb(path: Path, n: int = 900) -> None:
    """A gzip NIfTI-1 int16 header declaring n^3 voxels; the stream holds PAYLOAD zero bytes."""
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, n, n, n, 1, 1, 1, 1)
    struct.pack_into("<2h", hdr, 70, 4, 16)  # int16
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    hdr[344:348] = b"n+1\0"
    gz_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    path.write_bytes(gz_header + _zeros_deflated(bytes(hdr), PAYLOAD))


def _peak(fn):
    """(result, peak bytes allocated by Python and numpy, seconds) of ``fn()``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1], time.perf_counter() - t0
    finally:
        tracemalloc.stop()


def _patient(tmp_path: Path, make_case, name: str = "p1") -> Path:
    """A small exported patient (CT slices, RTSTRUCT, RTPLAN, RTDOSE) in tmp_path/tps/name."""
    export_case(make_case(tmp_path / "cases", name=name), tmp_path / "tps" / name)
    return tmp_path / "tps" / name


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command line in a child process: a regression that hangs fails the test instead."""
    return subprocess.run([sys.executable, "-m", "addiff_core.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------
# 11. YAML bombs through the DICOM path; one loader for every YAML
# ------------------------------------------------------------------------------------------
YAML_CALL = re.compile(r"\byaml\.(safe_load|load|unsafe_load|full_load)(_all)?\s*\(|"
                       r"from\s+yaml\s+import[^\n]*\b(safe_load|load|unsafe_load|full_load)\b")


def test_every_yaml_read_goes_through_yamlsafe():
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
                 for pkg in ("addiff_core", "server", "client") for p in sorted((ROOT / pkg).rglob("*.py"))
                 if p != ROOT / "addiff_core" / "yamlsafe.py"
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if YAML_CALL.search(line)]
    assert not offenders, "YAML read outside addiff_core/yamlsafe.py:\n" + "\n".join(offenders)


def test_an_alias_bomb_as_the_import_map_is_one_line_at_once(tmp_path, capsys):
    bomb = tmp_path / "map.yaml"
    bomb.write_text(alias_bomb("structure_names", "PTV"))  # a structure name must be a string: got [...]
    assert bomb.stat().st_size <= 373
    (tmp_path / "src").mkdir()
    t0 = time.process_time()
    code = main(["data", "import-dicom", str(tmp_path / "src"), str(tmp_path / "out"), "--map", str(bomb)])
    assert time.process_time() - t0 < 0.5
    assert code == 2
    _one_line(capsys.readouterr().err, "map.yaml", "aliases")


def test_an_alias_bomb_as_a_cases_dicom_yaml_is_one_line_at_once(tmp_path, make_case, capsys):
    case = make_case(tmp_path / "cases", name="c1")
    (case / "dicom.yaml").write_text(alias_bomb("patient", "PatientID"))  # str(PatientID) expanded it
    t0 = time.process_time()
    code = main(["data", "export-dicom", str(case), str(tmp_path / "out")])
    assert time.process_time() - t0 < 0.5
    assert code == 2
    _one_line(capsys.readouterr().err, "dicom.yaml", "aliases")
    assert main(["data", "check", str(case)]) == 1  # data check reads it too, through the same loader
    out = capsys.readouterr().out
    assert "c1: dicom.yaml: " in out and "aliases" in out and len(out) < 1000
    (case / "dicom.yaml").write_text("- a list\n")  # not a mapping: one line, not an AttributeError
    assert main(["data", "export-dicom", str(case), str(tmp_path / "out")]) == 2
    _one_line(capsys.readouterr().err, "dicom.yaml", "mapping")


def test_simulate_set_values_are_parsed_by_yamlsafe():
    from addiff_core.config import ConfigError
    from server.run_config_cli import parse_sets

    assert parse_sets(["min-sites=2"]) == {"min-sites": 2}
    with pytest.raises(ConfigError, match="aliases"):
        parse_sets(["min-sites=[&a [1], *a]"])


# ------------------------------------------------------------------------------------------
# 12. Decompression bombs: declared sizes checked before decompressing, header scan bounded
# ------------------------------------------------------------------------------------------
def test_a_deflated_rtdose_bomb_is_refused_from_its_header(tmp_path, make_case, capsys):
    src = _patient(tmp_path, make_case)
    deflated_rtdose_bomb(src / "rtdose.dcm")
    assert (src / "rtdose.dcm").stat().st_size < 2 ** 20
    scan, peak, _ = _peak(lambda: scan_folder(src))
    assert [f.kind for f in scan.patients[0].files].count("RTDOSE") == 1  # the header scan reads it ...
    assert peak < MEMORY_BOUND, f"the header scan took {peak / 2 ** 20:.0f} MiB"  # ... without inflating it
    code, peak, seconds = _peak(lambda: main(["data", "import-dicom", str(src.parent), str(tmp_path / "out")]))
    out = capsys.readouterr().out
    assert code == 0 and peak < MEMORY_BOUND and seconds < 30, (peak, seconds, out)
    note = next(ln for ln in out.splitlines() if "rtdose.dcm" in ln)
    assert "4096 x 4096 x 32" in note and "ADDIFF_MAX_VOXELS" in note and "dose not imported" in note, note
    assert load_case(tmp_path / "out" / "p1").dose is None


def test_a_deflated_dicom_file_inflates_only_as_far_as_bounded(tmp_path, make_case, monkeypatch):
    from addiff_core import limits
    from addiff_core.dicom.files import read_header
    from addiff_core.dicom.volumes import DicomDataError, _pixels

    src = _patient(tmp_path, make_case)
    plain = _pixels(src / "rtdose.dcm")[1]
    ds = pydicom.dcmread(str(src / "rtdose.dcm"))  # a genuine deflated RTDOSE still reads, pixels too
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(str(tmp_path / "deflated.dcm"), enforce_file_format=True)
    assert (_pixels(tmp_path / "deflated.dcm")[1] == plain).all()
    deflated_rtdose_bomb(src / "rtdose.dcm", rows=16, cols=16, frames=4)  # 16 x 16 x 4 declared, 96 MiB held
    assert read_header(src / "rtdose.dcm").Rows == 16
    monkeypatch.setattr(limits, "DICOM_HEADER_BYTES", 2 ** 14)  # the header fits; 96 MiB do not
    t0 = time.perf_counter()
    with pytest.raises(DicomDataError, match="cannot decode the pixel data.*inflates beyond 20,480 bytes"):
        _pixels(src / "rtdose.dcm")  # header bound + the declared 16 x 16 x 4 x 4 bytes, no more
    assert time.perf_counter() - t0 < 1.0
    monkeypatch.setattr(limits, "DICOM_HEADER_BYTES", 512)  # a header larger than the bound is not read
    assert read_header(src / "rtdose.dcm") is None
    monkeypatch.setattr(limits, "DICOM_HEADER_BYTES", 2 ** 20)
    monkeypatch.setattr(limits, "DICOM_INFLATED_READS", 20)  # nor one of more elements (empty ones are cheap
    assert read_header(src / "rtdose.dcm") is None          # to deflate, slow to parse)


def test_a_gzip_nifti_bomb_is_refused_from_its_header(tmp_path, make_case, capsys):
    case = make_case(tmp_path / "cases", name="c1")
    nifti_bomb(case / "ct.nii.gz")
    assert (case / "ct.nii.gz").stat().st_size < 2 ** 20
    code, peak, seconds = _peak(lambda: main(["data", "check", str(case)]))
    out = capsys.readouterr().out
    assert code == 1 and peak < MEMORY_BOUND and seconds < 10, (peak, seconds)
    line = next(ln for ln in out.splitlines() if "ct.nii.gz" in ln)
    assert "900 x 900 x 900" in line and "ADDIFF_MAX_VOXELS" in line, line
    with pytest.raises(CaseError, match="900 x 900 x 900"):
        load_case(case)


def test_the_voxel_limit_is_configurable(tmp_path, make_case, monkeypatch, capsys):
    case = make_case(tmp_path / "cases", name="c1")  # 16^3 = 4096 voxels per image
    src = _patient(tmp_path, make_case, name="p1")
    monkeypatch.setenv("ADDIFF_MAX_VOXELS", "4000")
    with pytest.raises(CaseError, match="16 x 16 x 16 voxels .*4,000"):
        load_case(case)
    assert main(["data", "check", str(case)]) == 1
    assert "ct.nii.gz: declares 16 x 16 x 16 voxels" in capsys.readouterr().out
    assert main(["data", "import-dicom", str(src), str(tmp_path / "out")]) == 1
    assert "limit of 4,000 voxels" in capsys.readouterr().out
    monkeypatch.setenv("ADDIFF_MAX_VOXELS", "4096")
    assert load_case(case).ct.GetSize() == (16, 16, 16)
    monkeypatch.setenv("ADDIFF_MAX_VOXELS", "lots")
    assert main(["data", "export-dicom", str(case), str(tmp_path / "exp")]) == 2
    _one_line(capsys.readouterr().err, "ADDIFF_MAX_VOXELS")


# ------------------------------------------------------------------------------------------
# 13. FIFOs, devices and links out of the folder: regular files inside the folder only
# ------------------------------------------------------------------------------------------
def test_a_fifo_or_dev_zero_in_a_dicom_source_does_not_hang(tmp_path, make_case):
    src = _patient(tmp_path, make_case)
    os.mkfifo(src / "pipe.dcm")
    (src / "zero.dcm").symlink_to("/dev/zero")
    res = _cli("data", "import-dicom", str(src.parent), str(tmp_path / "out"), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    note = next(ln for ln in res.stdout.splitlines() if "pipe.dcm" in ln)
    assert "zero.dcm" in note and "not a regular file" in note and "outside" in note, note
    assert (tmp_path / "out" / "p1" / "dose.nii.gz").is_file()


def test_a_fifo_plan_yaml_does_not_hang_data_check(tmp_path, make_case):
    case = make_case(tmp_path / "cases", name="c1")
    (case / "plan.yaml").unlink()
    os.mkfifo(case / "plan.yaml")
    res = _cli("data", "check", str(case), timeout=120)
    assert res.returncode == 1
    assert "c1: plan.yaml: is not a regular file (a FIFO)" in res.stdout, res.stdout
    with pytest.raises(CaseError, match="not a regular file"):
        read_plan(case)


def test_a_plan_yaml_linked_outside_the_case_is_not_read(tmp_path, make_case, capsys):
    case = make_case(tmp_path / "cases", name="c1")
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((case / "plan.yaml").read_text() + "# SECRET\n")
    (case / "plan.yaml").unlink()
    (case / "plan.yaml").symlink_to(outside)
    assert main(["data", "check", str(case)]) == 1
    out = capsys.readouterr().out
    assert "c1: plan.yaml: is a symbolic link to a file outside the case folder; not read" in out, out
    with pytest.raises(CaseError, match="outside the case folder"):
        load_case(case)
    (case / "dicom.yaml").symlink_to(outside)
    assert main(["data", "check", str(case)]) == 1
    assert "c1: dicom.yaml: is a symbolic link to a file outside the case folder" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# 15. a hidden folder (name starting with '.') is skipped, and said so
# ------------------------------------------------------------------------------------------
def test_a_hidden_case_folder_is_named_not_silently_skipped(tmp_path, make_case, capsys):
    cases = tmp_path / "cases"
    for name in ("good_0", "good_1", "..hidden_like"):
        make_case(cases, name=name)
    assert main(["data", "check", str(cases)]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "..hidden_like" in ln)
    assert "hidden folder" in line and "skipped" in line and "2 case(s) checked" in out, out
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "s", "data_dir": "cases", "heldout": {"case_ids": ["good_0"]},
                                    "device": "cpu", "model": tiny_site_model()}))
    data = load_site_data(load_site_config(site))
    assert len(data.train) == 1 and "hidden" in data.skipped["..hidden_like"]


def test_a_hidden_patient_folder_in_a_dicom_source_is_named(tmp_path, make_case, capsys):
    _patient(tmp_path, make_case, name="p1")
    (tmp_path / "tps" / "p1").rename(tmp_path / "tps" / "..hidden_like")
    _patient(tmp_path, make_case, name="p2")
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    note = next((ln for ln in out.splitlines() if "..hidden_like" in ln), "")
    assert "hidden" in note, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p2"]
