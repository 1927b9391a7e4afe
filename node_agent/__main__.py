"""`python -m node_agent` runs the command line."""

import sys

from node_agent.cli import main

sys.exit(main())
