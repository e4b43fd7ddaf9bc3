"""``python -m gradguard ...`` is the ``gradguard`` command."""

import sys

from .cli import main

sys.exit(main())
