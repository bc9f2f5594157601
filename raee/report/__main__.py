"""``python -m raee.report``."""

import sys

from raee.report.cli import main

sys.exit(main())
