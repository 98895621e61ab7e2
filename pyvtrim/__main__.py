"""`python -m pyvtrim ...` runs the `pyvtrim` command."""

import sys

from .cli import main

sys.exit(main())
