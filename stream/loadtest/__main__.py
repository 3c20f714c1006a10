"""`python -m stream.loadtest bench ...`: the harness without the rest of the CLI."""

import sys

from stream.loadtest.cli import main

sys.exit(main())
