"""The one DeepSpeed training loop every task runs on."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mm.config import config_json
from mm.engine import checkpoint, run_dir
from mm.engine.ds_config import build_ds_config
from mm.engine.launch import GracefulStop, Preempted, init_distributed, launch_command
from mm.engine.logger import MetricsLogger
from mm.engine.task import ContrastiveTask, Task, World
from mm.errors import UserError


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases and other parameters of rank < 2, the 0-dim temperature
    included (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bias" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _rng_state() -> dict:
    # numpy's state as plain lists: a checkpoint then holds nothing a weights-only load refuses.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _gather_object(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move tensors to the device; floating inputs take the model's compute dtype (bf16/fp16 engines
    hold half-precision weights and DeepSpeed does not cast inputs)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _apply_optim(scheduler: Any, optim: Any, weight_decays: list[float], schedule: Callable[[int], float]) -> None:
    """After a resume with changed optim.* or train.steps: the restored optimizer and scheduler state
    hold the checkpoint's values, so set this run's lr, betas, eps and weight decay and re-derive the
    current lr from the schedule at the restored step (Adam's moments are kept)."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [optim.lr] * len(groups)
    scheduler.lr_lambdas = [schedule] * len(groups)
    for group, decay in zip(groups, weight_decays):
        group.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=decay, initial_lr=optim.lr)
        group["lr"] = optim.lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


def _model_config(cfg: Any) -> str:
    """The model section as JSON: a checkpoint of another architecture is refused by name, not by a
    tensor-shape error deep inside DeepSpeed."""
    import dataclasses

    model = getattr(cfg, "model", None)
    return json.dumps(dataclasses.asdict(model), sort_keys=True) if dataclasses.is_dataclass(model) else ""


def _nonfinite_flags(losses: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    """Names of the losses that are NaN or inf on ANY rank. Every rank calls this before backward and
    gets the same answer, so all skip the step together (one rank skipping alone would hang the others
    in the gradient all-reduce)."""
    names = sorted(losses)
    flags = torch.stack([(~torch.isfinite(losses[k].detach().float())).any().float() for k in names]).to(device)
    dist.all_reduce(flags)
    return [k for k, f in zip(names, flags.tolist()) if f > 0]


def _groups(loader: Any, k: int) -> Any:
    """The loader's batches in lists of k (the micro-batches of one contrastive batch)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []


def _sum_counts(counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for rank_counts in _gather_object(counts):
        for k, v in rank_counts.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def merge_batches(batches: list[dict]) -> dict:
    """The micro-batches as one batch: tensors concatenated on dim 0, lists joined."""
    out = {}
    for key, first in batches[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([b[key] for b in batches], 0)
        elif isinstance(first, list):
            out[key] = [x for b in batches for x in b[key]]
        else:
            out[key] = first
    return out


def merge_embeddings(cached: list[dict], live: dict, index: int) -> dict:
    """Every micro-batch's embeddings as one batch's, micro-batch `index` the live (differentiable) one.
    0-dim tensors (a logit scale) are shared by all: live in pass 0 only, so their gradient is counted
    once, not k times (open_clip's accumulation counts the logit scale's k times)."""
    out = {}
    for key, value in live.items():
        if value is None or not isinstance(value, torch.Tensor):
            out[key] = value
        elif value.ndim == 0:
            out[key] = value if index == 0 else cached[index][key]
        else:
            out[key] = torch.cat([value if i == index else c[key] for i, c in enumerate(cached)], 0)
    return out


def _rng_snapshot() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _rng_restore(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def contrastive_accum_backward(task: ContrastiveTask, engine: Any, batches: list[dict],
                               check: Callable[[dict], list[str]] | None = None
                               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip's --accum-freq: one contrastive batch from len(batches) micro-batches.

    All micro-batches are embedded without gradients; then each is embedded again with gradients and
    the loss of the whole batch (its live embeddings, the others' cached ones) is backpropagated. The
    gradients summed over the k passes are those of the k-times-larger batch. The engine must count k
    micro-steps per optimizer step (DeepSpeed gradient_accumulation_steps = grad_accum * k): each
    loss is multiplied by k because DeepSpeed averages, and engine.step() is called after each
    backward but the last, which the caller makes. The RNG is replayed per micro-batch, so dropout and
    drop-path draw the same masks in both passes. `check(losses)` names non-finite losses: then
    nothing is backpropagated (the loss is the same number in every pass, so the first decides).
    Returns the losses (detached) and the non-finite names.
    """
    k = len(batches)
    cached, states = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(_rng_snapshot())
            cached.append({n: v.detach() if isinstance(v, torch.Tensor) else v
                           for n, v in task.embed(engine, batch).items()})
    whole = merge_batches(batches)
    first: dict[str, torch.Tensor] = {}
    for j, batch in enumerate(batches):
        _rng_restore(states[j])
        losses = task.loss_from_embeddings(merge_embeddings(cached, task.embed(engine, batch), j), whole)
        if j == 0:
            first = {n: v.detach() for n, v in losses.items()}
            bad = check(losses) if check else []
            if bad:
                return first, bad
        engine.backward(losses["loss"] * k)
        del losses
        if j < k - 1:
            engine.step()
    return first, []


def offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") == "cpu"


def make_optimizer(groups: list[dict], optim: Any, ds_config: dict, verbose: bool = True) -> torch.optim.Optimizer:
    """AdamW over `groups`: DeepSpeed's vectorised CPU Adam (its `cpu_adam` op, compiled on first use
    into TORCH_EXTENSIONS_DIR) when the config offloads the optimizer to the CPU, where the step runs;
    torch's AdamW otherwise, and where that op cannot be built (one line says so). Both are AdamW with
    decoupled weight decay and bias correction; torch's is its fused kernel where the parameters allow it."""
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if offloads_optimizer(ds_config):
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        except Exception as e:  # a failed compile raises anything from RuntimeError to ImportError
            if verbose:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
                print(f"note: DeepSpeedCPUAdam is unavailable here ({reason}); the offloaded optimizer step "
                      f"runs torch's AdamW", file=sys.stderr, flush=True)
    # ZeRO hands the optimizer one flat fp32 tensor per group: torch's default AdamW then streams it
    # through memory once per elementwise op (0.23 s a step for 22 M parameters on a 1-thread CPU, more
    # than the whole ZeRO overhead), the fused kernel once (0.02 s). Same update to float rounding.
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fusable or None, **kwargs)


