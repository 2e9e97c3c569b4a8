"""``python -m moe_erc`` = the ``moe-erc`` command."""

import sys

from moe_erc.cli import main

sys.exit(main())
