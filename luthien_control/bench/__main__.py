"""``python -m luthien_control.bench [flags]``: the same as ``luthien-control bench``."""

import sys

from luthien_control.bench.cli import main

sys.exit(main(sys.argv[1:]))
