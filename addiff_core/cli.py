"""The ``addiff`` command line.

Every subcommand turns bad input into one clear line on stderr and exit status 2 (no
traceback); ``ADDIFF_DEBUG=1`` shows the traceback. Federation commands (``simulate``,
``server``, ``client``, ``certs``) come from the Flower glue, registered through the
``addiff.commands`` entry points of pyproject.toml (:data:`COMMAND_GROUP`): this module never
imports ``server/`` or ``client/``, and a glue module that fails to import is an error, not a
missing command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .config import ConfigError
from .errors import CaseError, CheckpointError, UserError
from .options import DDIM_STEPS_FLAGS

USER_ERRORS = (ConfigError, CaseError, CheckpointError, OSError)  # OSError: also ENOSPC, EROFS
COMMAND_GROUP = "addiff.commands"  # entry points: a callable that adds subcommands to the parser


class CommandsUnavailable(RuntimeError):
    """A registered command module (entry point of :data:`COMMAND_GROUP`) failed to load."""


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from .options import check_synth
    from .synth import write_synthetic_sites

    check_synth(args.sites, args.cases_per_site, args.size, args.seed)
    t0 = time.perf_counter()
    files = write_synthetic_sites(Path(args.out), n_sites=args.sites, cases_per_site=args.cases_per_site,
                                  size=args.size, seed=args.seed)
    print(f"wrote {args.sites} sites x {args.cases_per_site} cases ({args.size}^3) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    for f in files:
        print(f"  site file: {f}")
    return 0


def cmd_data_import_openkbp(args: argparse.Namespace) -> int:
    from .openkbp import import_openkbp

    src = Path(args.src)
    if not src.exists():
        raise UserError(f"{src}: no such folder")
    summary = import_openkbp(src, Path(args.out))
    print(summary.text(Path(args.out)))
    return 1 if summary.skipped else 0  # the others are imported; exit 1 says some patient was not


def cmd_data_import_gdp_hmm(args: argparse.Namespace) -> int:
    from .gdp_hmm.importer import import_gdp_hmm

    summary = import_gdp_hmm(Path(args.src), Path(args.out), meta=args.meta, ptv_dict=args.ptv_dict,
                             sites_by=args.sites_by, normalise_d97=args.dose == "d97")
    print(summary.text())
    if not summary.imported:
        raise UserError(f"{args.src}: no GDP-HMM plan could be imported")
    return 1 if summary.skipped else 0  # the others are imported; exit 1 says some plan was not


def cmd_data_import_dicom(args: argparse.Namespace) -> int:
    from .dicom.mapping import load_mapping
    from .dicom.reader import import_dicom

    src = Path(args.src)
    if not src.exists():
        raise UserError(f"{src}: no such folder")
    summary = import_dicom(src, Path(args.out), load_mapping(args.map))
    if not summary.results:
        raise UserError(f"{src}: no DICOM CT/RTSTRUCT/RTPLAN/RTDOSE files found "
                        f"({len(summary.non_dicom)} non-DICOM file(s), {len(summary.unused)} other DICOM object(s))")
    return 1 if summary.skipped else 0  # the others are imported; exit 1 says some patient was not


def cmd_data_export_dicom(args: argparse.Namespace) -> int:
    from .dicom.writer import export_case

    try:
        written = export_case(Path(args.case), Path(args.out), uid_root=args.uid_root)
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None
    n_ct = len(list(Path(args.out).glob("ct_*.dcm")))
    print(f"wrote {n_ct} CT slice(s), " + ", ".join(p.name for k, p in written.items() if k != "ct") + f" to {args.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .checks import HIDDEN_CASE, check_dataset

    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    n_cases, problems = check_dataset(root)
    for p in problems:
        print(str(p))
    hidden = [p for p in problems if p.message == HIDDEN_CASE]  # named above, but never checked: not a case
    found = [p for p in problems if p.message != HIDDEN_CASE]
    print(f"{n_cases} case(s) checked, {len({p.case for p in found})} with problems ({len(found)} problem(s))"
          + (f"; {len(hidden)} hidden folder(s) not read" if hidden else ""))
    if n_cases == 0:
        print(f"{root}: no case folders found (a case folder holds plan.yaml and/or ct.nii.gz)", file=sys.stderr)
        return 1
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------
# local training / prediction
# ------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .local import train_site
    from .options import check_options, check_steps

    check_options(args, "--vae-epochs", "--diffusion-epochs")
    check_steps("--steps", args.steps)
    summary = train_site(Path(args.site), Path(args.out), model_kind=args.model,
                         model_config=Path(args.config) if args.config else None,
                         vae_epochs=args.vae_epochs, diffusion_epochs=args.diffusion_epochs,
                         steps=args.steps, progress=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary["heldout"]["mean"], indent=2))
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['metrics_file']}\nreport:     {summary['report']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .case_io import hidden_case_dirs, is_case_dir, list_cases
    from .dicom.writer import dose_grid_option
    from .predict import predict_case, predict_folder

    grid_mm = dose_grid_option(args.rtdose_grid)
    folder = Path(args.case)
    if is_case_dir(folder) or not folder.is_dir() or not (list_cases(folder) or hidden_case_dirs(folder)):
        # one case (checked as such)
        out = predict_case(Path(args.checkpoint), Path(args.case), Path(args.out), samples=args.samples,
                           steps=args.steps, seed=args.seed, device=args.device, overwrite=args.overwrite,
                           rtdose=args.rtdose, force=args.force, rtdose_grid_mm=grid_mm)
        for k, v in out.items():
            print(f"{k}: {v}")
        return 0

    def progress(name, pred, error) -> None:  # one line per case: a folder of cases can take minutes
        if error:
            print(f"{name}: FAILED: {error}", flush=True)
        else:
            print(f"{name}: {pred.total_seconds:.2f} s -> {Path(pred.written['dose']).parent}", flush=True)

    done, failed, hidden = predict_folder(Path(args.checkpoint), Path(args.case), Path(args.out),
                                          samples=args.samples, steps=args.steps, seed=args.seed, device=args.device,
                                          overwrite=args.overwrite, rtdose=args.rtdose, force=args.force,
                                          on_case=progress, rtdose_grid_mm=grid_mm)
    for name in hidden:  # never silently left out
        print(f"{name}: skipped: hidden folder (its name starts with '.'); rename it without the '.' to predict it")
    print(f"predicted {len(done)} case(s) into {args.out}" + (f"; {len(failed)} failed" if failed else "")
          + (f"; {len(hidden)} hidden folder(s) skipped" if hidden else ""))
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import load_site_config
    from .formats import json_safe
    from .local import evaluate_checkpoint
    from .options import check_options, check_steps
    from .outputs import check_output_file, write_output_bytes

    check_steps("--steps", args.steps)
    check_options(args, "--seed")
    if args.out:
        check_output_file(Path(args.out), overwrite=args.overwrite,
                          data_dirs=(load_site_config(Path(args.site)).data_dir,))
    res = evaluate_checkpoint(Path(args.checkpoint), Path(args.site), steps=args.steps, seed=args.seed)
    if not res.get("num_cases"):
        raise UserError(f"{args.site}: no usable held-out case to evaluate on (heldout: in the site file)")
    print(json.dumps(json_safe(res["mean"]), indent=2))
    if args.out:
        try:
            write_output_bytes(Path(args.out), json.dumps(json_safe(res), indent=2, allow_nan=False).encode(),
                               overwrite=args.overwrite)
        except OSError as e:
            raise UserError(f"{args.out}: cannot write ({e.strerror}); the results are printed above") from None
        print(f"written: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .run_folder import MARKERS, RunFolder

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not RunFolder(run_dir).looks_like_run():
        raise UserError(f"{run_dir}: not a run folder (none of {', '.join(MARKERS)})")
    for f in args.site or []:
        if not Path(f).is_file():
            raise UserError(f"{f}: site file not found")
    path = write_report(run_dir, site_files=[Path(f) for f in args.site] if args.site else None,
                        figures=not args.no_figures)
    print(f"report: {path}\nhtml:   {path.with_suffix('.html')}")
    return 0


# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="addiff", description="addiff-fl: federated ADDiff-Dose dose prediction")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_train_command(sub)
    _add_predict_command(sub)
    _add_evaluate_command(sub)
    _add_report_command(sub)
    add_registered_commands(sub)
    return p


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="make, import and check case data")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = dsub.add_parser("synth", help="write non-IID synthetic hospitals (phantoms + beam-model dose) and site files")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--cases-per-site", type=int, default=8)
    s.add_argument("--size", type=int, default=32, help="grid size (voxels per axis)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)
    s = dsub.add_parser("import-openkbp", help="convert OpenKBP patient folders (sparse CSV) to the case format; "
                        "a bad patient is skipped with its reason (exit 1), the others are imported")
    s.add_argument("src", help="a patient folder, a folder of patients, or the dataset's folder of splits "
                               "(provided-data: train-pats/, validation-pats/, test-pats/)")
    s.add_argument("out", help="data folder; split folders are kept (OUT/train-pats/pt_1)")
    s.set_defaults(func=cmd_data_import_openkbp)
    s = dsub.add_parser("import-gdp-hmm", help="convert GDP-HMM challenge plans (.npz) to case folders with one site "
                        "file per cohort (institution); a bad plan is skipped with its reason (exit 1)")
    s.add_argument("src", help="a folder of .npz plans (searched recursively) or one .npz")
    s.add_argument("out", help="output folder: OUT/<site>.yaml and OUT/<site>/cases/<plan>/")
    s.add_argument("--meta", help="meta_data.csv (default: SRC/ or SRC/meta_files/)")
    s.add_argument("--ptv-dict", help="PTV_DICT.json, the prescriptions (default: SRC/ or SRC/meta_files/)")
    s.add_argument("--sites-by", choices=("cohort", "site", "none"), default=None,
                   help="one site file per cohort (institution; default with meta_data.csv), per tumour site, "
                        "or one for all (default without)")
    s.add_argument("--dose", choices=("d97", "raw"), default="d97",
                   help="d97: the dose as the challenge trains and scores it (D97 of PTV-High = its PDose); "
                        "raw: dose x dose_scale as planned")
    s.set_defaults(func=cmd_data_import_gdp_hmm)
    s = dsub.add_parser("import-dicom", help="convert DICOM-RT exports (CT, RTSTRUCT, RTPLAN, RTDOSE) to case folders, "
                        "one per patient; a bad patient is skipped with its reason (exit 1), the others are imported")
    s.add_argument("src", help="a folder with one sub-folder per patient, or one patient folder; files are found "
                               "by content")
    s.add_argument("out", help="data folder for the case folders")
    s.add_argument("--map", help="mapping file: structure names, tumour site, prescriptions/fractions where the "
                                 "plan has none (see addiff_core/dicom/mapping.py)")
    s.set_defaults(func=cmd_data_import_dicom)
    s = dsub.add_parser("export-dicom", help="write a case as DICOM-RT: CT series, RTSTRUCT, RTPLAN, RTDOSE")
    s.add_argument("case")
    s.add_argument("out", help="output folder (empty or new)")
    s.add_argument("--uid-root", help="your registered UID root ending in '.', e.g. 1.2.3.4. (default: 2.25. "
                                      "UUID-based, or $ADDIFF_UID_ROOT)")
    s.set_defaults(func=cmd_data_export_dicom)
    s = dsub.add_parser("check", help="validate every case under DIR; non-zero exit if any is bad")
    s.add_argument("dir")
    s.set_defaults(func=cmd_data_check)


def _add_train_command(sub) -> None:
    s = sub.add_parser("train", help="train on one site's cases (no federation) and evaluate on its held-out cohort")
    s.add_argument("--site", required=True, help="site file (sites/NAME.yaml)")
    s.add_argument("--out", required=True, help="run folder for checkpoint and metrics")
    s.add_argument("--model", choices=("diffusion", "unet"), default=None, help="override the model kind")
    s.add_argument("--config", help="model config YAML (default: the site file's model section)")
    s.add_argument("--vae-epochs", type=int, default=None)
    s.add_argument("--diffusion-epochs", type=int, default=None, help="epochs of stage 2 (or of the U-Net)")
    s.add_argument(*DDIM_STEPS_FLAGS, dest="steps", type=int, default=None, help="DDIM steps for evaluation")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--overwrite", action="store_true", help="replace the model.pt of an earlier run in --out")
    s.set_defaults(func=cmd_train)


def _add_predict_command(sub) -> None:
    s = sub.add_parser("predict", help="predict the dose of one case or a folder of cases (Gy, on the CT grid) with DVH tables")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--case", required=True, help="case folder (a reference dose is not needed), or a folder of case "
                                                 "folders: each goes to OUT/<case>/, the model loaded once")
    s.add_argument("--out", required=True)
    s.add_argument("--samples", type=int, default=1, help="several samples (at most 100): mean dose + uncertainty map")
    s.add_argument(*DDIM_STEPS_FLAGS, dest="steps", type=int, default=None,
                   help="DDIM steps (default: the model config's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out")
    s.add_argument("--rtdose", action="store_true", help="also write OUT/rtdose.dcm: the prediction as a DICOM RTDOSE "
                                                         "on the case's frame of reference")
    s.add_argument("--rtdose-grid", default="2.5", help="the RTDOSE's dose grid: a spacing in mm (default 2.5, over "
                                                        "the dose) or 'ct' for the CT's own grid")
    s.add_argument("--force", action="store_true", help="write an implausible prediction too (a maximum above 2 x the "
                                                        "highest prescription + 10 Gy, or no dose in the targets): "
                                                        "research use only")
    s.set_defaults(func=cmd_predict)


def _add_evaluate_command(sub) -> None:
    s = sub.add_parser("evaluate", help="metrics of a checkpoint on a site's held-out cohort")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--site", required=True)
    s.add_argument(*DDIM_STEPS_FLAGS, dest="steps", type=int, default=None,
                   help="DDIM steps (default: the model config's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="write the full result (per case) as JSON")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=cmd_evaluate)


def _add_report_command(sub) -> None:
    s = sub.add_parser("report", help="write RUN_DIR/report/report.md (+ .html, figures) for a run folder",
                       description="Run summary, training curves, the per-site held-out table, a comparison "
                                   "(RUN_DIR/comparison.json) and, for sites whose data is reachable here, dose "
                                   "slices and DVHs of one held-out case. Works for federated and `addiff train` "
                                   "run folders.")
    s.add_argument("run_dir")
    s.add_argument("--site", action="append", metavar="SITE_FILE",
                   help="make per-site figures for this site (repeatable); default: the run's site files, where "
                        "readable. At a hospital: only its own site file (its figures stay there)")
    s.add_argument("--no-figures", action="store_true", help="Markdown/HTML only, no PNG figures")
    s.set_defaults(func=cmd_report)


def add_registered_commands(sub) -> None:
    """Let every entry point of :data:`COMMAND_GROUP` add its subcommands (the federation
    commands of ``server/`` and ``client/``, declared in pyproject.toml). One that fails to load
    raises :class:`CommandsUnavailable` naming it: a broken glue module must not turn into
    "invalid choice: simulate"."""
    seen: set[tuple[str, str]] = set()
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        try:
            register = ep.load()
        except Exception as e:  # noqa: BLE001 - re-raised with the entry point named
            raise CommandsUnavailable(f"the {ep.name!r} commands ({ep.value}) cannot be loaded: "
                                      f"{type(e).__name__}: {e}") from e
        register(sub)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CommandsUnavailable as e:
        if os.environ.get("ADDIFF_DEBUG"):
            raise
        print(f"addiff: error: {e} (ADDIFF_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (UserError, *USER_ERRORS) as e:
        if os.environ.get("ADDIFF_DEBUG"):
            raise
        print(f"addiff: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("addiff: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The message of a user error; an OSError as ``FILE: reason``."""
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
