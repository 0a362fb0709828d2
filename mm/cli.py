"""`mm`: the one command line. Every sub-command comes from COMMANDS; `mm train <task>` from TASKS.

    mm train clip --config configs/clip/tiny.yaml          (one process)
    deepspeed --num_gpus 2 --module mm train clip --config configs/clip/tiny.yaml
    torchrun --nproc_per_node 2 -m mm train clip --config configs/clip/tiny.yaml
    mm train filip --print-config                          (every key, its type and value)
    mm zeroshot --checkpoint runs/x/export/model.safetensors --data 'val-{000000..000001}.tar'

The old console scripts (mm-zeroshot, mm-shards, ...) and train/<task>.py, eval/<tool>.py remain as
aliases of the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any

from mm.cliargs import add_config_options, add_debug
from mm.errors import ConfigError, UserError, cli_main


@dataclass(frozen=True)
class Command:
    module: str  # imported only when the command runs, so `mm --help` stays fast
    help: str
    aliases: tuple[str, ...] = ()  # console scripts of the same command (the mm-* names of earlier versions)


COMMANDS: dict[str, Command] = {
    "train": Command("mm.cli", "train a task on DeepSpeed: mm train <task> --config FILE"),
    "shards": Command("mm.data.cli", "write WebDataset shards (synthetic worlds, captions, COCO, "
                                      "segmentation, named datasets)", ("mm-shards",)),
    "zeroshot": Command("mm.evaluate.zeroshot", "zero-shot classification of labelled images", ("mm-zeroshot",)),
    "retrieval": Command("mm.evaluate.retrieval", "image-text retrieval recall@k", ("mm-retrieval",)),
    "compositional": Command("mm.evaluate.compositional", "SugarCrepe / ARO / shapes compositional accuracy",
                             ("mm-compositional",)),
    "segment": Command("mm.evaluate.segment", "segment images with a TopoLoRA-SAM export", ("mm-segment",)),
    "export": Command("mm.evaluate.export", "convert an export for use outside mm (--format open_clip, peft "
                                            "or sam)", ("mm-export", "mm-merge-lora")),
    "structure": Command("mm.tasks.structure_cli", "STRUCTURE preparation: cache features, select layers",
                         ("mm-structure",)),
    "filip-heatmap": Command("mm.evaluate.heatmap", "heat map of a FILIP export's token-wise scores of a caption "
                                                    "over an image (PNG)"),
    "scenegraph": Command("mm.scenegraph.cli", "parse captions into scene graphs and show their hard negatives",
                          ("mm-scenegraph",)),
}


def _command_main(name: str):
    """The `main(argv) -> int` of a sub-command."""
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as e:
        if e.name and command.module.startswith(e.name):
            raise UserError(f"mm {name}: not available in this installation ({command.module} is missing)") from None
        raise
    return module.main


# --- mm train --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe_config(cfg: Any) -> str:
    """Every key of a resolved config as YAML, each leaf annotated with its type."""
    import yaml

    lines: list[str] = []

    def walk(obj: Any, indent: int) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:  # {type(value).__name__}")
                walk(value, indent + 1)
            else:
                text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10**6).strip()
                lines.append(f"{pad}{text[1:-1] if text.startswith('{') else text}  # {_type_name(hints[f.name])}")

    walk(cfg, 0)
    return "\n".join(lines) + "\n"


def train_parser(task_name: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    from mm.tasks import TASKS

    name = task_name or "<task>"
    p = argparse.ArgumentParser(
        prog=prog or f"mm train {name}",
        description=f"Train {'the ' + task_name + ' task' if task_name else 'a task'} on DeepSpeed. For several "
                    f"ranks or nodes: `deepspeed [--num_gpus N] --module mm train {name} ...` (or "
                    f"`deepspeed train/{name}.py ...`, or torchrun -m mm ...); plain `mm train` runs one.")
    if task_name is None:
        p.add_argument("task", choices=sorted(TASKS), help="the trainer")
    add_config_options(p, "optim.lr=3e-4", required=False)
    p.add_argument("--deepspeed_config", help="ZeRO config JSON; same as --set train.deepspeed_config=PATH")
    # What deepspeed.add_config_arguments gives other scripts, so their launch lines work unchanged; mm
    # always trains on DeepSpeed, so the flag changes nothing.
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed scripts' launch lines; "
                   "mm train always runs on DeepSpeed")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, with its type) and exit without training")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    add_debug(p)
    return p


def resolve_train_config(task_name: str, args: argparse.Namespace) -> Any:
    from mm.config import load_config
    from mm.tasks import task_class

    cls = task_class(task_name)
    overrides = list(args.set)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides, cls=cls.config_class)
    if cfg.task and cfg.task != task_name:
        raise ConfigError(f"{args.config}: a config for task {cfg.task!r}, given to `mm train {task_name}` "
                          f"(train/{task_name}.py)")
    cfg.task = task_name
    return cfg


def run_training(task_name: str, args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mm.tasks import task_class

    if not args.config and not args.print_config:
        raise UserError(f"mm train {task_name}: --config FILE is required (or --print-config for the defaults)")
    cfg = resolve_train_config(task_name, args)
    if args.print_config:
        sys.stdout.write(describe_config(cfg))
        return 0
    task = task_class(task_name)(cfg)

    from mm.engine.launch import PREEMPTED_EXIT, Preempted
    from mm.engine.trainer import train

    try:
        result = train(task)
    except Preempted as e:
        # Not exit 2 (bad input): a scheduler that requeues on 143 (SIGTERM) reruns the same command.
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["last"]
        parts = [f"{task_name}: step {result['step']}"]
        if "loss" in last:
            parts.append(f"loss {last['loss']:.4f}")
        parts += [f"{k} {v:.4f}" for k, v in result["eval"].items() if k.endswith(task.headline)]
        parts.append(f"export {result['export']}")
        print(" | ".join(parts))
        print(json.dumps({"task": task_name, **{k: v for k, v in result.items() if k != "engine"}}, default=str))
    return 0


@cli_main
def train_main(task_name: str, argv: list[str] | None = None) -> int:
    """train/<task>.py: `mm train <task>` with the task fixed."""
    args = train_parser(task_name, prog=f"train/{task_name}.py").parse_args(argv)
    return run_training(task_name, args)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`mm train ...`, dispatched from `mm` (this module is COMMANDS['train'])."""
    args = train_parser(None).parse_args(argv)
    return run_training(args.task, args)


