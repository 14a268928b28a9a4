"""``python -m p3s`` runs the ``p3s`` command."""

import sys

from p3s.cli import main

sys.exit(main())
