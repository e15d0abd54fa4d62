"""``python -m concordia_cli``: the ``concordia`` command."""

import sys

from . import main

sys.exit(main())
