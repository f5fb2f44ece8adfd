"""A site's cases: the held-out split and an in-memory dataset of model-grid samples.

Bad cases never stop a site: they are skipped, and the reason is kept (``SiteData.skipped``) so
that the site can report how many it skipped and why. Only when nothing usable is left does
loading fail, with a message naming the site and the first reasons.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .case_io import hidden_case_dirs, list_cases, load_case
from .errors import CaseError
from .checks import HIDDEN_CASE, check_case
from .config import ConfigError, GridConfig, HeldOutConfig, SiteConfig
from .preprocessing import GridSpec, case_to_sample

log = logging.getLogger(__name__)
# messages naming a case (a case folder may be named after the patient): the federated ClientApp
# sends this logger to the site's own log file only
case_log = logging.getLogger(__name__ + ".cases")


def split_case_ids(case_ids: list[str], heldout: HeldOutConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) ids. Explicit ids win; else a seeded draw of round(fraction * n) cases.

    The draw depends only on the sorted ids and the seed, so every run (and every restart) of a
    site sees the same split, and held-out cases never enter training.
    """
    ids = sorted(case_ids)
    if heldout.case_ids is not None:
        held = [i for i in ids if i in set(heldout.case_ids)]
    else:
        n_held = int(round((heldout.fraction or 0.0) * len(ids)))
        if heldout.fraction and len(ids) >= 2:
            n_held = min(max(n_held, 1), len(ids) - 1)
        rng = np.random.default_rng(heldout.seed)
        held = sorted(rng.permutation(ids)[:n_held].tolist()) if n_held else []
    train = [i for i in ids if i not in set(held)]
    return train, held


class SampleDataset(Dataset):
    """Preprocessed samples (dicts of tensors) held in memory; ``specs``/``cases`` keep geometry."""

    def __init__(self, samples: list[dict[str, torch.Tensor]], specs: list[GridSpec], case_ids: list[str],
                 case_dirs: list[Path]):
        self.samples, self.specs, self.case_ids, self.case_dirs = samples, specs, case_ids, case_dirs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


@dataclass
class SiteData:
    train: SampleDataset
    heldout: SampleDataset
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> reason

    @property
    def num_train(self) -> int:
        return len(self.train)


def load_samples(case_dirs: list[Path], grid: GridConfig, require_dose: bool = True,
                 skipped: dict[str, str] | None = None) -> SampleDataset:
    """The cases of ``case_dirs`` as samples on ``grid`` (each checked first, ``checks.check_case``).

    Args:
        require_dose: a case without ``dose.nii.gz`` is a problem (False: prediction inputs).
        skipped: a failing case goes here (case id -> "file: problem") instead of raising.

    Raises:
        CaseError: a case fails its check or load and ``skipped`` is None.
    """
    samples, specs, ids, dirs = [], [], [], []
    for d in case_dirs:
        images: dict = {}  # what the check reads, the loader takes instead of reading it again
        problems = [p for p in check_case(d, images) if require_dose or p.file != "dose.nii.gz"]
        try:
            if problems:
                raise CaseError(d, problems[0].file, problems[0].message
                                + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
            case = load_case(d, require_dose=require_dose, images=images)
            sample, spec = case_to_sample(case, grid)
        except CaseError as e:
            if skipped is None:
                raise
            skipped[Path(d).name] = f"{e.file}: {e.problem}"
            case_log.warning("skipping case %s: %s: %s", Path(d).name, e.file, e.problem)
            continue
        samples.append(sample)
        specs.append(spec)
        ids.append(Path(d).name)
        dirs.append(Path(d))
    return SampleDataset(samples, specs, ids, dirs)


def load_site_data(site: SiteConfig, grid: GridConfig | None = None) -> SiteData:
    """Load a site's own cases: training and held-out samples on the model grid.

    Every case is validated with ``checks.check_case`` first; a case with any problem is skipped
    (reason kept in ``SiteData.skipped``) so that one broken export never stops a hospital.
    """
    grid = grid or site.model.grid
    if not site.data_dir.is_dir():
        raise ConfigError(f"{site.source or site.name}: data_dir {site.data_dir} does not exist")
    dirs = list_cases(site.data_dir)
    skipped: dict[str, str] = {h.name: HIDDEN_CASE for h in hidden_case_dirs(site.data_dir)}
    for name in skipped:  # said, never silently left out
        case_log.warning("skipping case %s: %s", name, HIDDEN_CASE)
    if not dirs:
        raise ConfigError(f"{site.source or site.name}: no case folders found in {site.data_dir}"
                          + (f" ({len(skipped)} hidden folder(s) skipped: names starting with '.')" if skipped else ""))
    by_id = {d.name: d for d in dirs}
    if site.heldout.case_ids is not None:
        missing = [i for i in site.heldout.case_ids if i not in by_id]
        if missing:
            raise ConfigError(f"{site.source or site.name}: heldout.case_ids names cases not in {site.data_dir}: "
                              f"{', '.join(missing)}")
    train_ids, held_ids = split_case_ids(list(by_id), site.heldout)
    train = load_samples([by_id[i] for i in train_ids], grid, True, skipped)
    held = load_samples([by_id[i] for i in held_ids], grid, True, skipped)
    if len(train) == 0:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise ConfigError(f"site {site.name}: no usable training case in {site.data_dir}"
                          + (f" ({len(skipped)} skipped: {reasons})" if skipped else ""))
    return SiteData(train=train, heldout=held, skipped=skipped)
