"""``python -m miq.report DIR``: the report rebuilt from a results folder (see ``miq.report.markdown``)."""

import sys

from miq.report.markdown import main

sys.exit(main())
