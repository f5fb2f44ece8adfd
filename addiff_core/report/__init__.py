"""``addiff report RUN_DIR``: a report a physicist can read in a minute.

Writes ``RUN_DIR/report/report.md``, the same as ``report.html`` (a tiny built-in renderer, no
extra dependency) and ``RUN_DIR/report/figures/*.png``:

1. **Run summary**: status and dates, strategy, rounds per stage, model essentials, the sites
   (training / held-out cases, rounds taken part in, failures) and differential privacy per
   site (epsilon spent, delta).
2. **Training**: loss per round per site, one figure per stage (from ``metrics.jsonl``
   ``"train"`` records; the weighted aggregate of the ``"round"`` records as a dashed line),
   and a per-stage summary table (rounds, loss first -> last, bytes on the wire, time).
3. **Held-out results**: the final global model on each site's held-out cases (from
   ``final_metrics.json``, else ``final_metrics.csv``, else the ``"final"`` records of
   ``metrics.jsonl``) with the key columns, a case-weighted "all sites" row and a bar chart of
   MAE per site.
4. **Comparison** (when ``RUN_DIR/comparison.json`` exists): federated vs. each site trained
   alone vs. pooled training. Format::

       {"metric": "mae_gy",                       # optional, default "mae_gy"
        "series": {"federated": {"hospital_a": 3.1, ...},   # optional: taken from the final table
                   "local":     {"hospital_a": 3.9, ...},   # each site trained on its own cases
                   "pooled":    {"hospital_a": 2.8, ...}},  # all cases in one place
        "note": "free text shown under the table"}         # optional

   A site value may also be a mapping of metrics (``{"mae_gy": 3.1, ...}``); ``metric`` picks one.
5. **Per-site figures**: for every site whose site file is readable here (``site_files``, else
   the run config's ``site-files``, resolved against the project folder: ``run_folder.resolve_path``),
   the final model (``final_model.pt``, else the newest valid round checkpoint) predicts the
   site's first held-out case (the same split and seed as the final evaluation); the report
   shows axial/coronal/sagittal slices of reference, predicted and difference dose on the CT,
   the DVH of targets and the most irradiated OARs, and a few DVH points; for a diffusion model
   also the voxel-wise std of ``site_figures.UNCERTAINTY_SAMPLES`` samples beside the error of
   their mean, with Spearman's rho, the mean std and the mean +- 2 std coverage (the U-Net: a
   sentence that it is deterministic). In a real deployment
   the server holds no patient data: sites without figures get a note on how to add them at
   the hospital (``addiff report RUN_DIR --site sites/x.yaml``); those figures stay there.

A single-site ``addiff train`` folder (``model.pt`` + ``metrics.json``) gets the same report
(training curves per epoch, its held-out row, its figures with ``--site``).

Nothing here raises for missing or broken inputs: each section says what is missing instead.

Modules: ``document`` (the document model, Markdown/HTML renderers, cell formats), ``run_data``
(the run folder read defensively), ``context`` (what a section gets; figures), ``sections``
(summary, training, held-out results, comparison), ``site_figures`` (the per-site figures),
``writer`` (the list of sections and ``write_report``).
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
