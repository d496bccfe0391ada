"""`python -m keyplane.clients.cli`, as the `keyplane` script."""

import sys

from keyplane.clients.cli import main

sys.exit(main())
