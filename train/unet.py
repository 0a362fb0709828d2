"""Train the unet task: `deepspeed --num_gpus N train/unet.py --config configs/unet/tiny.yaml`
(the same as `mm train unet ...`)."""

import sys

from mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("unet"))
