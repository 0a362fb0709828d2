"""Scene graphs and in-caption negatives of captions (what Structure-CLIP trains on); see
`python eval/scenegraph.py --help`."""

import sys

from mm.scenegraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
