"""Issue #28, point 6: the final table ``addiff simulate`` prints fits a terminal (the files keep
every column)."""
from __future__ import annotations

from addiff_core.site_table import csv_text
from server.final_table import TERMINAL_COLUMNS, terminal_table

# the 19 numeric columns a site's final evaluation returns (final_metrics.csv of a demo run)
METRICS = ("mae_gy", "mae_pct_rx", "openkbp_dose_score", "openkbp_dvh_score", "dvh_cells", "hi_pred", "ci_rtog_pred",
           "paddick_ci_pred", "hi_ref", "ci_rtog_ref", "paddick_ci_ref", "mean_isodose_dice",
           "spinal_cord_dmax_err_gy", "gamma_pass_rate", "constraint_compliance_pred", "constraint_compliance_ref",
           "mae_zero_dose_gy", "dp_enabled")


def _rows() -> list[dict]:
    out = []
    for i, name in enumerate(("hospital_a", "hospital_b", "hospital_c")):
        row = {"site": name, "cases": 2, **{k: 1234.56789 / (i + 3) for k in METRICS}, "dp_enabled": float(i == 1)}
        out.append({**row, "epsilon": 7.91234, "delta": 1e-5} if i == 1 else row)
    out[0]["status"] = "ok"
    out[1]["status"] = "ok; left out in rounds 2-4"
    out[2] = {"site": "hospital_c", "cases": 0, "status": "final evaluation failed: no-usable-data"}
    return out


def test_the_printed_table_has_the_ten_columns_within_120_characters():
    rows = _rows()
    assert len(csv_text(rows, 3).splitlines()[0].split(",")) >= 21  # the file keeps every column
    text = terminal_table(rows, 3)
    lines = text.splitlines()
    assert [h.strip() for h in lines[0].split("  ") if h.strip()] == [h for h, _ in TERMINAL_COLUMNS]
    assert [h for h, _ in TERMINAL_COLUMNS] == ["site", "cases", "MAE Gy", "dose score", "DVH score", "isodose Dice",
                                                "gamma %", "constraints met", "DP", "status"]
    assert all(len(ln) <= 120 for ln in lines), max(lines, key=len)
    assert lines[4].startswith("all sites (2 of 3)")  # the all-sites row, in the 120 too
    assert "eps 7.91" in lines[2] and lines[1].split()[-1] == "ok" and lines[3].endswith("failed *")
    assert "* hospital_b: ok; left out in rounds 2-4" in text  # a long status in full below
    assert "final_metrics.csv" in lines[-1] and "report/" in lines[-1]
    assert "mae_pct_rx" not in text and "411.5" in lines[1]  # the rest only in the files


def test_no_site_with_metrics_is_one_line():
    assert terminal_table([]) == "(no site returned metrics)"
