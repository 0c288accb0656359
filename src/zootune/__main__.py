"""``python -m zootune`` = the ``zootune`` command."""

import sys

from zootune.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
