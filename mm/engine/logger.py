"""Rank-0 metrics: one JSON line per record in metrics.jsonl, the same values in TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if enabled:
            self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run, closed by close()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
