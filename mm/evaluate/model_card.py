"""The model card (README.md of an exported folder, FILE.md beside an exported file) that every `mm export`
format writes, and the output-folder checks the folder formats share.

One writer: each format passes what differs (library, how to load, task and architecture lines, extra
sections); task, data, steps, final metrics from the run directory, the training command and the licence
fields are written the same way for all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mm.errors import UserError


def prepare_out_folder(out: Path, export: Path, overwrite: bool) -> None:
    """Refuse an --out folder that is a file, is not empty (without overwrite) or holds the export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
    res_out, res_export = out.resolve(), export.resolve()
    if res_out == res_export or res_out in res_export.parents:
        raise UserError(f"--out {out}: holds the input export {export}; choose another folder")


def run_metrics(path: Path, step: int | None) -> dict[str, Any]:
    """The last value of each metric in metrics.jsonl up to the export's step: {name: (step, value)}."""
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or (step is not None and isinstance(rec.get("step"), int) and rec["step"] > step):
            continue
        for k, v in rec.items():
            if k not in ("step", "time") and isinstance(v, (int, float, str)):
                last[k] = (rec.get("step"), v)
    return last


def _launch(meta: dict[str, str]) -> dict[str, Any]:
    try:
        launch = json.loads(meta.get("mm_command") or "{}")
    except ValueError:
        return {}
    return launch if isinstance(launch, dict) and launch.get("command") else {}


def _yaml_tree(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def model_card(export: Path, meta: dict[str, str], cfg_tree: dict[str, Any], *, library_name: str,
               pipeline_tag: str, tags: list[str], usage: list[str], task_lines: list[str],
               architecture: list[str], base_weights: str = "", data_extra: str = "",
               sections: list[str] | None = None, config_file: str | None = "training_config.yaml") -> str:
    """The card's markdown. `usage`: the loading instructions under the title; `base_weights`: the initial
    weights ("" = trained from scratch); `sections`: markdown lines placed after the architecture;
    `config_file`: the run config written beside the card (None: the config is printed in the card).
    What is not known (no run directory beside the export) is said so."""
    import yaml

    task = meta["mm_task"]
    step = int(meta["mm_step"]) if meta.get("mm_step", "").isdigit() else None
    data = cfg_tree.get("data", {})
    train = cfg_tree.get("train", {})
    optim = cfg_tree.get("optim", {})
    run = export.parent.parent if export.parent.name == "export" else None
    metrics_file = run / "metrics.jsonl" if run else None
    run_config = run / "config.yaml" if run else None
    absent = []
    lines = [
        "---",
        f"library_name: {library_name}",
        "license: other",
        "license_name: unspecified",
        "license_details: >-",
        "  The weights were trained with mm (MIT licensed code). mm records no licence for the training data",
        f"  or base weights{f' ({base_weights})' if base_weights else ''}; set `license` to theirs before publishing.",
        f"pipeline_tag: {pipeline_tag}",
        f"tags: [{', '.join(dict.fromkeys(tags))}]",
        "---",
        "",
        f"# {task} model exported from mm",
        "",
        *usage,
        "",
        "## Task",
        "",
        *task_lines,
        "",
        "## Architecture",
        "",
        *architecture,
        "",
    ]
    if sections:
        lines += [*sections, ""]
    lines += [
        "## Data",
        "",
        f"- train: `{data.get('train')}`",
        f"- val: `{data.get('val') or 'none'}`",
        f"- batch size (per rank): {data.get('batch_size')}{data_extra}",
        "",
        "## Training",
        "",
        f"- steps: {step if step is not None else 'unknown'} (of train.steps = {train.get('steps')})",
        f"- optimizer: lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, "
        f"warmup {optim.get('warmup_steps')} steps; DeepSpeed config {train.get('deepspeed_config')}; "
        f"seed {train.get('seed')}",
        "",
        "## Final metrics",
        "",
    ]
    if metrics_file and metrics_file.is_file():
        last = run_metrics(metrics_file, step)
        if last:
            lines += ["| metric | value | step |", "|---|---|---|"]
            lines += [f"| {k} | {v:.6g} | {s} |" if isinstance(v, float) else f"| {k} | {v} | {s} |"
                      for k, (s, v) in sorted(last.items())]
        else:
            lines += [f"{metrics_file} holds no metrics up to step {step}."]
    else:
        absent.append("metrics.jsonl")
        lines += ["Not known: the export does not sit in its run directory (no metrics.jsonl beside "
                  f"{export.parent}), so no metrics were recorded here."]
    lines += ["", "## Training command", ""]
    launch = _launch(meta)
    if launch:
        lines += [f"The launch that wrote this export ran, in `{launch.get('cwd')}` with "
                  f"{launch.get('world_size')} rank(s):", "", "```sh", str(launch.get("command")), "```", ""]
        launches = run / "launches.jsonl" if run else None
        if launches and launches.is_file():
            n = sum(1 for line in launches.read_text().splitlines() if line.strip())
            if n > 1:
                lines += [f"The run directory's {launches} records {n} launches (the run was resumed); "
                          "each line gives one launch's command and the checkpoint it resumed from.", ""]
    else:
        lines += ["This export does not record the command line (written before mm recorded it).", ""]
    where = f"`{config_file}` in this folder" if config_file else "below, saved as `training_config.yaml`"
    lines += [f"The resolved run config stored in the export (every key, as trained) is {where}; launched the "
              "same way, this command reruns the same training:"]
    lines += ["", "```sh", f"mm train {task} --config training_config.yaml", "```", ""]
    if not config_file:
        lines += ["```yaml", yaml.safe_dump(cfg_tree, sort_keys=False).rstrip("\n"), "```", ""]
    if run_config and run_config.is_file():
        same = _yaml_tree(run_config) == cfg_tree
        lines += [f"The run directory's config {run_config} "
                  f"{'is the same config' if same else 'differs from it (a later run rewrote it)'}.", ""]
    else:
        absent.append("config.yaml")
        lines += ["The run directory's config.yaml is absent (the export does not sit in its run directory).", ""]
    lines += [
        "## Licence",
        "",
        "- code (mm): MIT.",
        f"- training data (`{data.get('train')}`): not recorded by mm.",
        f"- base weights: {f'{base_weights}: not recorded by mm' if base_weights else 'none (from scratch)'}.",
        "",
        "## Provenance",
        "",
        f"- source export: {export} (mm_task {task}, mm_step {meta.get('mm_step')}, "
        f"mm_export {meta.get('mm_export', 'full')})",
        f"- absent from the run directory: {', '.join(absent) if absent else 'nothing'}",
        "",
    ]
    return "\n".join(lines)
