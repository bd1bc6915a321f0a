"""``python -m connserver`` is the ``connserver`` command."""

import sys

from .daemon.cli import main

sys.exit(main())
