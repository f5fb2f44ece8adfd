"""Checks on what a site sends back, before anything is aggregated (pure functions, no Flower).

A reply is accepted only if its weights are exactly what the server sent out (the same array
names, shapes and dtypes on the wire), every value is finite, and it claims a plausible number
of training cases (``check_count``; the count is then bounded by the site's first declaration,
``bounded_count``). Among the accepted replies of a round, an update (site weights minus the
global weights sent) whose L2 norm exceeds ``multiple`` times the round's median norm is
rejected too: a broken or hostile site cannot drag the global model far in one round.
The median test needs at least three updates to mean anything (with two, the median is their
mean); with fewer it is skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_UPDATES_FOR_NORM_CHECK = 3


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


def spec_of(arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
    """The names, shapes and dtypes a reply must match (of the arrays the server sent)."""
    return {k: ArraySpec(tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in arrays.items()}


def check_reply(arrays: dict[str, np.ndarray], num_examples, spec: dict[str, ArraySpec],
                max_num_examples: int) -> str | None:
    """None if the reply may be aggregated, else the reason it may not (one line)."""
    return check_arrays(arrays, spec) or check_count(num_examples, max_num_examples)


def check_arrays(arrays: dict[str, np.ndarray], spec: dict[str, ArraySpec]) -> str | None:
    """None if ``arrays`` are exactly the model's (names, shapes, dtypes, finite), else why not."""
    missing = sorted(set(spec) - set(arrays))
    extra = sorted(set(arrays) - set(spec))
    if missing or extra:
        parts = ([f"missing {len(missing)} array(s) ({', '.join(missing[:3])})"] if missing else []) + \
                ([f"unexpected array(s) {', '.join(extra[:3])}"] if extra else [])
        return "wrong parameter names: " + "; ".join(parts)
    for k, want in spec.items():
        v = np.asarray(arrays[k])
        if tuple(v.shape) != want.shape:
            return f"{k}: shape {tuple(v.shape)}, expected {want.shape}"
        if str(v.dtype) != want.dtype:
            return f"{k}: dtype {v.dtype}, expected {want.dtype}"
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad = int(v.size - np.isfinite(v).sum())
            return f"{k}: {bad} non-finite value(s) (NaN/inf)"
    return None


def check_count(num_examples, max_num_examples: int, minimum: int = 1, key: str = "num-examples") -> str | None:
    """None if ``num_examples`` is a whole number in [``minimum``, ``max_num_examples``], else why not."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float, np.integer, np.floating)):
        return f"{key} is not a number ({str(num_examples)[:40]!r})"
    n = float(num_examples)
    if not math.isfinite(n) or n < minimum or n != int(n):
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        return f"{key} must be {what}, got {num_examples!r}"
    if n > max_num_examples:
        return f"{key} {int(n)} exceeds the configured maximum {max_num_examples} (max-num-examples)"
    return None


def bounded_count(claimed: int, declared: int | None) -> int:
    """The example count a site is weighted by: what it claims now, at most what it declared at
    its first accepted round (``declared``; None: this is that round). A site whose data grew
    mid-run is under-weighted; one that lies after round 1 cannot take the aggregate over."""
    return claimed if declared is None else min(claimed, declared)


def update_norm(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> float:
    """L2 norm of ``new - old`` over every floating-point array (float64 accumulation)."""
    total = 0.0
    for k, v in old.items():
        a = np.asarray(v)
        if a.dtype.kind != "f":
            continue
        d = np.asarray(new[k], dtype=np.float64) - a.astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def norm_outliers(norms: dict[str, float], multiple: float) -> dict[str, str]:
    """``{site: reason}`` for updates whose norm exceeds ``multiple`` x the median of the round
    (``multiple`` 0: off; fewer than three updates: nothing to compare with)."""
    if multiple <= 0 or len(norms) < MIN_UPDATES_FOR_NORM_CHECK:
        return {}
    med = float(np.median(list(norms.values())))
    if med <= 0.0:
        return {s: f"update norm {n:.4g} while the round's median is 0" for s, n in norms.items() if n > 0}
    limit = multiple * med
    return {s: f"update norm {n:.4g} > {multiple:g} x the round's median {med:.4g} (update-norm-multiple)"
            for s, n in norms.items() if n > limit}
