"""DICOM-RT in and out (Flower-free).

* :mod:`.scan`: find DICOM files by content and group them by patient;
* :mod:`.volumes`: CT series -> HU image (sorted, rescaled, geometry kept; tilted or gapped series
  refused), RTDOSE -> Gy on the CT grid;
* :mod:`.contours`: RTSTRUCT contours <-> masks on the CT grid (contourpy / dicompyler-core);
* :mod:`.rtplan`: beams, arcs, prescriptions and fractions of an RTPLAN (plans the model cannot
  represent refused); :mod:`.prescriptions`: which target gets which dose, and from where;
* :mod:`.names`: TPS structure names -> the project's names; :mod:`.mapping`: a site's mapping file;
* :mod:`.reader`: ``addiff data import-dicom``; :mod:`.writer`: ``addiff data export-dicom`` and
  ``addiff predict --rtdose``; :mod:`.objects`: UIDs (root ``2.25.`` unless a hospital gives its
  own), the shared patient/study identity, Part 10 file writing; :mod:`.validate`: every written
  object checked (values against their VRs, read back with pydicom, nothing written as VR UN).
"""
