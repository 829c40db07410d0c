"""`python -m qgl ...` runs the `qgl` command."""

import sys

from qgl.cli import main

if __name__ == "__main__":
    sys.exit(main())
