"""What every evaluation command shares beyond its model: the device and autocast precision it runs
with, several datasets per call with an output-name template, and progress bars.

Output templates name one file per dataset with str.format placeholders (TEMPLATE_FIELDS):
`--output "results/{dataset}_{model}.json"`. A template without `{dataset}` is a fixed name, refused
when several datasets would all write it.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import string
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mm.errors import UserError, check_output_file

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TEMPLATE_FIELDS = {
    "dataset": "the dataset's name (see dataset_name: folder, file stem or shard prefix)",
    "model": "--model's architecture or folder name; for --checkpoint the run name (runs/NAME/export/...) "
             "or the file stem",
    "pretrained": "the weights' file stem (--pretrained, --checkpoint) or the model folder's name",
    "task": "zeroshot_classification, zeroshot_retrieval or compositional",
    "scoring": "pooled, tokenwise or tokenwise-mean",
}
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}


# ---------------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------------

def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --precision, as every evaluation command spells them."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU when there "
                                                         "is one)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype; auto = bf16 (fp16 without bf16 support) on a GPU, fp32 on the "
                             "CPU; fp16 only on a GPU")


def pick_device(name: str) -> torch.device:
    """The torch device of a --device value; a GPU that is not there is a one-line UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s) here "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for a --precision value on `device`. fp16 on the CPU is refused: CPU autocast
    to fp16 is slow and has no loss scaling to lean on, and bf16 gives the same memory saving there."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU (--device cuda); use fp32 or bf16 on the CPU")
    return name


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast to the precision's dtype on the device's type; no-op for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@dataclass
class Runtime:
    device: torch.device
    precision: str

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "precision": self.precision}


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    device = pick_device(args.device)
    return Runtime(device, pick_precision(args.precision, device))


# ---------------------------------------------------------------------------------------------------
# Several datasets per call
# ---------------------------------------------------------------------------------------------------

def add_output_arguments(parser: argparse.ArgumentParser, what: str = "the metrics JSON") -> None:
    fields = ", ".join("{" + k + "}" for k in TEMPLATE_FIELDS)
    parser.add_argument("--output", help=f"write {what} here; a template with {fields} placeholders names one "
                                         f"file per dataset (needed with several --data), e.g. "
                                         f"'results/{{dataset}}_{{model}}.json'")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip each dataset whose --output file already exists")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "data"


def dataset_name(spec: str) -> str:
    """A short name for a --data value: a folder's name, a list file's stem, or the prefix of a shard
    pattern (shapes-{000000..000003}.tar -> shapes); a bare split folder (test, val) keeps its parent's
    name in front (cifar10/test/{0..9}.tar -> cifar10-test)."""
    spec = spec.rstrip("/")
    if spec.startswith("pipe:"):
        spec = spec.split()[-1]
    path = Path(re.sub(r"^[a-z][a-z0-9+.-]*://", "", spec))
    if Path(spec).is_dir():
        base, parent = path.name, path.parent
    else:
        name = path.name
        for suffix in (".tar.gz", ".tar", ".tgz", ".csv", ".jsonl"):
            if name.endswith(suffix):
                name = name[:-len(suffix)]
                break
        base, parent = re.sub(r"[-_.]*\d*$", "", re.sub(r"\{[^}]*\}", "", name)), path.parent
        if not base:
            base, parent = parent.name, parent.parent
    if base.lower() in SPLIT_NAMES and parent.name:
        base = f"{parent.name}-{base}"
    return _slug(base)


def check_template(template: str, option: str) -> list[str]:
    """The placeholders of an output template; an unknown one or a format error is a one-line UserError."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(f"{option} {template!r}: not a valid template ({e}); write a literal brace as {{{{ }}}}") \
            from None
    bad = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if bad:
        raise UserError(f"{option} {template!r}: unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; "
                        f"use {', '.join('{' + k + '}' for k in TEMPLATE_FIELDS)}")
    return names


@dataclass
class DatasetRun:
    data: str  # the --data value
    name: str  # its {dataset} name
    outputs: dict[str, str | None]  # option -> the file it names for this dataset (None: not given)
    skip: bool = False  # --skip-existing and the --output file is there


def plan_datasets(datasets: list[str], templates: dict[str, str | None], fields: dict[str, str],
                  skip_existing: bool = False) -> list[DatasetRun]:
    """One DatasetRun per --data value, its output files named by the templates (option -> template).

    Refused in one line, before anything runs: a template without {dataset} when there are several
    datasets, two datasets that would write one file, --skip-existing without --output, a path that
    cannot be written. The first template is the one --skip-existing looks at."""
    if not datasets:
        raise UserError("give at least one --data")
    first = next(iter(templates))
    if skip_existing and not templates[first]:
        raise UserError(f"--skip-existing needs {first} (it skips datasets whose {first} file exists)")
    for option, template in templates.items():
        if template and "dataset" not in check_template(template, option) and len(datasets) > 1:
            raise UserError(f"{option} {template}: {len(datasets)} datasets would all write this one file; put "
                            f"{{dataset}} in it, e.g. {option} '{{dataset}}_{{model}}.json'")
    runs = []
    for data in datasets:
        name = dataset_name(data)
        outputs = {option: template.format(**fields, dataset=name) if template else None
                   for option, template in templates.items()}
        runs.append(DatasetRun(data, name, outputs))
    for option in templates:
        seen: dict[str, str] = {}
        for run in runs:
            path = run.outputs[option]
            if path is None:
                continue
            key = str(Path(path).absolute())
            if key in seen:
                raise UserError(f"{option}: --data {seen[key]} and --data {run.data} would both write {path} "
                                f"(both are named {run.name!r}); give them distinct folder or file names")
            seen[key] = run.data
            check_output_file(path, option)
    for run in runs:
        target = run.outputs[first]
        run.skip = bool(skip_existing and target and Path(target).exists())
    return runs


def announce_skip(run: DatasetRun, option: str = "--output") -> None:
    print(f"skipping {run.data}: {option} {run.outputs[option]} exists (--skip-existing)", file=sys.stderr,
          flush=True)


# ---------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------

def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "batch") -> Iterator:
    """A tqdm bar on stderr (when it is a terminal), with the total when the size is known: `total`,
    else len(items) where the iterable has one (a streaming loader has none)."""
    from tqdm import tqdm

    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False)
