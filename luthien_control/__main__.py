import sys

from luthien_control.cli import main

sys.exit(main())
