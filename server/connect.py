"""Before the first round: are the SuperNodes the run needs connected? A simulation with too few
stops at once with what to do; a deployment waits (up to ``round-timeout``) for ``wait-sites``."""
from __future__ import annotations

import logging
import time

from .settings import RunSettings

log = logging.getLogger("flwr.addiff")


def is_simulation(grid) -> bool:
    """True for Flower's simulation runtime (``run_simulation`` or a ``--simulation`` SuperLink)."""
    from .flower_compat import is_in_memory_grid

    return is_in_memory_grid(grid)


def simulation_too_small(grid, settings: RunSettings) -> str | None:
    """For a simulation's grid (:func:`is_simulation`): every SuperNode exists from the start
    (Flower registers them all at once), so fewer than the run needs would make Flower's
    strategies wait for ever (a plain ``flwr run .`` starts 2): the message saying what to do
    instead, or None."""
    need = max(settings.required_sites, settings.wait_sites)
    deadline, n = time.monotonic() + 60.0, 0
    while time.monotonic() < deadline:
        n = len(list(grid.get_node_ids()))
        if n >= need:
            return None
        if n > 0:  # registered in one go: give it a moment, then it is final
            time.sleep(2.0)
            n = len(list(grid.get_node_ids()))
            break
        time.sleep(0.2)
    if n >= need:
        return None
    files = len(settings.site_files)
    return (f"this simulation has {n} SuperNode(s) but the run needs {need} (min-sites {settings.required_sites}"
            + (f"; {files} site file(s)" if files else "") + "): Flower would wait for ever. Run it with one "
            f"simulated SuperNode per site file: flwr run . --stream --federation-config \"num-supernodes={files or need}\""
            " (or `addiff simulate`)")


def wait_for_sites(grid, settings: RunSettings) -> None:
    """Wait (up to ``round-timeout``) until ``wait-sites`` SuperNodes are connected, so that the
    run starts with everyone expected even if it may later go on with fewer (``min-sites``)."""
    want = settings.wait_sites
    if want <= settings.required_sites:
        return  # Flower's strategies wait for min-sites themselves
    t0, last = time.monotonic(), -1
    while (n := len(list(grid.get_node_ids()))) < want:
        if n != last:
            log.info("waiting for sites: %d of %d connected (wait-sites)", n, want)
            last = n
        if time.monotonic() - t0 > settings.round_timeout:
            log.warning("only %d of %d sites connected after %.0f s; starting with them", n, want, settings.round_timeout)
            return
        time.sleep(1.0)
