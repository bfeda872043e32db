"""``python -m svdquant``: the command line (see ``svdquant.cli``)."""

import sys

from svdquant.cli import main

sys.exit(main())
