"""Train the filip task: `deepspeed --num_gpus N train/filip.py --config configs/filip/tiny.yaml`
(the same as `mm train filip ...`)."""

import sys

from mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("filip"))
