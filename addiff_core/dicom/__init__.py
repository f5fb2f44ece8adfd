"""DICOM-RT in and out (Flower-free): ``scan`` (find and group files), ``volumes`` (CT -> HU,
RTDOSE -> Gy on the CT grid), ``contours`` (RTSTRUCT <-> masks), ``rtplan`` and ``prescriptions``
(beams, doses, fractions), ``names`` and ``mapping`` (TPS names -> ours), ``reader`` (import),
``writer`` (export, ``predict --rtdose``), ``objects`` (UIDs, Part 10), ``validate`` (every
written object checked against its VRs and read back).
"""
