"""Hidden folders (names starting with '.') are not cases, by one rule (``case_io.list_cases``),
and never skipped silently (issue #29, point 15, follow-up): ``data check`` counts them apart
from the cases it checked, ``predict`` on a folder of cases names them and predicts none."""
from __future__ import annotations

from addiff_core.cli import main


def test_data_check_summary_counts_hidden_folders_apart(tmp_path, make_case, capsys):
    cases = tmp_path / "cases"
    for name in ("good_0", "good_1", "..hidden_like"):
        make_case(cases, name=name)
    assert main(["data", "check", str(cases)]) == 1  # a hidden case folder is still something to fix
    out = capsys.readouterr().out.strip().splitlines()
    assert any("..hidden_like" in ln and "hidden folder" in ln for ln in out), out
    assert out[-1] == "2 case(s) checked, 0 with problems (0 problem(s)); 1 hidden folder(s) not read", out


def test_data_check_summary_with_a_bad_case_and_a_hidden_folder(tmp_path, make_case, capsys):
    cases = tmp_path / "cases"
    make_case(cases, name="good_0")
    make_case(cases, name="cgy", dose=make_case.arrays()["dose"] * 100)
    make_case(cases, name=".partial")
    assert main(["data", "check", str(cases)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("2 case(s) checked, 1 with problems (") and last.endswith("; 1 hidden folder(s) not read")


def test_predict_on_a_folder_skips_and_names_hidden_folders(tmp_path, make_case, capsys, monkeypatch):
    from helpers.predict_stub import use_rx_model

    ckpt = use_rx_model(monkeypatch)
    cases = tmp_path / "cases"
    for name in ("a", "b", ".importing-c"):
        make_case(cases, name=name)
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(cases), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["a", "b"]
    assert any(ln.startswith(".importing-c: skipped: hidden folder") for ln in out.splitlines()), out
    assert out.strip().splitlines()[-1].endswith("predicted 2 case(s) into " + str(tmp_path / "p")
                                                 + "; 1 hidden folder(s) skipped"), out


def test_predict_on_a_folder_of_only_hidden_folders_is_one_line(tmp_path, make_case, capsys, monkeypatch):
    from helpers.predict_stub import use_rx_model

    ckpt = use_rx_model(monkeypatch)
    make_case(tmp_path / "cases", name=".a")
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(tmp_path / "cases"), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 hidden folder(s) skipped: .a" in err, err
    assert not (tmp_path / "p").exists()


def test_predict_lists_cases_by_the_rule_of_training(tmp_path, make_case, monkeypatch):
    """A folder holding plan.yaml but no CT is a case (a broken one, said so), as for data check
    and training: predict on the folder fails it with its reason instead of leaving it out."""
    from helpers.predict_stub import use_rx_model

    from addiff_core.predict import predict_folder

    ckpt = use_rx_model(monkeypatch)
    cases = tmp_path / "cases"
    make_case(cases, name="a")
    make_case(cases, name="no_ct")
    (cases / "no_ct" / "ct.nii.gz").unlink()
    done, failed, hidden = predict_folder(ckpt, cases, tmp_path / "p", device="cpu")
    assert list(done) == ["a"] and list(failed) == ["no_ct"] and "ct.nii.gz" in failed["no_ct"] and hidden == []
