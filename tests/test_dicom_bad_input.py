"""Bad DICOM input: one line each, and nothing else is lost (the other patients are imported)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom

from addiff_core.case_io import load_case
from addiff_core.cli import main
from addiff_core.dicom.writer import export_case
from helpers.dicom import edit


def _blocks(out: str) -> dict[str, list[str]]:
    """Import output -> {case name: [its header line, its note lines]}."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("["):
            current = line.split("] ", 1)[1].split(" ", 1)[0]
            blocks[current] = [line]
        elif line.startswith("    note:") and current:
            blocks[current].append(line)
        else:
            current = None
    return blocks


def _build(tmp_path: Path, make_case) -> Path:
    src = tmp_path / "tps"
    names = ("p_good", "p_gap", "p_tilt", "p_mixed", "p_mixed_unref", "p_for", "p_noscale", "p_nobeams")
    for name in names:
        export_case(make_case(tmp_path / "cases", name=name), src / name)
    # non-DICOM files next to a good patient
    (src / "p_good" / "notes.txt").write_text("exported from the TPS on Monday")
    (src / "p_good" / "photo.jpg").write_bytes(bytes(range(256)) * 4)
    (src / "p_good" / "empty").write_bytes(b"")
    # a missing slice
    (src / "p_gap" / "ct_0008.dcm").unlink()
    # a gantry-tilted series: slice positions drift along y
    for k, f in enumerate(sorted((src / "p_tilt").glob("ct_*.dcm"))):
        edit(f, lambda ds, k=k: setattr(ds, "ImagePositionPatient",
                                        [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + 0.9 * k,
                                         ds.ImagePositionPatient[2]]))
    # mixed series in one folder: a second CT series of the same patient beside the planning CT
    export_case(tmp_path / "cases" / "p_mixed", tmp_path / "second")
    for f in (tmp_path / "second").glob("ct_*.dcm"):
        shutil.copy(f, src / "p_mixed" / f"second_{f.name}")
    # ... and once more where the RTSTRUCT does not say which series it was drawn on (same frame)
    export_case(tmp_path / "cases" / "p_mixed_unref", tmp_path / "second_u")
    for_uid = pydicom.dcmread(str(src / "p_mixed_unref" / "ct_0001.dcm")).FrameOfReferenceUID
    for f in (tmp_path / "second_u").glob("ct_*.dcm"):
        edit(f, lambda ds: setattr(ds, "FrameOfReferenceUID", for_uid))
        shutil.copy(f, src / "p_mixed_unref" / f"second_{f.name}")
    edit(src / "p_mixed_unref" / "rtstruct.dcm",
         lambda ds: delattr(ds.ReferencedFrameOfReferenceSequence[0], "RTReferencedStudySequence"))
    # an RTSTRUCT on another frame of reference

    def other_frame(ds):
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4.5.6.7"
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = "1.2.3.4.5.6.7"
    edit(src / "p_for" / "rtstruct.dcm", other_frame)
    # an RTDOSE without DoseGridScaling
    edit(src / "p_noscale" / "rtdose.dcm", lambda ds: delattr(ds, "DoseGridScaling"))
    # a plan with no beams
    edit(src / "p_nobeams" / "rtplan.dcm", lambda ds: delattr(ds, "BeamSequence"))
    return src


def test_each_bad_input_gets_one_line_and_the_rest_is_imported(tmp_path, make_case, capsys):
    src = _build(tmp_path, make_case)
    out_dir = tmp_path / "imported"
    code = main(["data", "import-dicom", str(src), str(out_dir)])
    captured = capsys.readouterr()
    assert code == 1  # some patients skipped
    assert "Traceback" not in captured.out + captured.err
    blocks = _blocks(captured.out)
    skipped = {
        "p_gap": ("ct_0009.dcm", "non-uniform slice spacing", "missing slice?"),
        "p_tilt": ("ct_0001.dcm", "gantry tilt"),
        "p_mixed_unref": ("rtstruct.dcm", "2 CT series found"),
        "p_for": ("rtstruct.dcm", "frame of reference 1.2.3.4.5.6.7", "not in the CT's coordinates"),
        "p_nobeams": ("rtplan.dcm", "plan has no beams"),
    }
    for name, needles in skipped.items():
        assert len(blocks[name]) == 1, blocks[name]
        line = blocks[name][0]
        assert "SKIPPED" in line and all(n in line for n in needles), line
    assert len(blocks["p_good"]) == 1 and "imported" in blocks["p_good"][0]
    assert len(blocks["p_mixed"]) == 2 and "not used: the structures were drawn on series" in blocks["p_mixed"][1]
    assert len(blocks["p_noscale"]) == 2 and "imported" in blocks["p_noscale"][0]
    assert "rtdose.dcm: DoseGridScaling missing" in blocks["p_noscale"][1] and "dose not imported" in blocks["p_noscale"][1]
    lines = captured.out.splitlines()
    assert any(ln.startswith("ignored 3 non-DICOM file(s): ") and "notes.txt" in ln for ln in lines)
    assert lines[-1].startswith(f"imported 3 of 8 patient(s) into {out_dir}; 5 skipped")
    # nothing else lost: the good ones are complete and valid
    assert sorted(p.name for p in out_dir.iterdir()) == ["p_good", "p_mixed", "p_noscale"]
    assert load_case(out_dir / "p_noscale").dose is None
    good, orig = load_case(out_dir / "p_good"), load_case(tmp_path / "cases" / "p_good")
    assert np.array_equal(good.array("ct"), orig.array("ct")) and good.dose is not None
    assert main(["data", "check", str(out_dir)]) == 0


def test_no_dicom_at_all_is_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    assert main(["data", "import-dicom", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.count("\n") == 0 and "no DICOM CT/RTSTRUCT/RTPLAN/RTDOSE files found (1 non-DICOM file(s)" in err
    assert main(["data", "import-dicom", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_truncated_ct_slice_is_one_line(tmp_path, make_case, capsys):
    export_case(make_case(tmp_path / "cases", name="p_trunc"), tmp_path / "tps" / "p_trunc")
    f = tmp_path / "tps" / "p_trunc" / "ct_0005.dcm"
    f.write_bytes(f.read_bytes()[:-300])
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "out")]) == 1
    block = _blocks(capsys.readouterr().out)["p_trunc"]
    assert len(block) == 1 and "SKIPPED" in block[0] and "ct_0005.dcm" in block[0] and "pixel data" in block[0]
