"""``python -m broker``: the same command line as ``broker``."""

import sys

from broker.cli import main

sys.exit(main())
