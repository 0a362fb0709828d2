"""Labelled image sets for mm-zeroshot besides shards: an image folder (one sub-folder per class) and
a CSV or JSONL list (image path + label). Both are small torch Datasets read through a plain torch
DataLoader with the model's preprocess; batches are {"image", "label"} like the shared loader's.

CLIP_benchmark's WebDataset sets are read as they are published: a root with classnames.txt,
zeroshot_classification_templates.txt ('{c}' for the class name), dataset_type.txt and
`{split}/nshards.txt` next to `{split}/0.tar, 1.tar, ...`; samples hold a webp/png/jpg image and a
`.cls` integer label (classification) or a `.txt` with one caption per line (retrieval).

Unreadable images are not fatal: a sample that fails to decode comes back as {"bad": (path, reason)},
`collate` sets such samples aside in the batch's "bad" list, and `SkipUnreadable` reports and counts
them while passing only the good images on.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mm.errors import DataError, UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_SUFFIXES = (".csv", ".jsonl")
PATH_FIELDS = ("filepath", "image", "path", "file_name", "filename")
LABEL_FIELDS = ("label",)


def dataset_kind(data: str) -> str:
    """'clip_benchmark' for a CLIP_benchmark WebDataset root, 'folder' for another directory, 'list' for
    a .csv/.jsonl file, otherwise 'shards'."""
    if not data.strip():
        raise UserError("--data is empty: give shards, an image folder or a .csv/.jsonl list")
    if is_clip_benchmark_root(data):
        return "clip_benchmark"
    if Path(data).is_dir():
        return "folder"
    if data.lower().endswith(LIST_SUFFIXES):
        return "list"
    return "shards"


class ImageLabelDataset(Dataset):
    """(image path, int label) pairs decoded to RGB and preprocessed on access."""

    def __init__(self, items: list[tuple[str, int]], preprocess: Callable[[Image.Image], torch.Tensor],
                 classnames: list[str]):
        self.items = items
        self.preprocess = preprocess
        self.classnames = classnames

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image.load()
                rgb = image.convert("RGB")
        except Exception as e:  # PIL raises many types for corrupt or unreadable files
            return {"bad": (path, f"{type(e).__name__}: {e}".splitlines()[0])}
        return {"image": self.preprocess(rgb), "label": label}


def _int_label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


class FolderDataset(ImageLabelDataset):
    """An image folder with one sub-folder per class; images anywhere below a class folder.

    Class folders are taken in sorted order. Without `classnames` the folder names are the class
    names. With `classnames`, folders are matched to them: by name when every folder name is a class
    name; by number when every folder name is an integer (0 .. n-1); otherwise by sorted position when
    there are as many folders as class names (the ImageFolder convention, e.g. ImageNet's wnid
    folders with curated names). `label_mapping` says which was used.
    """

    def __init__(self, root: str | Path, preprocess: Callable, classnames: list[str] | None = None):
        root = Path(root)
        folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                         key=lambda d: d.name)
        if not folders:
            raise UserError(f"{root}: no class sub-folders (expected one folder of images per class)")
        names = [d.name for d in folders]
        if classnames is None:
            classnames, labels, self.label_mapping = names, list(range(len(names))), "folder_names"
        elif all(n in classnames for n in names):
            labels, self.label_mapping = [classnames.index(n) for n in names], "by_name"
        elif all(_int_label(n) is not None for n in names):
            labels, self.label_mapping = [int(n) for n in names], "by_number"
            for folder, label in zip(folders, labels):
                if not 0 <= label < len(classnames):
                    raise DataError(f"{folder}: label {label} outside the {len(classnames)} class names")
        elif len(names) == len(classnames):
            labels, self.label_mapping = list(range(len(names))), "sorted_position"
        else:
            folder = next(d for d in folders if d.name not in classnames)
            raise DataError(f"{folder}: folder {folder.name!r} is not one of the {len(classnames)} class "
                            f"names, and {len(folders)} folders cannot be matched to them by position")
        items, self.ignored = [], []
        for folder, label in zip(folders, labels):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((str(path), label))
                elif not path.name.startswith("."):
                    self.ignored.append(str(path))
        if not items:
            raise UserError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders")
        super().__init__(items, preprocess, classnames)


def _read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a CSV with a header row or from JSONL."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                for row in reader:
                    yield reader.line_num, row
            else:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise DataError(f"{path}:{lineno}: not a JSON object") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{lineno}: not a JSON object")
                    yield lineno, record
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"{path}: not valid CSV: {e}") from None


class ListDataset(ImageLabelDataset):
    """A CSV (header row) or JSONL list: an image path column (filepath, image, path, file_name) and a
    `label` that is an int index into `classnames` or a class name. Relative paths are taken from the
    list file's folder."""

    def __init__(self, list_file: str | Path, preprocess: Callable, classnames: list[str]):
        path = Path(list_file)
        if not path.is_file():
            raise UserError(f"{path}: no such list file")
        index: dict[str, int] = {}
        for i, name in enumerate(classnames):
            index.setdefault(name, i)  # a repeated name (ImageNet has two) means its first class
        items: list[tuple[str, int]] = []
        path_field = None
        for lineno, record in _read_records(path):
            where = f"{path}:{lineno}"
            if path_field is None:
                path_field = next((f for f in PATH_FIELDS if f in record), None)
                if path_field is None or "label" not in record:
                    raise UserError(f"{path}: needs an image path column ({', '.join(PATH_FIELDS)}) and a "
                                    f"'label' column; found {', '.join(map(str, record)) or 'none'}")
            value = record.get(path_field)
            if not value:
                raise DataError(f"{where}: no image path in '{path_field}'")
            raw = record.get("label")
            label = _int_label(raw)
            if label is None:
                if not isinstance(raw, str) or raw.strip() not in index:
                    raise DataError(f"{where}: label {raw!r} is not one of the {len(classnames)} class names")
                label = index[raw.strip()]
            elif not 0 <= label < len(classnames):
                raise DataError(f"{where}: label {label} outside the {len(classnames)} class names")
            image = Path(value)
            items.append((str(image if image.is_absolute() else path.parent / image), label))
        if not items:
            raise UserError(f"{path}: no rows")
        self.label_mapping = "list"
        self.ignored = []
        super().__init__(items, preprocess, classnames)


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack the good samples; unreadable ones go to "bad" as (path, reason)."""
    good = [s for s in samples if "image" in s]
    return {"image": torch.stack([s["image"] for s in good]) if good else None,
            "label": torch.tensor([s["label"] for s in good], dtype=torch.long),
            "bad": [s["bad"] for s in samples if "bad" in s]}


def image_label_loader(dataset: Dataset, batch_size: int = 64, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)


class SkipUnreadable:
    """Wraps a batch iterable: reports each unreadable image on stderr, keeps them in `skipped`, and
    yields only batches with at least one image (batches without a "bad" list pass through)."""

    def __init__(self, batches: Iterable[dict], report: bool = True):
        self.batches = batches
        self.report = report
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            for path, reason in batch.get("bad", ()):
                self.skipped.append((path, reason))
                if self.report:
                    print(f"warning: skipped unreadable image {path} ({reason})", file=sys.stderr)
            if batch["image"] is not None and len(batch["image"]):
                yield batch


def build_dataset(data: str, preprocess: Callable, classnames: list[str] | None) -> ImageLabelDataset:
    """A FolderDataset or ListDataset for --data (see `dataset_kind`)."""
    kind = dataset_kind(data)
    if kind == "folder":
        return FolderDataset(data, preprocess, classnames)
    if kind == "list":
        if classnames is None:
            raise UserError(f"{data}: a list needs --classnames")
        return ListDataset(data, preprocess, classnames)
    raise UserError(f"{data}: not an image folder or a .csv/.jsonl list")


# ---------------------------------------------------------------------------------------------------
# CLIP_benchmark WebDataset sets
# ---------------------------------------------------------------------------------------------------

CLIP_BENCHMARK_TASKS = {"zeroshot_classification": ("classification",), "zeroshot_retrieval": ("retrieval",)}


def is_clip_benchmark_root(data: str | Path) -> bool:
    """A directory laid out as CLIP_benchmark's WebDataset sets: a `<split>/nshards.txt`, or the
    dataset_type.txt / templates file at its top. (classnames.txt alone does not count: an image folder
    may carry one.)"""
    if not str(data).strip():  # Path("") is the working directory
        return False
    root = Path(data)
    if not root.is_dir():
        return False
    return ((root / "dataset_type.txt").is_file() or (root / "zeroshot_classification_templates.txt").is_file()
            or any(p.is_file() for p in root.glob("*/nshards.txt")))


@dataclass
class ClipBenchmarkSet:
    """One split of a CLIP_benchmark WebDataset root, as read from its text files."""

    root: str
    split: str
    dataset_type: str  # classification, retrieval or multilabel (dataset_type.txt; classification if absent)
    shards: list[str]
    classnames: list[str] | None  # classnames.txt, if present
    templates: list[str] | None  # zeroshot_classification_templates.txt with '{c}' written as '{}'

    @property
    def urls(self) -> str:
        """The shards as one brace pattern for the shared loader."""
        return str(Path(self.root) / self.split / f"{{0..{len(self.shards) - 1}}}.tar")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def _benchmark_classnames(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    names = [line.strip() for line in _read_text(path).splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UserError(f"{path}: empty")
    if "" in names:  # a label is a line number: a blank line in the middle would shift the classes after it
        raise DataError(f"{path}:{names.index('') + 1}: blank line among the class names")
    return names


def _benchmark_templates(path: Path) -> list[str] | None:
    from mm.data.classnames import template_strings

    if not path.is_file():
        return None
    lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: empty")
    # CLIP_benchmark fills templates with str.format(c=name); mm fills '{}'.
    try:
        return template_strings([t.replace("{c}", "{}") for t in lines])
    except UserError as e:
        raise UserError(f"{path}: {str(e).removeprefix('templates: ')} (CLIP_benchmark writes the class name "
                        "as '{c}')") from None


def read_clip_benchmark_root(root: str | Path, split: str = "test") -> ClipBenchmarkSet:
    """The split of a CLIP_benchmark WebDataset root: its shards (all present, checked here), dataset
    type, class names and templates. A missing split, a bad nshards.txt or a missing shard is a
    one-line UserError naming the file."""
    root = Path(root)
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        splits = sorted(p.parent.name for p in root.glob("*/nshards.txt"))
        found = f"splits here: {', '.join(splits)}" if splits else "no <split>/nshards.txt at all"
        raise UserError(f"{root}: no split {split!r} ({nshards_file} missing; {found})")
    text = _read_text(nshards_file).strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{nshards_file}: {text!r} is not a number of shards (>= 1)")
    shards = [str(root / split / f"{i}.tar") for i in range(int(text))]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such shard ({len(missing)} of the {len(shards)} shards that "
                        f"{nshards_file} announces are missing)")
    type_file = root / "dataset_type.txt"
    dataset_type = _read_text(type_file).strip().lower() if type_file.is_file() else "classification"
    return ClipBenchmarkSet(str(root), split, dataset_type or "classification", shards,
                            _benchmark_classnames(root / "classnames.txt"),
                            _benchmark_templates(root / "zeroshot_classification_templates.txt"))


def clip_benchmark_set(data: str, split: str | None, task: str) -> ClipBenchmarkSet | None:
    """The CLIP_benchmark set --data names for `task` (zeroshot_classification or zeroshot_retrieval),
    or None when --data is not such a root (then --split must not be given). A set of the other kind
    is a UserError saying which command reads it."""
    if not is_clip_benchmark_root(data):
        if split is not None:
            raise UserError(f"--split {split}: only for a CLIP_benchmark root (a folder with <split>/nshards.txt); "
                            f"{data} is not one")
        return None
    cb = read_clip_benchmark_root(data, split or "test")
    if cb.dataset_type not in CLIP_BENCHMARK_TASKS[task]:
        other = {"retrieval": "mm retrieval", "classification": "mm zeroshot"}.get(cb.dataset_type)
        use = f"; use {other}" if other else ""
        raise UserError(f"{data}: a CLIP_benchmark {cb.dataset_type} set (dataset_type.txt), not one for "
                        f"{task}{use}")
    return cb


def clip_benchmark_prompts(cb: ClipBenchmarkSet, classnames: str | None, templates: str | None
                           ) -> tuple[list[str], list[str], str, str]:
    """(class names, templates, where each came from) for a CLIP_benchmark set: the root's own files
    unless `classnames` / `templates` (--classnames / --templates: a built-in set or a file) override them."""
    from mm.data.classnames import BUILTIN_TEMPLATES, load_classnames, load_templates

    if classnames is not None:
        names, names_from = load_classnames(classnames), classnames
    elif cb.classnames is not None:
        names, names_from = cb.classnames, str(Path(cb.root) / "classnames.txt")
    else:
        raise UserError(f"{cb.root}: no classnames.txt; give --classnames")
    if templates is not None:
        prompts, prompts_from = load_templates(templates), templates
    elif cb.templates is not None:
        prompts, prompts_from = cb.templates, str(Path(cb.root) / "zeroshot_classification_templates.txt")
    elif classnames in BUILTIN_TEMPLATES:
        prompts, prompts_from = load_templates(classnames), classnames
    else:
        raise UserError(f"{cb.root}: no zeroshot_classification_templates.txt; give --templates")
    return names, prompts, names_from, prompts_from


def cls_label(raw: dict) -> int:
    """The integer label of a raw sample's `.cls` field (CLIP_benchmark's classification shards)."""
    from mm.data.loader import SampleError

    value = raw.get("cls")
    if value is None:
        raise SampleError("missing_label", raw.get("__key__", "?"))
    text = value.decode("utf-8", "replace").strip() if isinstance(value, bytes) else str(value).strip()
    label = _int_label(text)
    if label is None:
        raise SampleError("bad_label", f"{raw.get('__key__', '?')}: .cls {text[:40]!r}")
    return label


def cls_shard_batches(preprocess: Callable, urls: str, n_classes: int, batch_size: int = 64,
                      num_workers: int = 0) -> Any:
    """One pass in order over shards with `.cls` labels through the shared loader: batches with `image`
    and `label`. Undecodable images and unusable labels are skipped and counted (`bad_counts`); a label
    outside the class list is a DataError naming the shard."""
    from mm.data.image_text import decode_image
    from mm.data.loader import Loader, StreamSpec, default_collate

    def sample_map(raw: dict, rng: random.Random) -> dict:
        label = cls_label(raw)
        if not 0 <= label < n_classes:
            raise DataError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')} has label {label}, "
                            f"outside the {n_classes} class names")
        return {"image": preprocess(decode_image(raw)), "label": torch.tensor(label), "key": raw["__key__"]}

    spec = StreamSpec(urls=urls, sample_map=sample_map, collate=default_collate, batch_size=batch_size,
                      num_workers=num_workers, shuffle_buffer=0, repeat=False, drop_last=False)
    return Loader(spec)
