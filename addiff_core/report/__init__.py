"""``addiff report RUN_DIR``: a report a physicist can read in a minute.

Writes ``RUN_DIR/report/report.md``, the same as ``report.html`` (a built-in renderer) and
``figures/*.png``: 1. run summary (status, strategy, stages, sites, DP spent); 2. training loss
per round per site and stage; 3. held-out results of the final model per site and all sites;
4. a comparison, when ``RUN_DIR/comparison.json`` exists::

    {"metric": "mae_gy",                                   # optional
     "series": {"federated": {"hospital_a": 3.1}, "local": {...}, "pooled": {...}},
     "note": "shown under the table"}                      # optional; a value may be {metric: v}

5. per-site figures (slices, DVH, the sample std beside the error) of the first held-out case of
each site whose site file is readable here: the server holds no patient data, so in a real
deployment the sites draw them (``addiff report RUN_DIR --site sites/x.yaml``). A single-site
``addiff train`` folder gets the same report. Nothing here raises for missing or broken inputs:
each section says what is missing.

Modules: ``document`` (Markdown/HTML), ``run_data`` (the run folder, read defensively), ``context``,
``sections``, ``site_figures``, ``writer`` (the list of sections).
"""
from __future__ import annotations

from ..run_folder import COMPARISON as COMPARISON_FILE
from ..run_folder import FIGURES_DIR as FIG_DIR
from ..run_folder import REPORT_DIR
from .document import Doc
from .run_data import RunData, load_run
from .sections import KEY_COLUMNS, METRIC_LEGEND
from .site_figures import MAX_OARS_IN_DVH, load_report_model
from .writer import SECTIONS, write_report, write_report_safely

__all__ = ["COMPARISON_FILE", "FIG_DIR", "KEY_COLUMNS", "MAX_OARS_IN_DVH", "METRIC_LEGEND", "REPORT_DIR", "SECTIONS",
           "Doc", "RunData", "load_report_model", "load_run", "write_report",
           "write_report_safely"]
