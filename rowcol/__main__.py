"""``python -m rowcol`` (and ``torchrun -m rowcol``) runs the command line."""
import sys

from rowcol.apps.cli import main

sys.exit(main())
