"""Train Structure-CLIP: `deepspeed --num_gpus N train/structure_clip.py --config configs/structure_clip/tiny.yaml`."""

import sys

from mm.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("structure_clip"))
