"""`specialists ARGS...` as a script, for `accelerate launch` (which runs scripts, not `-m` modules)."""

import sys

from specialists.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
