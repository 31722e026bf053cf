"""``moh bench`` end to end through the CLI dispatcher, at tiny sizes."""
from __future__ import annotations

import json

import pytest
import torch

from moh.cli import main
from moh.core.cache import KVCache
from moh.eval.bench import DenseMHA, IdealMHA, head_split


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--seq-lens", "16", "--decode-contexts", "16", "--train-seq-len", "16",
            "--ratios", "50", "--repeats", "2", "--warmup", "0", "--threads", "1", "--clock", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs SDPA" in printed and "threads 1" in printed and "decode through 4 layers" in printed
    data = json.loads(out.read_text())
    assert {"platform", "cpu", "threads", "torch", "date"} <= set(data["machine"])
    assert data["machine"]["threads"] == 1 and data["settings"]["clock"] == "cpu"
    from moh.kernels import cpu as cpu_kernels  # the record says which CPU kernels the runs used

    assert data["machine"]["moh_cpu_kernels"] == ("on" if cpu_kernels.available() else f"off ({cpu_kernels.build_error()})")
    rows = data["results"]
    kinds = {(r["kind"], r["causal"]) for r in rows}
    assert kinds == {("forward", False), ("forward", True), ("decode", True), ("train", False), ("train", True)}
    for kind, causal in kinds:
        case = [r for r in rows if (r["kind"], r["causal"]) == (kind, causal)]
        # the baseline, and every backend at 50% and 100% (100% is always added for ratio (b))
        assert {(r["backend"], r["ratio"]) for r in case} == {
            ("sdpa", 1.0), ("sparse", 0.5), ("sparse", 1.0), ("masked", 0.5), ("masked", 1.0), ("ideal", 0.5)
        }
    for r in rows:
        assert r["ms"] > 0 and r["vs_sdpa"] > 0 and len(r["ms_all"]) == 2 and r["peak_mb"] >= 0
        if r["backend"] != "sdpa" and r["ratio"] < 1:
            assert r["vs_all_heads"] > 0
            assert 0 < r["active"] < 1
        if r["backend"] == "sdpa":
            assert r["vs_sdpa"] == 1.0
        if r["backend"] == "ideal":
            assert r["active"] == 0.5 and r["vs_all_heads"] == r["vs_sdpa"]  # its 100% is SDPA itself


@pytest.mark.parametrize("causal", [False, True])
def test_ideal_layer_with_every_head_is_dense_mha(causal):
    """The 'ideal' rows time dense kernels doing only the active heads' work; with every head
    active that is the SDPA baseline itself, output for output (also through a KV cache)."""
    torch.manual_seed(0)
    dense, ideal = DenseMHA(32, 4, 8, causal), IdealMHA(32, 4, 8, causal, active=4)
    ideal.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ideal(x), dense(x), rtol=0, atol=1e-6)
    c1, c2 = KVCache(), KVCache()
    dense(x, cache=c1), ideal(x, cache=c2)
    torch.testing.assert_close(ideal(x[:, :1], cache=c2), dense(x[:, :1], cache=c1), rtol=0, atol=1e-6)
    # with fewer heads it reads only the first `active` heads' keys, but projects keys of all
    half = IdealMHA(32, 4, 8, causal, active=2)
    assert half.q.out_features == 16 and half.o.in_features == 16 and half.k.out_features == 32


def test_bench_bad_options_exit_2(tmp_path, capsys):
    assert main(["bench", "--quick", "--backends", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--ratios", "150", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["bench", "--quick", "--flush-mb", "-1", "--out", str(tmp_path / "x.json")]) == 2
    assert "--flush-mb=-1" in capsys.readouterr().err
    assert main(["bench", "--quick", "--router", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--decode-layers", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--decode-layers=0" in capsys.readouterr().err
    assert main(["bench", "--quick", "--clock", "cpu", "--threads", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert "--threads 1" in capsys.readouterr().err
    assert main(["bench", "--quick", "--device", "tpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_bf16_batch_size_alias(tmp_path, capsys):
    """--dtype bf16 runs every backend in bf16 (the JSON says so); --batch-size is --batch."""
    out = tmp_path / "bf16.json"
    argv = ["bench", "--quick", "--seq-lens", "16", "--decode-contexts", "", "--train-seq-len", "16", "--repeats", "1",
            "--warmup", "0", "--dtype", "bf16", "--batch-size", "2", "--backends", "sparse", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["dtype"] == "bf16" and data["settings"]["batch"] == 2
    assert {r["backend"] for r in data["results"]} == {"sdpa", "sparse", "ideal"}
    assert "bf16 on cpu" in capsys.readouterr().out


def test_head_split_matches_the_brief():
    assert head_split(12, 0.5) == (2, 4)  # 2 shared + top-4 of 10
    assert head_split(12, 0.75) == (2, 7)
    assert head_split(12, 0.9) == (2, 9)
    assert head_split(12, 1.0) is None  # router "all"


@pytest.mark.parametrize("args, message", [
    (["--ratios", "1"], "--ratios 1% cannot be measured with --heads 12"),  # 1 is 1%, never 100%
    (["--ratios", "0.5"], "--ratios 0.5% cannot be measured"),
    (["--heads", "1", "--ratios", "50"], "--ratios 50% cannot be measured with --heads 1"),
    (["--backends", ""], "--backends is empty"),
    (["--seq-lens", "", "--decode-contexts", "", "--train-seq-len", "0"], "nothing to measure"),
    (["--batch-size", "0"], "--batch-size=0 must be positive"),
    (["--out", ""], "--out '' is empty"),
])
def test_bench_values_it_cannot_measure_are_one_error(tmp_path, capsys, args, message):
    argv = ["bench", "--quick", "--out", str(tmp_path / "x.json"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "x.json").exists()


def test_peak_bytes_is_the_calls_own_peak():
    """The peak above the call's start: what an earlier measured call left alive does not count
    (the profiler's running total does include it), and memory freed inside the call is subtracted."""
    from moh.eval.bench import peak_bytes

    mb = 2**20
    kept: list = []
    held = peak_bytes(lambda: kept.append(torch.ones(6 * mb // 4)))  # 6 MB, alive afterwards

    def temporaries():
        for _ in range(3):  # 2 MB at a time, each freed before the next
            torch.ones(2 * mb // 4).sum()

    later = peak_bytes(temporaries)
    assert 6 * mb <= held < 7 * mb
    assert 2 * mb <= later < 3 * mb  # not 6 MB + 2 MB, not 3 x 2 MB
