"""Train TopoLoRA-SAM: `deepspeed --num_gpus N train/topolora_sam.py --config configs/topolora_sam/tiny.yaml`."""

import sys

from mm.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("topolora_sam"))
