"""``python -m vimerge`` (and ``torchrun -m vimerge``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
