"""``python -m lindiff.app [FLAGS]``: the same as ``lindiff demo [FLAGS]``."""

import sys

from lindiff.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
