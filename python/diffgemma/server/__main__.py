"""`python -m diffgemma.server ...`: the `diffgemma serve` subcommand on its own."""

import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
