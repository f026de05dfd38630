"""``python -m hobbit_mlx.server``: see ``hobbit_mlx.server.cli``."""

import sys

from .. import cli_common
from .cli import main

if __name__ == "__main__":
    sys.exit(cli_common.run(main))
