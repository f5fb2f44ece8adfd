"""Clinical dose-volume constraints per tumour site (pure numpy, no I/O).

A :class:`Constraint` is one line of a planning protocol: ``Dmax``/``Dmean`` <= threshold_gy;
``Vx``: the fraction receiving >= threshold_gy <= limit; ``Dmin_pct``: the dose ``limit`` of the
structure receives (:func:`addiff_core.dvh.dose_at_volume_pct`) >= threshold_gy. Structures are
:data:`addiff_core.contract.OAR_NAMES` or :data:`TARGET`. Defaults follow QUANTEC (Marks et al.,
IJROBP 2010) and RTOG head and neck (0615/0920), lung (0617) and prostate (0415), conventional.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .contract import C_MAX, CONSTRAINT_KINDS, OAR_NAMES, TUMOUR_SITES
from .dvh import dmax, dmean, dose_at_volume_pct, v_x

if TYPE_CHECKING:  # pragma: no cover
    from addiff_core.case_io import Plan

TARGET = "__target__"
"""Structure name standing for the plan's highest-prescription target."""

TOLERANCE_GY = 1e-6   # slack on dose comparisons (floating-point round-off, e.g. 0.95 * 70)
TOLERANCE_FRACTION = 1e-9

PROSTATE_REFERENCE_RX_GY = 78.0
"""Prescription the prostate rectum/bladder V_x thresholds were published for (QUANTEC,
conventional 78 Gy); they are scaled by ``Rx / 78`` for other prescriptions."""

TARGET_ALIASES = ("PTV", "Target", TARGET)


@dataclass(frozen=True)
class Constraint:
    """One dose-volume constraint: ``threshold_gy`` in Gy, ``limit`` a volume fraction (0..1; 0 for
    ``Dmax``/``Dmean``); ``label`` is generated when left empty."""

    structure: str
    kind: str  # "Dmax" | "Dmean" | "Vx" | "Dmin_pct"
    threshold_gy: float
    limit: float = 0.0
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(CONSTRAINT_KINDS)}; got {self.kind!r}")
        if not (isinstance(self.threshold_gy, numbers.Real) and not isinstance(self.threshold_gy, bool)
                and math.isfinite(self.threshold_gy)
                and self.threshold_gy >= 0):
            raise ValueError(f"{self.structure} {self.kind}: threshold must be a dose >= 0 Gy, got {self.threshold_gy!r}")
        if self.kind in ("Vx", "Dmin_pct"):
            if not 0.0 < self.limit <= 1.0:
                raise ValueError(f"{self.structure} {self.kind}: limit must be a volume fraction in (0, 1], got {self.limit!r}")
        elif self.limit != 0.0:
            raise ValueError(f"{self.structure} {self.kind}: limit is unused and must be 0, got {self.limit!r}")
        object.__setattr__(self, "threshold_gy", float(self.threshold_gy))
        object.__setattr__(self, "limit", float(self.limit))
        if not self.label:
            object.__setattr__(self, "label", self._default_label())

    @property
    def key(self) -> str:
        """Override key of this constraint, e.g. ``"SpinalCord Dmax"``, ``"LeftLung V20"``,
        ``"__target__ D95"`` (see :func:`constraints_for_plan`)."""
        if self.kind in ("Dmax", "Dmean"):
            return f"{self.structure} {self.kind}"
        if self.kind == "Vx":
            return f"{self.structure} V{self.threshold_gy:g}"
        return f"{self.structure} D{100.0 * self.limit:g}"

    def _default_label(self) -> str:
        name = "PTV" if self.structure == TARGET else self.structure
        if self.kind in ("Dmax", "Dmean"):
            return f"{name} {self.kind} <= {self.threshold_gy:g} Gy"
        if self.kind == "Vx":
            return f"{name} V{self.threshold_gy:g}Gy <= {100.0 * self.limit:g}%"
        return f"{name} D{100.0 * self.limit:g} >= {self.threshold_gy:g} Gy"


def _target_d95(rx: float) -> Constraint:
    return Constraint(TARGET, "Dmin_pct", round(0.95 * rx, 6), 0.95, f"PTV D95 >= 95% Rx ({0.95 * rx:g} Gy)")


