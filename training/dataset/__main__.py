"""`python -m training.dataset`."""

import sys

from .prepare import main

if __name__ == "__main__":
    sys.exit(main())