def check_contrastive_accum(task: Task) -> int:
    """train.contrastive_accum, refused in one line for a task without the embed/loss split."""
    accum = task.cfg.train.contrastive_accum
    if accum > 1 and not isinstance(task, ContrastiveTask):
        raise UserError(f"train.contrastive_accum: the {task.name} task has no embedding/loss split to "
                        f"accumulate contrastive batches with; use train.grad_accum (or contrastive_accum=1)")
    return accum


def apply_grad_checkpointing(task: Task, model: torch.nn.Module) -> None:
    """train.grad_checkpointing through the model's `set_grad_checkpointing` (open_clip's and timm's
    convention), refused in one line for a model without it."""
    if not task.cfg.train.grad_checkpointing:
        return
    enable = getattr(model, "set_grad_checkpointing", None)
    if enable is None:
        raise UserError(f"train.grad_checkpointing: the {task.name} task's model has no activation "
                        f"checkpointing; set train.grad_checkpointing=false")
    enable(True)


def train(task: Task) -> dict[str, Any]:
    """Train `task` on its config (task.cfg) to cfg.train.steps optimizer steps, resuming from
    train.out_dir if possible.

    Returns the last logged values, the evaluation metrics, the export path and the DeepSpeed engine
    (on every rank). Rank 0 holds out_dir's lock for the whole call; SIGTERM or the launcher's death
    stops the run at the next step with a checkpoint (raises Preempted).
    """
    init_distributed()
    cfg = task.cfg
    lock = run_dir.RunLock(cfg.train.out_dir)
    try:
        with GracefulStop(cfg.train.stop_grace_s, dist.get_rank()) as stop:
            return _train(task, cfg, lock, stop)
    finally:
        lock.release()


