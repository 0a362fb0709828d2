"""Convert an export (e.g. --format sam: LoRA merged); see `python eval/export.py --help` (= `mm export`)."""

import sys

from mm.evaluate.export import main

if __name__ == "__main__":
    sys.exit(main())
