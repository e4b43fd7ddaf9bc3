"""``python -m gradguard ...`` is the ``gradguard`` command.

Room: above the Guard. It may touch: ``cli``.
"""

import sys

from .cli import main

sys.exit(main())
