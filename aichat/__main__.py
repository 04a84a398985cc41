"""``python -m aichat``: the same as the ``aichat-backend`` command."""

import sys

from aichat.cli import main

sys.exit(main())
