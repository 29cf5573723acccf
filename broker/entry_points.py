"""broker's plugin groups (``broker.providers``, ``broker.engines``), read from installed packages once.

Reading entry points means opening every installed distribution's metadata: on a box with ~200
packages, ~15-25 ms per ``importlib.metadata.entry_points(group=...)`` call, and a CLI run asked
twice (provider kinds, then engines). One pass reads every group; each group is then a lookup.
Installing a package means restarting the process, or calling ``forget()``.
"""

from __future__ import annotations

import functools


def group(name: str) -> dict[str, str]:
    """``{entry point name: "module:attr"}`` of one group (first installed distribution wins a name)."""
    return dict(_all().get(name, {}))


def forget() -> None:
    """Read the installed packages again on next use (after installing a plugin into a running process)."""
    _all.cache_clear()


@functools.lru_cache(maxsize=1)
def _all() -> dict[str, dict[str, str]]:
    from importlib.metadata import distributions

    found: dict[str, dict[str, str]] = {}
    for dist in distributions():  # in sys.path order: the first of a name wins, as imports do
        for ep in dist.entry_points:
            if ep.group.startswith("broker."):
                found.setdefault(ep.group, {}).setdefault(ep.name, ep.value)
    return found
