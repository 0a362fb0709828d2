"""Train the structure task: `deepspeed --num_gpus N train/structure.py --config configs/structure/tiny.yaml`
(the same as `mm train structure ...`)."""

import sys

from mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("structure"))
