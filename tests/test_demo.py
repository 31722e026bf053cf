"""``moh demo --quick``: every piece runs and writes its files with sane values."""
import json

from moh.cli import main
from moh.demo import _PAIRS, COLUMNS, MODELS, format_table


def test_quick_demo_writes_table_and_pictures(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "What to run next" in printed and "moh bench" in printed
    for name in ("table.md", "table.json", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    for name in MODELS[1:]:  # the MoH models' head-load pictures
        assert (tmp_path / name / "routing" / "head_load.png").stat().st_size > 0

    doc = json.loads((tmp_path / "table.json").read_text())
    rows = {r["model"]: r for r in doc["rows"]}
    assert list(rows) == list(MODELS)
    expected_heads = {"llm-demo-mha": 1.0, "moh-llm-demo-75": 0.75, "moh-llm-demo-50": 0.5}
    for name, row in rows.items():
        assert {k for k, _, _ in COLUMNS if k not in _PAIRS} | {v for pair in _PAIRS.values() for v in pair[:2]} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert abs(row["heads_active"] - expected_heads[name]) < 1e-6
        assert row["parameters"] > 0 and row["train_step_ms"] > 0
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0 and row["train_long_ms"] > 0
        # the speed columns are against the multi-head model (its own ratios are exactly 1)
        mha = rows[MODELS[0]]
        assert row["prefill_vs_mha"] == mha["prefill_ms"] / row["prefill_ms"]
        assert row["decode_vs_mha"] == row["decode_tok_s"] / mha["decode_tok_s"]
        assert row["train_long_vs_mha"] == mha["train_long_ms"] / row["train_long_ms"]
    assert rows[MODELS[0]]["prefill_vs_mha"] == rows[MODELS[0]]["decode_vs_mha"] == 1.0
    assert doc["plan"]["steps"] == 6 and doc["seed"] == 1
    assert (tmp_path / "table.md").read_text().strip() == format_table(doc["rows"])
    # the runs are ordinary training runs (moh analyze can read them)
    assert (tmp_path / MODELS[-1] / "model.safetensors").is_file()


def test_bad_steps_is_a_clean_error(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps=0" in capsys.readouterr().err
