"""MetricsLogger: JSONL, CSV and TensorBoard files hold the logged records; on resume the records
after the resume step are dropped from all three."""
from __future__ import annotations

import csv
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moh.train.metrics import MetricsLogger


def _scalars(tb_dir, tag):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def _log(out, steps, start_step=0):
    logger = MetricsLogger(out, "train", start_step=start_step, use_csv=True, tensorboard=True)
    for s in steps:
        logger.log({"step": s, "loss": 1.0 / s, "acc": s / 10, "note": "text is kept out of TensorBoard"})
    logger.close()


def test_jsonl_csv_tensorboard_agree_and_resume_drops_later_steps(tmp_path):
    _log(tmp_path, [1, 2, 3, 4])
    _log(tmp_path, [3, 4, 5], start_step=2)  # resumed from step 2: its 3 and 4 replace the first run's
    want = [(s, round(1.0 / s, 6)) for s in (1, 2, 3, 4, 5)]
    jsonl = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [(r["step"], round(r["loss"], 6)) for r in jsonl] == want
    with (tmp_path / "train.csv").open() as f:
        assert [(int(r["step"]), round(float(r["loss"]), 6)) for r in csv.DictReader(f)] == want
    assert _scalars(tmp_path / "tb", "train/loss") == want  # purge_step dropped the first run's 3, 4
    assert [v for _, v in _scalars(tmp_path / "tb", "train/acc")] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert "train/note" not in EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
