"""``python -m miq.sweep``: the method matrix, run and reported (see ``miq.sweep.cli``)."""
import signal
import sys

# held while the modules import (torch: seconds), then delivered to cli.main's handler: one line, 128 + N
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
from miq.sweep.cli import main  # noqa: E402

sys.exit(main())
