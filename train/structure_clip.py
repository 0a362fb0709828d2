"""Train the structure_clip task:
`deepspeed --num_gpus N train/structure_clip.py --config configs/structure_clip/tiny.yaml`
(the same as `mm train structure_clip ...`)."""

import sys

from mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("structure_clip"))
