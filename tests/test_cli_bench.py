"""``moh bench`` end to end through the CLI dispatcher, at tiny sizes."""
from __future__ import annotations

import json

from moh.cli import main
from moh.eval.bench import head_split


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--seq-lens", "16", "--decode-contexts", "16", "--train-seq-len", "16",
            "--ratios", "50", "--repeats", "2", "--warmup", "0", "--threads", "1", "--clock", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs SDPA" in printed and "threads 1" in printed
    data = json.loads(out.read_text())
    assert {"platform", "cpu", "threads", "torch", "date"} <= set(data["machine"])
    assert data["machine"]["threads"] == 1 and data["settings"]["clock"] == "cpu"
    rows = data["results"]
    kinds = {(r["kind"], r["causal"]) for r in rows}
    assert kinds == {("forward", False), ("forward", True), ("decode", True), ("train", False), ("train", True)}
    for kind, causal in kinds:
        case = [r for r in rows if (r["kind"], r["causal"]) == (kind, causal)]
        # the baseline, and every backend at 50% and 100% (100% is always added for ratio (b))
        assert {(r["backend"], r["ratio"]) for r in case} == {
            ("sdpa", 1.0), ("sparse", 0.5), ("sparse", 1.0), ("masked", 0.5), ("masked", 1.0)
        }
    for r in rows:
        assert r["ms"] > 0 and r["vs_sdpa"] > 0 and len(r["ms_all"]) == 2 and r["peak_mb"] >= 0
        if r["backend"] != "sdpa" and r["ratio"] < 1:
            assert r["vs_all_heads"] > 0
            assert 0 < r["active"] < 1
        if r["backend"] == "sdpa":
            assert r["vs_sdpa"] == 1.0


def test_bench_bad_options_exit_2(tmp_path, capsys):
    assert main(["bench", "--quick", "--backends", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--ratios", "150", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["bench", "--quick", "--clock", "cpu", "--threads", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert "--threads 1" in capsys.readouterr().err


def test_head_split_matches_the_brief():
    assert head_split(12, 0.5) == (2, 4)  # 2 shared + top-4 of 10
    assert head_split(12, 0.75) == (2, 7)
    assert head_split(12, 0.9) == (2, 9)
    assert head_split(12, 1.0) is None  # router "all"
