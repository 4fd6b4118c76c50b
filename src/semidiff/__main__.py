"""``python -m semidiff``: the same command line as the ``semidiff`` console script."""

import sys

from semidiff.cli import main

sys.exit(main())
