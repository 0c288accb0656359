"""Per-epoch metrics on disk: ``metrics.jsonl``, ``metrics.csv`` and (if installed) TensorBoard.

Both files are rewritten whole from the run's history after every epoch (atomically), so a run that
was killed and resumed from its checkpoint never shows an epoch twice or one the checkpoint lacks.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from zootune.atomic import atomic_write_bytes


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricLog:
    """Writes the history of one run into ``out_dir``; create it on rank 0 only."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tb = _tensorboard_writer(self.out_dir / "tensorboard") if tensorboard else None

    def write(self, history: list[dict]) -> None:
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
        atomic_write_bytes(self.out_dir / "metrics.jsonl", lines.encode())
        columns: list[str] = []
        for row in history:  # epochs without validation lack the val_* columns
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(self.out_dir / "metrics.csv", buf.getvalue().encode())
        if self.tb is not None and history:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
