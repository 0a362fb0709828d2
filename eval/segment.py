"""Segmentation of image files or folders with an exported TopoLoRA-SAM; see `python eval/segment.py --help`."""

import sys

from mm.evaluate.segment import main

if __name__ == "__main__":
    sys.exit(main())
