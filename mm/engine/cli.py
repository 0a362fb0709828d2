"""The command line shared by every train/<task>.py entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mm.config import load_config
from mm.errors import ConfigError, cli_main
from mm.tasks import get_task


def parse_args(task_name: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"train/{task_name}.py",
        description=f"Train the {task_name} task on DeepSpeed. Run with `deepspeed [--num_gpus N] "
                    f"train/{task_name}.py ...` for several ranks or nodes, or with plain `python` for one.")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--deepspeed_config", help="ZeRO config JSON; same as --set train.deepspeed_config=PATH")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p.parse_args(argv)


@cli_main
def train_main(task_name: str, argv: list[str] | None = None) -> int:
    args = parse_args(task_name, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = get_task(task_name)
    overrides = list(args.set)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides, cls=task.config_class)
    if cfg.task and cfg.task != task_name:
        raise ConfigError(f"{args.config}: a config for task {cfg.task!r}, run with train/{task_name}.py")
    cfg.task = task_name

    from mm.engine.launch import PREEMPTED_EXIT, Preempted
    from mm.engine.trainer import train

    try:
        result = train(task, cfg)
    except Preempted as e:
        # Not exit 2 (bad input): a scheduler that requeues on 143 (SIGTERM) reruns the same command.
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["last"]
        parts = [f"{task_name}: step {result['step']}"]
        if "loss" in last:
            parts.append(f"loss {last['loss']:.4f}")
        parts += [f"{k} {v:.4f}" for k, v in result["eval"].items()
                  if k.endswith(("acc1", "acc5", "/dice", "/cldice", "/iou"))]
        parts.append(f"export {result['export']}")
        print(" | ".join(parts))
        print(json.dumps({"task": task_name, **{k: v for k, v in result.items() if k != "engine"}}, default=str))
    return 0
