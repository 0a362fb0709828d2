"""Compositional evaluation (SugarCrepe, ARO, shapes-world swaps) of an exported model; see
`python eval/compositional.py --help`."""

import sys

from mm.evaluate.compositional import main

if __name__ == "__main__":
    sys.exit(main())
