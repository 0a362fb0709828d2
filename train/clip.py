"""Train the clip task: `deepspeed --num_gpus N train/clip.py --config configs/clip/tiny.yaml`
(the same as `mm train clip ...`)."""

import sys

from mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("clip"))
