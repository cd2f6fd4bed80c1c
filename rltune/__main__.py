"""``python -m rltune``: the command line (see ``rltune --help``)."""

import sys

from rltune.cli import main

sys.exit(main())
