"""``python -m edgefm ...``: the ``edgefm`` command line, for an environment whose scripts are not
on the ``PATH`` (a notebook kernel, a venv used without activating it)."""

import sys

from edgefm.cli import main

sys.exit(main())
