"""`python -m syncbench ...`: the `syncbench` command line (docs/README.md)."""

import sys

from syncbench.sweeps.cli import main

sys.exit(main())
