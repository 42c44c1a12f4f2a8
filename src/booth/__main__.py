"""`python -m booth ...` (and `accelerate launch -m booth train ...`) run the `booth` command line."""

import sys

from booth.cli import main

sys.exit(main())
