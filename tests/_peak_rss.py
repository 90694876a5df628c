"""`specialists ARGS...` in this process, then its peak resident memory (KiB) as the last line of stdout.

``--limit module.NAME=N`` (before ARGS, repeatable) first sets an int constant of a module, e.g.
``--limit specialists.held_out.SAMPLE_ROWS=3000``, so that a test can reach a bound with small data.
"""

import importlib
import resource
import sys

from specialists.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    while args[:1] == ["--limit"]:
        target, value = args[1].split("=")
        module, name = target.rsplit(".", 1)
        setattr(importlib.import_module(module), name, int(value))
        args = args[2:]
    code = main(args)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    sys.exit(code)
