"""Zero-shot classification of an exported model; see `python eval/zeroshot.py --help`."""

import sys

from mm.evaluate.zeroshot import main

if __name__ == "__main__":
    sys.exit(main())
