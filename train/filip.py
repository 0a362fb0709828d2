"""Train FILIP: `deepspeed --num_gpus N train/filip.py --config configs/filip/tiny.yaml`."""

import sys

from mm.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("filip"))
