"""`python -m mm ...` (and `deepspeed --module mm ...`, `torchrun -m mm ...`): the `mm` command."""

import sys

from mm.cli import mm_main

if __name__ == "__main__":
    sys.exit(mm_main())
