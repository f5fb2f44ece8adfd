"""``addiff predict``: dose prediction for cases on disk, one case or a folder of cases.

A ``Predictor`` loads and verifies a checkpoint once and then predicts any number of cases; each
prediction writes ``dose.nii.gz`` (Gy, on the case's CT grid, 0 outside the case's evaluation
region: ``regions.evaluation_region``), ``dvh.csv`` and ``dvh_curves.csv``; with ``samples > 1``
also ``dose_std.nii.gz`` (voxel-wise standard deviation, Gy, 0 outside the region too); with
``rtdose`` also ``rtdose.dcm``. Every file goes through one overwrite check (:func:`results_of`)
and is written beside its name and renamed into place (``outputs.write_output``). A prediction
that no treatment plan could give (a maximum above :func:`dose_bound`, or no dose in the
targets: an all-zero or absurd checkpoint) is refused before anything is written, unless
``force`` (``--force``, research use). Every prediction carries the seconds of its phases
(``check``, ``read``, ``preprocess``, ``model``, ``map_back``, ``write``, ``dvh``) so that a
profile of the whole path needs no second implementation (bench/predict_bench.py reads them).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch

from .case_io import CASE_DIR_RULE, hidden_case_dirs, list_cases, load_case
from .checkpoint import load_checkpoint, load_model_state
from .config import ConfigError, ModelConfig, resolve_device
from .dvh import dvh_curve, dvh_points
from .errors import CaseError, CheckpointError
from .formats import csv_text
from .models import build_model
from .options import MAX_SAMPLES, RTDOSE_GRID_MM, check_device, check_range, check_seed, check_steps
from .outputs import write_output
from .preprocessing import case_to_sample, dose_to_ct_grid
from .regions import evaluation_region, zero_outside
from .training import predict_normalised

RESULTS = ("dose.nii.gz", "dose_std.nii.gz", "dvh.csv", "dvh_curves.csv")  # + rtdose.dcm with --rtdose
RTDOSE = "rtdose.dcm"
DVH_BINS = 201
# a plausible prediction: max <= 2 x the highest prescription + 10 Gy (hot spots of real plans stay
# far below: SBRT ~1.6 x), and dose in the targets (a mean over them of at least 1 % of it)
MAX_DOSE_FACTOR, MAX_DOSE_MARGIN_GY, MIN_TARGET_FRACTION = 2.0, 10.0, 0.01


def results_of(rtdose: bool) -> tuple[str, ...]:
    """Every file a prediction may write into its output folder: the one overwrite check."""
    return RESULTS + ((RTDOSE,) if rtdose else ())


def dose_bound(rx: float) -> float:
    """The highest dose (Gy) a prediction for a plan of highest prescription ``rx`` may hold."""
    return MAX_DOSE_FACTOR * rx + MAX_DOSE_MARGIN_GY


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """Checkpoint -> (model in eval mode on ``device``, its config, its meta); weights verified."""
    state, cfg, meta = load_checkpoint(checkpoint)
    model = build_model(cfg)
    load_model_state(model, state, str(checkpoint))
    return model.to(device).eval(), cfg, meta


@dataclass
class Prediction:
    """What one prediction wrote (name -> path) and how long each phase took (seconds)."""

    written: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t0


def _check_case(case_dir: Path) -> None:
    from .checks import check_case

    problems = check_case(case_dir)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s); run 'addiff data check {case_dir}')" if len(problems) > 1 else ""
        raise CaseError(first.case, first.file, first.message + more)


def _check_inputs(case_dir: Path, sample: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in sample.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CaseError(case_dir, "plan.yaml" if bad[0] in ("beams", "constraints") else ".",
                        f"model inputs are not finite ({', '.join(bad)}): extreme values in the case")


def _write_table(path: Path, table: list[dict]) -> None:
    """A DVH table as CSV (structure names come from the case: no cell may be a formula)."""
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(path, "w", newline="") as fh:
        fh.write(csv_text(keys, table, lineterminator="\r\n"))


def check_plausible(dose: np.ndarray, case, checkpoint: Path, case_dir: Path) -> None:
    """Refuse (CheckpointError, one line) a dose (Gy, CT grid) no plan of this case could give:
    a maximum above :func:`dose_bound`, or targets that get (almost) nothing."""
    rx = float(case.plan.max_prescription)
    dmax, bound = float(dose.max()), dose_bound(rx)
    tail = "; nothing written (--force writes it anyway, for research use)"
    if dmax > bound:
        raise CheckpointError(f"{checkpoint}: an implausible model: it predicts up to {dmax:.4g} Gy for {case_dir}, "
                              f"above {bound:.4g} Gy ({MAX_DOSE_FACTOR:g} x the highest prescription {rx:g} Gy + "
                              f"{MAX_DOSE_MARGIN_GY:g} Gy){tail}")
    names = [n for n in case.plan.prescriptions if n in case.masks]
    if not names:
        return
    targets = np.zeros(dose.shape, bool)
    for n in names:
        targets |= case.array(n).astype(bool)
    if targets.any() and float(dose[targets].mean()) < MIN_TARGET_FRACTION * rx:
        raise CheckpointError(f"{checkpoint}: an implausible model: the targets of {case_dir} ({', '.join(names)}) get "
                              f"a mean of {float(dose[targets].mean()):.3g} Gy, under {100 * MIN_TARGET_FRACTION:g} % "
                              f"of the prescription {rx:g} Gy{tail}")


def dvh_tables(case, dose: np.ndarray) -> tuple[list[dict], list[dict]]:
    """DVH points per structure and the cumulative DVH curves (``DVH_BINS`` dose bins)."""
    vcc = case.voxel_volume_cc
    rx = case.plan.max_prescription
    bins = np.linspace(0.0, max(float(dose.max()), rx) * 1.1, DVH_BINS)
    rows, curves = [], []
    for name in sorted(case.masks):
        m = case.array(name)
        if not m.any():
            continue
        pts = dvh_points(dose, m, vcc, is_target=name in case.plan.prescriptions)
        rows.append({"structure": name, "volume_cc": float(m.sum() * vcc), **{k: round(float(v), 3) for k, v in pts.items()}})
        axis, frac = dvh_curve(dose, m, bins)
        curves.extend({"structure": name, "dose_gy": round(float(d), 3), "volume_pct": round(100 * float(f), 3)}
                      for d, f in zip(axis, frac))
    return rows, curves


class Predictor:
    """A checkpoint loaded once; ``predict`` writes one case's prediction."""

    def __init__(self, checkpoint: Path, device: str = "auto") -> None:
        check_device("--device", device)
        self.checkpoint = Path(checkpoint)
        self.device = resolve_device(device)
        t0 = time.perf_counter()
        self.model, self.cfg, self.meta = load_model(self.checkpoint, self.device)
        self.load_seconds = time.perf_counter() - t0

    def predict(self, case_dir: Path, out_dir: Path, *, samples: int = 1, steps: int | None = None, seed: int = 0,
                overwrite: bool = False, rtdose: bool = False, force: bool = False,
                rtdose_grid_mm: float | None = RTDOSE_GRID_MM) -> Prediction:
        """Predict one case into ``out_dir`` (see the module docstring); ``force``: write an
        implausible prediction too; ``rtdose_grid_mm``: the RTDOSE's grid spacing (None: the CT grid)."""
        from .outputs import check_output_dir, data_folder_of, ensure_writable_dir

        check_options(samples, steps, seed, self.cfg)
        case_dir, out_dir = Path(case_dir), Path(out_dir)
        results = results_of(rtdose)
        check_output_dir(out_dir, results=results, overwrite=overwrite, data_dirs=(case_dir, data_folder_of(case_dir)))
        sec: dict[str, float] = {}
        with _timed(sec, "check"):
            _check_case(case_dir)
        with _timed(sec, "read"):
            case = load_case(case_dir)
        with _timed(sec, "preprocess"):
            sample, spec = case_to_sample(case, self.cfg.grid, with_dose=False)  # the output needs no reference dose
            _check_inputs(case_dir, sample)
            batch = {k: v[None].to(self.device) for k, v in sample.items()}
        with _timed(sec, "model"):
            mean, std = predict_normalised(self.model, batch, self.cfg, steps=steps, seed=seed, num_samples=samples)
            if not bool(torch.isfinite(mean).all()) or (std is not None and not bool(torch.isfinite(std).all())):
                raise CheckpointError(f"{self.checkpoint}: the model's prediction for {case_dir} is not finite "
                                      "(NaN/inf); nothing written")
        rx = case.plan.max_prescription
        with _timed(sec, "map_back"):
            region = evaluation_region(case)  # OpenKBP-style: the written prediction is 0 outside the region
            dose_img = zero_outside(dose_to_ct_grid(mean[0, 0], rx, spec, case.ct), region)
            std_img = None if std is None else zero_outside(dose_to_ct_grid(std[0, 0], rx, spec, case.ct), region)
            dose_arr = sitk.GetArrayViewFromImage(dose_img)
            if not force:
                check_plausible(dose_arr, case, self.checkpoint, case_dir)
        out_dir = ensure_writable_dir(out_dir)
        written: dict[str, str] = {}

        def put(key: str, name: str, write) -> None:  # every file: one overwrite rule, never through a link
            written[key] = str(write_output(out_dir / name, write, overwrite=overwrite))

        with _timed(sec, "write"):
            put("dose", "dose.nii.gz", lambda tmp: self._write_image(dose_img, tmp))
            if std_img is not None:
                put("uncertainty", "dose_std.nii.gz", lambda tmp: self._write_image(std_img, tmp))
            if rtdose:
                from .dicom.writer import write_predicted_rtdose

                put("rtdose", RTDOSE, lambda tmp: write_predicted_rtdose(dose_img, case_dir, tmp, grid_mm=rtdose_grid_mm))
        with _timed(sec, "dvh"):
            rows, curves = dvh_tables(case, dose_arr)
            for fname, table in (("dvh.csv", rows), ("dvh_curves.csv", curves)):
                if table:
                    put(fname.split(".")[0], fname, lambda tmp, table=table: _write_table(tmp, table))
        return Prediction(written, sec)

    @staticmethod
    def _write_image(img: sitk.Image, path: Path) -> str:
        sitk.WriteImage(img, str(path), useCompression=True)
        return str(path)


