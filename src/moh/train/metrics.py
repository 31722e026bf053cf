"""Training metrics: per-batch accuracy and item counts for any model family, and a logger that
writes JSONL (always), CSV (optional) and TensorBoard (when installed) into the run directory."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

def add_metric_sums(sums: dict[str, float], metrics: dict) -> dict[str, float]:
    """Add a model's ``metrics`` (name -> (sum, count), see ``moh.models.base.ModelOutput``) into
    flat running sums ``name.sum`` / ``name.count`` (flat floats: one collective reduces them all)."""
    for name, (total, count) in metrics.items():
        for part, value in (("sum", total), ("count", count)):
            key = f"{name}.{part}"
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def metric_means(sums: dict[str, float]) -> dict[str, float]:
    """sum / count of every metric in sums made by ``add_metric_sums`` (other keys are ignored)."""
    names = [k[: -len(".sum")] for k in sums if k.endswith(".sum")]
    return {n: sums[f"{n}.sum"] / sums[f"{n}.count"] if sums[f"{n}.count"] else float("nan") for n in names}


def count_items(batch: dict) -> int:
    """Throughput unit of a batch: tokens for decoders (``input_ids`` elements), else examples."""
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    first = next(v for v in batch.values() if isinstance(v, Tensor))
    return first.shape[0]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log. A last line that does not parse (a kill in the middle of a
    write) is dropped with a warning; a bad line before it is damage: a ValueError naming the file
    and the line."""
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
            if k == len(lines) - 1:
                log.warning("%s: dropping its incomplete last line %d (%r)", path, lineno, line[:80])
                break
            raise ValueError(f"{path}: line {lineno} is not a record with a step: {line[:80]!r}")
        records.append(rec)
    return records


class MetricsLogger:
    """Appends records to ``<out_dir>/<name>.jsonl`` (and ``.csv``, TensorBoard under
    ``<out_dir>/tb``). On resume from ``start_step`` records after it are dropped, so a resumed
    run's files equal an uninterrupted run's; on a fresh start (``start_step`` 0) files restart."""

    def __init__(self, out_dir: Path, name: str, *, start_step: int, use_csv: bool, tensorboard: bool,
                 enabled: bool = True):
        self.enabled = enabled
        self.jsonl, self.csv = out_dir / f"{name}.jsonl", (out_dir / f"{name}.csv" if use_csv else None)
        self.name = name
        self.records = [r for r in read_jsonl(self.jsonl) if r["step"] <= start_step] if start_step else []
        self.writer = None
        if not enabled:
            return
        from moh.train.checkpoint import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        # kept records, atomically: a kill here leaves the old file, never a truncated one
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
        if self.csv is not None:
            self._rewrite_csv()
        if tensorboard:
            self.writer = _tensorboard_writer(out_dir / "tb", purge_step=start_step + 1 if start_step else None)

    def _rewrite_csv(self) -> None:
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        with self.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.csv is not None:
            new_keys = set(record) - set(self._csv_keys())
            if new_keys:  # a column appeared: rewrite with the wider header
                self._rewrite_csv()
            else:
                with self.csv.open("a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self._csv_keys()).writerow(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{self.name}/{k}", v, record["step"])

    def _csv_keys(self) -> list[str]:
        with self.csv.open() as f:
            return next(csv.reader(f), [])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(path: Path, purge_step: Optional[int]):
    """A SummaryWriter, or None when tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed; skipping TensorBoard logging")
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def reduce_sums(values: dict[str, float], reduce) -> dict[str, float]:
    """Sum scalars over processes with ``reduce(tensor) -> tensor`` (one collective call)."""
    keys = sorted(values)
    t = reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist()))