def default_constraints(tumour_site: str, prescriptions: Mapping[str, float]) -> list[Constraint]:
    """Protocol constraints for a tumour site (``prescriptions``: target -> Gy), the target's
    D95 >= 95 % Rx last; prostate V_x doses are scaled by Rx / 78 Gy, rounded to 0.1 Gy."""
    if tumour_site not in TUMOUR_SITES:
        raise ValueError(f"tumour_site must be one of {', '.join(TUMOUR_SITES)}; got {tumour_site!r}")
    if not prescriptions:
        raise ValueError("prescriptions must name at least one target")
    rx = max(float(v) for v in prescriptions.values())
    if not rx > 0:
        raise ValueError(f"prescriptions must be positive doses in Gy, got {dict(prescriptions)!r}")
    if tumour_site == "head_neck":
        cs = [
            Constraint("SpinalCord", "Dmax", 45.0),
            Constraint("Brainstem", "Dmax", 54.0),
            Constraint("LeftParotid", "Dmean", 26.0),
            Constraint("RightParotid", "Dmean", 26.0),
            # 105 % of 70 Gy: RTOG's 70 Gy is unreachable when the mandible touches PTV70
            Constraint("Mandible", "Dmax", 73.5),
            Constraint("Larynx", "Dmean", 45.0),
            Constraint("Esophagus", "Dmean", 45.0),
        ]
    elif tumour_site == "lung":
        cs = [
            Constraint("SpinalCord", "Dmax", 50.0),
            Constraint("LeftLung", "Vx", 20.0, 0.30),
            Constraint("RightLung", "Vx", 20.0, 0.30),
            Constraint("Heart", "Dmean", 26.0),
            Constraint("Heart", "Vx", 30.0, 0.46),
            Constraint("Esophagus", "Dmean", 34.0),
        ]
    else:  # prostate
        s = rx / PROSTATE_REFERENCE_RX_GY

        def vx(name: str, gy: float, lim: float) -> Constraint:
            return Constraint(name, "Vx", round(gy * s, 1), lim)

        cs = [
            vx("Rectum", 50.0, 0.50),
            vx("Rectum", 70.0, 0.20),
            vx("Bladder", 65.0, 0.50),
            vx("Bladder", 70.0, 0.35),
            Constraint("LeftFemoralHead", "Dmax", 50.0),
            Constraint("RightFemoralHead", "Dmax", 50.0),
        ]
    cs.append(_target_d95(rx))
    return cs


_KEY_RE = re.compile(r"^\s*(?P<struct>\S+)\s+(?P<metric>Dmax|Dmean|V\d+(?:\.\d+)?|D\d+(?:\.\d+)?)\s*(?:Gy)?\s*$",
                     re.IGNORECASE)


def _parse_key(key: Any, plan: Plan) -> tuple[str, str, float | None]:
    """``"SpinalCord Dmax"`` -> (structure, kind, number in the key or None)."""
    example = "e.g. 'SpinalCord Dmax', 'Parotid Dmean', 'LeftLung V20', 'PTV D95'"
    if not isinstance(key, str):
        raise ValueError(f"plan constraints: key {key!r} must be a string ({example})")
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"plan constraints: cannot read key {key!r}: expected '<structure> <Dmax|Dmean|Vx|Dx>' ({example})")
    struct, metric = m.group("struct"), m.group("metric")
    canon = {n.lower(): n for n in OAR_NAMES}
    targets = {a.lower() for a in TARGET_ALIASES}
    if plan.prescriptions:
        targets.add(plan.targets[0].lower())
    if struct.lower() in targets:
        struct = TARGET
    elif struct.lower() in canon:
        struct = canon[struct.lower()]
    else:
        raise ValueError(f"plan constraints: unknown structure {struct!r} in {key!r}; use one of "
                         f"{', '.join(OAR_NAMES)} or PTV / {plan.targets[0] if plan.prescriptions else 'the target'} "
                         "for the highest-prescription target")
    ml = metric.lower()
    if ml == "dmax":
        kind, num = "Dmax", None
    elif ml == "dmean":
        kind, num = "Dmean", None
    elif ml[0] == "v":
        kind, num = "Vx", float(metric[1:])
    else:
        kind, num = "Dmin_pct", float(metric[1:])
        if not 0.0 < num <= 100.0:
            raise ValueError(f"plan constraints: {key!r}: D<x> needs x in (0, 100]")
    if kind == "Dmin_pct" and struct != TARGET:
        raise ValueError(f"plan constraints: {key!r}: D<x> >= (minimum-coverage) constraints apply to the target only")
    if kind != "Dmin_pct" and struct == TARGET:
        raise ValueError(f"plan constraints: {key!r}: only D<x> (e.g. 'PTV D95') is supported for the target")
    return struct, kind, num