def check_options(samples: int, steps: int | None, seed: int, cfg: ModelConfig | None = None) -> None:
    """``--samples``, ``--steps`` (against the model when known) and ``--seed``: one line each."""
    check_range("--samples", samples, 1, MAX_SAMPLES, "each sample is a whole DDIM pass")
    check_steps("--steps", steps, cfg)
    check_seed("--seed", seed)


def predict_case(checkpoint: Path, case_dir: Path, out_dir: Path, *, samples: int = 1, steps: int | None = None,
                 seed: int = 0, device: str = "auto", overwrite: bool = False, rtdose: bool = False,
                 force: bool = False, rtdose_grid_mm: float | None = RTDOSE_GRID_MM) -> dict[str, str]:
    """One case: load the checkpoint, predict, write (see the module docstring). Returns the
    written files and ``seconds`` (model time, as before) for the command line."""
    from .outputs import check_output_dir, data_folder_of

    check_options(samples, steps, seed)
    check_device("--device", device)
    check_output_dir(Path(out_dir), results=results_of(rtdose), overwrite=overwrite,
                     data_dirs=(Path(case_dir), data_folder_of(Path(case_dir))))
    pred = Predictor(checkpoint, device).predict(case_dir, out_dir, samples=samples, steps=steps, seed=seed,
                                                 overwrite=overwrite, rtdose=rtdose, force=force,
                                                 rtdose_grid_mm=rtdose_grid_mm)
    return {**pred.written, "seconds": f"{pred.seconds['model']:.2f}"}


