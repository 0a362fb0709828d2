"""Train STRUCTURE heads on cached features: `deepspeed --num_gpus N train/structure.py --config configs/structure/tiny.yaml`."""

import sys

from mm.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("structure"))
