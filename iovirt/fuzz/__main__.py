"""``python -m iovirt.fuzz``: the ``iovirt fuzz`` command, usable before it is wired into
the ``iovirt`` entry point."""

import sys

from iovirt.fuzz.cli import standalone

sys.exit(standalone())