def predict_folder(checkpoint: Path, cases_root: Path, out_root: Path, *, samples: int = 1, steps: int | None = None,
                   seed: int = 0, device: str = "auto", overwrite: bool = False, rtdose: bool = False,
                   force: bool = False, on_case=None, rtdose_grid_mm: float | None = RTDOSE_GRID_MM
                   ) -> tuple[dict[str, Prediction], dict[str, str], list[str]]:
    """Every case folder directly under ``cases_root`` (``case_io.list_cases``, the rule of
    training and ``data check``) -> ``out_root/<case>/``, the model loaded once. A case that
    fails is reported (case -> one-line reason) and the others go on. Returns (predictions,
    failures, hidden folders skipped: names starting with '.', never predicted).
    ``on_case(name, prediction_or_None, error_or_None)`` is called after each case."""
    check_options(samples, steps, seed)
    check_device("--device", device)
    cases, hidden = list_cases(cases_root), [h.name for h in hidden_case_dirs(cases_root)]
    if not cases:
        raise ConfigError(f"{cases_root}: no case folder ({CASE_DIR_RULE}) directly under it"
                          + (f"; {len(hidden)} hidden folder(s) skipped: {', '.join(hidden)}" if hidden else ""))
    if Path(out_root).resolve() == Path(cases_root).resolve() or Path(out_root).resolve().is_relative_to(Path(cases_root).resolve()):
        raise ConfigError(f"{out_root}: the output folder must not be inside the cases folder {cases_root}")
    predictor = Predictor(checkpoint, device)
    check_options(samples, steps, seed, predictor.cfg)
    done: dict[str, Prediction] = {}
    failed: dict[str, str] = {}
    for case_dir in cases:
        try:
            done[case_dir.name] = predictor.predict(case_dir, Path(out_root) / case_dir.name, samples=samples,
                                                    steps=steps, seed=seed, overwrite=overwrite, rtdose=rtdose,
                                                    force=force, rtdose_grid_mm=rtdose_grid_mm)
        except (CaseError, ConfigError, CheckpointError) as e:
            failed[case_dir.name] = str(e)
        if on_case:
            on_case(case_dir.name, done.get(case_dir.name), failed.get(case_dir.name))
    return done, failed, hidden
