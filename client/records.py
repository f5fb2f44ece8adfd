"""Arrays <-> Flower's ``ArrayRecord`` (public API): the one place either side converts them."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def record_nbytes(record) -> int:
    """Bytes of the serialised arrays in an ArrayRecord (what goes over the wire, before framing)."""
    return int(sum(len(a.data) for a in record.values())) if record is not None else 0
