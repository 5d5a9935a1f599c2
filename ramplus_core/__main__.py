"""`python -m ramplus_core` runs the same CLI as the `ramplus` console script."""

import sys

from .cli import main

sys.exit(main())
