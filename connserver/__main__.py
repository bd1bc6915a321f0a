"""``python -m connserver`` is the ``connserver`` command."""

import sys

from .cli import main

sys.exit(main())
