"""The dependency sets the project is tested with, read from the two constraint files beside this module.

``locked.txt`` is the exact set CI and ``bash scripts/test.sh`` install (``pip -c``), so a fresh machine runs the
same thing today and in a month; ``oldest.txt`` holds the floors ``pyproject.toml`` declares, run by
``HF_RINGCP_DEPS=oldest bash scripts/test.sh``. The package's own metadata pins neither. Whatever claims a tested
range (the Trainer callback's version warning) asks :func:`tested_range`, so the claim moves with the files.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def pins(which: str) -> dict[str, str]:
    """``{package: version}`` of ``which`` (``"locked"`` or ``"oldest"``), names in canonical form."""
    if which not in ("locked", "oldest"):
        raise ValueError(f"`which` must be 'locked' or 'oldest', but got {which!r}.")
    text = resources.files(__name__).joinpath(f"{which}.txt").read_text()
    found = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            found[_canonical(match.group(1))] = match.group(2).split("+")[0]
    return found


def tested_range(package: str) -> tuple[str, str]:
    """``(oldest, newest)`` release of ``package`` the suite runs on: the floor set's pin and the lock's."""
    name = _canonical(package)
    locked, oldest = pins("locked"), pins("oldest")
    if name not in locked:
        raise KeyError(f"{package!r} is not in hf_ringcp/constraints/locked.txt.")
    return oldest.get(name, locked[name]), locked[name]


__all__ = ["pins", "tested_range"]
