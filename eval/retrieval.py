"""Image-text retrieval recall@k of an exported model; see `python eval/retrieval.py --help`."""

import sys

from mm.evaluate.retrieval import main

if __name__ == "__main__":
    sys.exit(main())