def _override(key: Any, value: Any, plan: Plan) -> tuple[str, Constraint | None]:
    """One override of plan.yaml -> (the :attr:`Constraint.key` it matches, the constraint, or
    None for ``null``: remove the default)."""
    struct, kind, num = _parse_key(key, plan)
    if kind == "Vx":
        c_key = f"{struct} V{num:g}"
    elif kind == "Dmin_pct":
        c_key = f"{struct} D{num:g}"
    else:
        c_key = f"{struct} {kind}"
    if value is None:
        return c_key, None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"plan constraints: {key!r}: value must be a number, got {value!r}")
    v = float(value)
    if kind == "Vx":
        if not 0.0 < v <= 1.0:
            raise ValueError(f"plan constraints: {key!r}: value is the allowed volume fraction in (0, 1] "
                             f"(0.3 for 30%), got {value!r}")
        return c_key, Constraint(struct, "Vx", float(num), v)
    if not 0.0 < v <= 150.0:
        raise ValueError(f"plan constraints: {key!r}: value must be a dose in Gy in (0, 150], got {value!r}")
    return c_key, Constraint(struct, kind, v, num / 100.0 if kind == "Dmin_pct" else 0.0)


def constraints_for_plan(plan: Plan) -> list[Constraint]:
    """The site's :func:`default_constraints` with plan.yaml's ``constraints:`` applied: keys
    ``"<structure> <metric>"`` (an OAR name, case-insensitive, or ``PTV``/the top target), values
    ``Dmax``/``Dmean`` in Gy (``SpinalCord Dmax: 40``), ``V<x Gy>`` a fraction (``LeftLung V20:
    0.25``), target ``D<x %>`` in Gy (``PTV D95: 66.5``), ``null`` to remove a default. A key equal
    to a default's :attr:`Constraint.key` replaces it (prostate V_x keys carry the Rx-scaled dose:
    ``Rectum V53.8`` at 60 Gy), others are appended. ValueError naming the key, or past C_MAX."""
    cs = default_constraints(plan.tumour_site, plan.prescriptions)
    overrides = plan.constraints or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("plan constraints must be a mapping like {'SpinalCord Dmax': 40}")
    by_key = {c.key: i for i, c in enumerate(cs)}
    out: list[Constraint | None] = list(cs)
    for key, value in overrides.items():
        c_key, new = _override(key, value, plan)
        if new is None:
            if c_key not in by_key:
                raise ValueError(f"plan constraints: {key!r}: null removes a default constraint, but there is none "
                                 f"with that key (defaults: {', '.join(c.key for c in cs)})")
            out[by_key[c_key]] = None
        elif c_key in by_key:
            out[by_key[c_key]] = new
        else:
            by_key[c_key] = len(out)
            out.append(new)
    result = [c for c in out if c is not None]
    if len(result) > C_MAX:
        raise ValueError(f"plan constraints: {len(result)} constraints after overrides; at most {C_MAX} are supported")
    return result


def evaluate_constraint(dose: np.ndarray, mask: np.ndarray, c: Constraint) -> tuple[float, bool]:
    """``(value, met)`` of ``c`` for ``dose`` in ``mask``: Gy, or the V_x fraction; ``(nan, False)``
    for an empty mask; comparisons allow :data:`TOLERANCE_GY` / :data:`TOLERANCE_FRACTION`."""
    if c.kind == "Dmax":
        value = dmax(dose, mask)
        met = value <= c.threshold_gy + TOLERANCE_GY
    elif c.kind == "Dmean":
        value = dmean(dose, mask)
        met = value <= c.threshold_gy + TOLERANCE_GY
    elif c.kind == "Vx":
        value = v_x(dose, mask, c.threshold_gy)
        met = value <= c.limit + TOLERANCE_FRACTION
    else:
        value = dose_at_volume_pct(dose, mask, 100.0 * c.limit)
        met = value >= c.threshold_gy - TOLERANCE_GY
    return float(value), bool(met) and not math.isnan(value)
