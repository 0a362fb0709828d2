"""Run by tests/test_launch_port.py under the deepspeed launcher: join the process group the launcher set
up, all-reduce once, and (rank 0) write what was seen to the JSON file named last on the command line."""

import json
import os
import sys

import torch
import torch.distributed as dist

from mm.engine.trainer import init_distributed

init_distributed()
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
if dist.get_rank() == 0:
    with open(sys.argv[-1], "w") as f:  # the deepspeed launcher puts --local_rank=N first
        json.dump({"world_size": dist.get_world_size(), "sum": total.item(), "port": int(os.environ["MASTER_PORT"])}, f)
dist.destroy_process_group()
