"""``python -m hotpatch``: the command line."""

import sys

from hotpatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
