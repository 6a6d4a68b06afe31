"""python -m fastunlearn.cli: the fastunlearn command."""

import sys

from fastunlearn.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
