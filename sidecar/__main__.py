"""``python -m sidecar`` is the console script."""

import sys

from sidecar.cli import main

sys.exit(main())
