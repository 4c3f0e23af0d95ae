"""`python -m promptkit ...` runs the command line (also under torchrun)."""

import sys

from promptkit.cli import main

sys.exit(main())