def _train(task: Task, cfg: Any, lock: run_dir.RunLock, stop: GracefulStop) -> dict[str, Any]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = task.cfg
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    # Inputs are checked before anything is written, so a bad command leaves no partial run directory.
    task.check()
    on_gpu = get_accelerator().device_name() != "cpu"
    accum = check_contrastive_accum(task)
    # DeepSpeed counts every backward as a micro-step: k of them per accumulated contrastive batch.
    ds_config = build_ds_config(tc.deepspeed_config, cfg.data.batch_size, tc.grad_accum * accum, tc.grad_clip,
                                tc.precision, world, on_gpu)

    # Same seed on every rank: the model must start identical everywhere (ZeRO-3 partitions it as built).
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = task.build_model()
    apply_grad_checkpointing(task, model)

    model_config = _model_config(cfg)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    problem, plan, launch = "", (None, []), {}
    if rank == 0:
        try:
            launch = launch_command(world)
            tag, lines, applied = run_dir.prepare(out_dir, cfg, task.name, world, model_config, zero_stage, lock,
                                                  launch)
            plan = (tag, applied)
            for line in lines:
                print(line, file=sys.stderr, flush=True)
        except UserError as e:
            problem = str(e)
        except OSError as e:
            problem = f"train.out_dir: cannot write to {out_dir} ({e.strerror})"
    # Every rank raises together instead of the others waiting on rank 0 for ever.
    problem, (resume_tag, applied) = _gather_object((problem, plan))[0]
    if problem:
        raise UserError(problem)
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = make_optimizer(groups, cfg.optim, ds_config, verbose=rank == 0)
    schedule = warmup_cosine(cfg.optim.warmup_steps, tc.steps, cfg.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)

    client = checkpoint.resume(engine, out_dir, resume_tag) if resume_tag else None
    if client and any(k.startswith("optim.") or k == "train.steps" for k in applied):
        _apply_optim(scheduler, cfg.optim, [g["weight_decay"] for g in groups], schedule)
    step = int(client["step"]) if client else 0
    skipped = int(client.get("skipped_steps", 0)) if client else 0
    data_state = client["data"][rank] if client else None
    if client:
        _set_rng_state(client["rng"][rank])
    else:
        # Dropout and other model randomness differ per rank, as in any data-parallel run.
        torch.manual_seed(tc.seed * 1000 + rank + 1)

    loader = task.batches("train", World(rank, world), state=data_state)
    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
    logger = MetricsLogger(out_dir, enabled=rank == 0)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        # Under a launcher stderr is a pipe: redraw rarely so logs stay readable.
        progress = tqdm(total=tc.steps, initial=step, desc=f"{task.name}", unit="step", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def save_checkpoint() -> str:
        state = {"step": step, "data": _gather_object(loader.state_dict()), "rng": _gather_object(_rng_state()),
                 "skipped_steps": skipped}
        return checkpoint.save(engine, out_dir, step, state, tc.keep_checkpoints, task.name, world, model_config,
                               extra={"config": config_json(cfg), "zero_stage": zero_stage})

    sums: dict[str, float] = {}
    n_micro, t0, last_logged, last_tag, consecutive = 0, time.time(), {}, None, 0
    try:
        if step < tc.steps:
            engine.train()
            for group in _groups(loader, accum):
                group = [_to_device(b, engine.device, compute_dtype) for b in group]
                if accum == 1:
                    losses = task.losses(engine, group[0], step)
                    bad_losses = _nonfinite_flags(losses, engine.device)
                else:
                    losses, bad_losses = contrastive_accum_backward(
                        task, engine, group, lambda x: _nonfinite_flags(x, engine.device))
                if bad_losses:
                    # No backward, no optimizer step: the batch is dropped and the run goes on. (With fp16,
                    # DeepSpeed's loss scaler separately skips steps whose gradients overflow.)
                    del losses
                    skipped += 1
                    consecutive += 1
                    if rank == 0:
                        print(f"warning: step {step + 1}: non-finite {', '.join(bad_losses)}; step skipped "
                              f"({consecutive} in a row, {skipped} in all)", file=sys.stderr, flush=True)
                    logger.log(step + 1, {"skipped_steps": skipped, "nonfinite_losses": bad_losses})
                    if consecutive >= tc.max_nonfinite_steps:
                        raise UserError(
                            f"step {step + 1}: non-finite {', '.join(bad_losses)} in {consecutive} consecutive "
                            f"steps (train.max_nonfinite_steps={tc.max_nonfinite_steps}); the run has diverged: "
                            f"lower optim.lr or check the data, then resume from the last checkpoint")
                    continue
                consecutive = 0
                if accum == 1:
                    engine.backward(losses["loss"])
                engine.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float())
                n_micro += 1
                if engine.global_steps == step:  # still accumulating gradients
                    continue
                step = engine.global_steps
                if progress:
                    progress.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    values = _mean_over_ranks({k: v / n_micro for k, v in sums.items()})
                    elapsed = time.time() - t0
                    values["lr"] = scheduler.get_last_lr()[0]
                    values["samples_per_s"] = n_micro * accum * cfg.data.batch_size * world / max(elapsed, 1e-9)
                    # Per kind and summed over ranks (each rank reads its own shards).
                    bad = _sum_counts(loader.bad_counts)
                    values["bad_samples"] = float(bad.get("total", 0))
                    values.update({f"bad/{k}": v for k, v in sorted(bad.items()) if k != "total"})
                    values["skipped_steps"] = skipped
                    if cfg.data.samples_per_epoch:
                        global_batch = cfg.data.batch_size * tc.grad_accum * accum * world
                        values["epoch"] = step * global_batch / cfg.data.samples_per_epoch
                    logger.log(step, values)
                    if progress:
                        progress.set_postfix(loss=f"{values['loss']:.4f}")
                    last_logged, sums, n_micro, t0 = values, {}, 0, time.time()
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    logger.log(step, task.evaluate(engine.module))
                    engine.train()
                if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.steps:
                    last_tag = save_checkpoint()
                if step >= tc.steps:
                    break
                if stop.agreed(engine.device):
                    stop.saving()
                    if last_tag != f"step{step:08d}":
                        last_tag = save_checkpoint()
                    raise Preempted(f"stopped at step {step} ({stop.reason or 'another rank was asked to stop'}); "
                                    f"checkpoint {out_dir / 'checkpoints' / last_tag} saved; run the same "
                                    f"command to resume")
            last_tag = save_checkpoint()
        else:
            last_tag = resume_tag
    finally:
        # Ends the bar's line, so an error message that follows starts a line of its own.
        if progress:
            progress.close()

    export_path = out_dir / "export" / "model.safetensors"
    # Under ZeRO 1/2 every rank holds whole parameters: the frozen ones the checkpoint may lack come from here.
    frozen = None
    if engine.zero_optimization_stage() < 3:
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        frozen = {k: v.detach().cpu() for k, v in engine.module.state_dict().items() if k not in trainable}
    plan = task.export_plan(engine.module)
    if rank == 0:
        meta = {"mm_task": task.name, "mm_config": config_json(cfg), "mm_step": str(step),
                "mm_export": "full" if plan.keys is None else "trainable", "mm_command": json.dumps(launch)}
        # The task's own records: the segmentation tasks' mm_data, an open_clip model's preprocess_cfg.
        meta.update(plan.metadata)
        with checkpoint.safe_loading():  # the export reads the checkpoint files again
            checkpoint.export_safetensors(out_dir, last_tag, export_path, meta, frozen, plan.keys)
    dist.barrier()
    evaluation = task.evaluate(engine.module)
    if evaluation:
        logger.log(step, evaluation)
    # Summed over ranks: each rank reads its own shards.
    bad_counts = _sum_counts(loader.bad_counts)
    if rank == 0:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(bad_counts.items()) if k != "total")
        print(f"{task.name}: {bad_counts.get('total', 0)} bad samples skipped{f' ({kinds})' if kinds else ''}, "
              f"{skipped} non-finite steps skipped", file=sys.stderr, flush=True)
    logger.close()
    return {"step": step, "last": last_logged, "eval": evaluation, "export": str(export_path),
            "bad_counts": bad_counts, "skipped_steps": skipped, "engine": engine}
