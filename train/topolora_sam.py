"""Train the topolora_sam task: `deepspeed --num_gpus N train/topolora_sam.py --config configs/topolora_sam/tiny.yaml`
(the same as `mm train topolora_sam ...`)."""

import sys

from mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("topolora_sam"))