# --- mm --------------------------------------------------------------------------------------------


def _strip_leading_local_rank(argv: list[str]) -> list[str]:
    """`deepspeed --module mm ...` runs `python -m mm --local_rank=N <args>`: the flag lands before the
    sub-command. It goes to `mm train`, which accepts it; LOCAL_RANK in the environment says the same."""
    moved = []
    while argv and argv[0].startswith("--local_rank"):
        flag = argv.pop(0)
        moved.append(flag)
        if flag == "--local_rank" and argv:
            moved.append(argv.pop(0))
    return argv + moved if argv and argv[0] == "train" else argv


def build_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    table = "\n".join(f"  {n:<{width}}  {c.help}" + (f" (alias {', '.join(c.aliases)})" if c.aliases else "")
                      for n, c in COMMANDS.items())
    p = argparse.ArgumentParser(prog="mm", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="One data layer, one DeepSpeed engine, five trainers and their "
                                            "evaluators.", epilog=f"commands:\n{table}\n\n`mm COMMAND --help` "
                                                                 f"for each command's options.")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see below")
    return p


def mm_main(argv: list[str] | None = None) -> int:
    """The `mm` console script and `python -m mm`."""
    argv = _strip_leading_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        build_parser().parse_args([name])  # argparse's one-line "invalid choice" error, exit 2
    try:
        command_main = _command_main(name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return command_main(rest)
