"""``python -m llamarun`` is the ``llamarun`` command."""

import sys

from .cli import run

sys.exit(run())
