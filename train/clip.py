"""Train the CLIP baseline: `deepspeed --num_gpus N train/clip.py --config configs/clip/tiny.yaml`."""

import sys

from mm.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("clip"))
