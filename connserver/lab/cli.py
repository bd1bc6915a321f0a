"""``connserver lab [NAME] [--short] [--broken|--fixed] [--json]``.

Exit status: 0 when the lab showed what it should (the broken side leaked, the
fixed side held; with ``--broken`` or ``--fixed``, that one side), 1 when it
did not or a side failed to run, 2 for an unknown lab, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

__all__ = ["add_lab_parser", "run_from_args", "EXIT_SHOWN", "EXIT_NOT_SHOWN", "EXIT_USAGE"]

EXIT_SHOWN, EXIT_NOT_SHOWN, EXIT_USAGE = 0, 1, 2


def add_lab_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``lab`` to the ``connserver`` subcommands."""
    parser = commands.add_parser(
        "lab", help="watch a leak happen and its fix hold: a broken and a fixed server side by side",
        description="Without NAME, list the labs. With NAME, run that lab: a broken server and a "
                    "fixed one, each in its own process on 127.0.0.1, get the same bounded load "
                    "while their threads, fds, memory and the lab's own figures are shown side by "
                    "side; then a verdict and the page to read next. Every lab ends by itself "
                    "within about 30 s. Exit status 0 if the lab showed what it should (the "
                    "broken side leaked, the fixed side held), 1 if not, 2 for an unknown lab.")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="a lab's name or number (connserver lab lists them)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--broken", action="store_true", help="run only the broken side")
    which.add_argument("--fixed", action="store_true", help="run only the fixed side")
    parser.add_argument("--short", action="store_true",
                        help="a CI-sized run of a few seconds (smaller load, same verdict)")
    parser.add_argument("--json", action="store_true",
                        help="no live display: print one JSON object with every sample, the "
                             "figures and the verdict on stdout")
    return parser


def _list(as_json: bool) -> int:
    from .display import format_list
    from .registry import labs

    found = labs()
    if as_json:
        print(json.dumps([{"number": lab.number, "name": lab.name, "title": lab.title,
                           "docs": lab.docs_page, "explanation": lab.explanation_page,
                           "full": dataclasses.asdict(lab.full),
                           "short": dataclasses.asdict(lab.short)} for lab in found]))
    else:
        print(format_list(found))
    return EXIT_SHOWN


def run_from_args(args: argparse.Namespace) -> int:
    """``connserver lab``: list the labs, or run one (see the module docstring for the status)."""
    from .children import ChildError
    from .display import format_verdict, make_display
    from .registry import UnknownLab, find
    from .runner import run_lab, total_time
    from .spec import SIDES

    if args.name is None:
        return _list(args.json)
    try:
        lab = find(args.name)
    except UnknownLab as exc:
        print(f"connserver lab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sides = ("broken",) if args.broken else ("fixed",) if args.fixed else SIDES
    display = None if args.json else make_display(sys.stdout, lab, sides, total_time(lab, args.short))
    try:
        document = run_lab(lab, args.short, sides, display)
    except ChildError as exc:
        print(f"connserver lab: error: {exc}", file=sys.stderr)
        return EXIT_NOT_SHOWN
    except KeyboardInterrupt:
        print("connserver lab: interrupted (every side's process was ended)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(document))
    else:
        print("\n" + format_verdict(document))
    return EXIT_SHOWN if document["verdict"]["passed"] else EXIT_NOT_SHOWN
