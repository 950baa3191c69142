"""``python -m llamarun`` is the ``llamarun`` command."""

import sys

from .cli import main

sys.exit(main())
