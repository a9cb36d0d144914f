"""``python -m miq.sweep``: the method matrix, run and reported (see ``miq.sweep.cli``)."""

import sys

from miq.sweep.cli import main

sys.exit(main())
