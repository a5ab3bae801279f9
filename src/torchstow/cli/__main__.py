"""``python -m torchstow.cli``."""

import sys

from torchstow.cli.app import main

sys.exit(main())
