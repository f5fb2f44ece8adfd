"""Helpers shared by the tests (no tests here; no module is named ``test_*``).

``tests/`` is on ``sys.path`` under pytest (no ``__init__.py`` there), so tests import them as
``from helpers.federation import FakeGrid``.

* ``cases``: the default synthetic 16^3 case behind the ``make_case`` fixture (conftest.py);
* ``models``: the one tiny model configuration of the tests and a fake batch of sample tensors;
* ``checks``: case breakers (one defect each) with the problem ``addiff data check`` reports;
* ``metrics``: the OpenKBP dose score written independently of ``addiff_core``;
* ``dicom``: tiny synthetic cases exported as DICOM-RT;
* ``federation``: an in-process Grid, synthetic sites, processes stopped by PID.
"""
