"""The list of labs: one line per lab module, in the order they are taught.

Each module named here defines ``LAB``, a :class:`~connserver.lab.spec.Lab`.
Adding a lab is a new module and one line below.
"""

from __future__ import annotations

import importlib

from .spec import Lab

__all__ = ["LAB_MODULES", "labs", "find", "UnknownLab"]

LAB_MODULES = (
    "connserver.lab.vanished_peer",      # 1
    "connserver.lab.spawned_threads",    # 2
    "connserver.lab.pinned_buffer",      # 3
    "connserver.lab.slowloris",          # 4
    "connserver.lab.cancel_by_close",    # 5
    "connserver.lab.rate_limiter",       # 6
    "connserver.lab.stalled_reader",     # 7
    "connserver.lab.soak_verdict",       # 8
)


class UnknownLab(LookupError):
    """No lab has that name or number."""


def labs() -> list[Lab]:
    """Every lab, by number."""
    found = [importlib.import_module(module).LAB for module in LAB_MODULES]
    found.sort(key=lambda lab: lab.number)
    numbers = [lab.number for lab in found]
    if len(set(numbers)) != len(numbers) or len({lab.name for lab in found}) != len(found):
        raise RuntimeError(f"two labs share a number or a name: {[(lab.number, lab.name) for lab in found]}")
    return found


def find(name: str) -> Lab:
    """The lab called ``name``, or numbered ``name`` (``"1"``)."""
    for lab in labs():
        if name in (lab.name, str(lab.number)):
            return lab
    raise UnknownLab(f"no lab {name!r}; the labs are: "
                     + ", ".join(f"{lab.number} {lab.name}" for lab in labs()))
