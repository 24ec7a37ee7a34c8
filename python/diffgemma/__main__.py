"""`python -m diffgemma ...`: the same command line as the `diffgemma` script."""

import sys

from .cli import main

sys.exit(main())
