"""`python -m service` runs the same CLI as the `scm-relay` console script."""

import sys

from service.cli import main

sys.exit(main())
