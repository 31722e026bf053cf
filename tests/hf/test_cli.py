"""A language-model run directory is a transformers model directory (tokenizer included);
``moh generate`` streams text and refuses bad input with one error naming it, writing nothing;
``moh eval`` reports perplexity, heads per layer and lm-eval tasks."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moh.cli import main
from moh.train.engine import load_run


def snapshot(d):
    return sorted((p.relative_to(d).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*"))


def test_run_directory_loads_with_auto_classes(lm_run):
    tok = AutoTokenizer.from_pretrained(lm_run)
    hf = AutoModelForCausalLM.from_pretrained(lm_run).eval()
    ours, _ = load_run(lm_run)
    ids = tok("The king sees the river.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=0, rtol=0)
    assert hf.config.eos_token_id == tok.eos_token_id == hf.generation_config.eos_token_id


def test_generate_streams_a_continuation(lm_run, capsys):
    assert main(["generate", str(lm_run), "--prompt", "The king", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The king")
    assert main(["generate", str(lm_run), "--prompt", "The king", "--max-new-tokens", "4", "--temperature", "0.9",
                 "--top-p", "0.9", "--top-k", "5", "--seed", "1"]) == 0
    assert main(["generate", str(lm_run), "--prompt", "The king", "--max-new-tokens", "3", "--num-beams", "2"]) == 0


def damaged_copy(lm_run, tmp_path, damage):
    d = tmp_path / damage
    shutil.copytree(lm_run, d)
    if damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (d / name).unlink()
    elif damage == "truncated":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "llama-config":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return d


@pytest.mark.parametrize("case,args,message", [
    ("ok", ["--max-new-tokens", "0"], "--max-new-tokens=0"),
    ("ok", ["--temperature", "-0.5"], "--temperature=-0.5"),
    ("ok", ["--top-p", "1.5", "--temperature", "1"], "--top-p=1.5"),
    ("ok", ["--prompt", "the king " * 60], "context is 64"),
    ("no-tokenizer", [], "no tokenizer"),
    ("truncated", [], "model.safetensors"),
    ("llama-config", [], "model_type='llama'"),
])
def test_generate_bad_input_is_one_error_and_writes_nothing(lm_run, tmp_path, capsys, case, args, message):
    d = lm_run if case == "ok" else damaged_copy(lm_run, tmp_path, case)
    before = snapshot(d)
    argv = ["generate", str(d), "--prompt", "The king", *args] if "--prompt" not in args else ["generate", str(d), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err
    assert snapshot(d) == before


def test_eval_reports_perplexity_and_heads_per_layer(lm_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(lm_run), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    final = json.loads((lm_run / "final.json").read_text())
    assert res["loss"] == pytest.approx(final["loss"], rel=1e-5)  # the run's own validation loss
    assert res["perplexity"] == pytest.approx(torch.tensor(final["loss"]).exp().item(), rel=1e-5)
    assert res["layer_heads_active"] == [0.5, 0.5] and res["heads_active"] == pytest.approx(0.5)
    assert res["split"] == "test" and res["data_split"] == "validation"  # "test" reads the validation tokens
    assert "(= the validation split)  backend" in capsys.readouterr().out
    assert main(["eval", str(lm_run), "--lm-batch-size", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--lm-batch-size=0" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_eval_runs_local_lm_eval_tasks_offline(lm_run, text_data, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from moh.data.text.corpus import open_corpus
    from moh.data.text.tasks import TaskSettings, build_tasks

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    build_tasks(open_corpus([text_data["corpus"]]), tmp_path / "tasks", split="validation",
                settings=TaskSettings(min_context_words=8, max_items=4))
    out = tmp_path / "eval.json"
    assert main(["eval", str(lm_run), "--tasks", "moh_heldout", "--include-path", str(tmp_path / "tasks"),
                 "--max-batches", "1", "--out", str(out)]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert set(tasks) >= {"moh_cloze", "moh_next_sentence"}
    assert 0.0 <= tasks["moh_next_sentence"]["acc,none"] <= 1.0 and tasks["moh_cloze"]["perplexity,none"] > 1.0
    assert main(["eval", str(lm_run), "--tasks", "nope", "--include-path", str(tmp_path / "tasks"),
                 "--out", str(tmp_path / "y.json")]) == 2


def test_eval_of_a_damaged_config_json_or_foreign_tokens_is_an_error(lm_run, text_data, tmp_path, capsys):
    """A run whose config.json is not moh's is not scored as a classifier (top-1 of a language
    model); token files of a bigger vocabulary are named, not an IndexError in the embedding."""
    d = damaged_copy(lm_run, tmp_path, "llama-config")
    assert main(["eval", str(d), "--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert "not model_type 'moh'" in err and "Traceback" not in err and not (tmp_path / "a.json").exists()
    tokens = tmp_path / "tokens"
    shutil.copytree(text_data["tokens"], tokens)
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "vocab_size": 1000}))
    assert main(["eval", str(lm_run), "--tokens", str(tokens), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "uses 1000 token ids" in err and "vocab_size=300" in err and not (tmp_path / "b.json").exists()
    # an --out in a directory that does not exist yet is created (it was checked creatable first)
    assert main(["eval", str(lm_run), "--max-batches", "1", "--out", str(tmp_path / "new" / "c.json")]) == 0
    assert (tmp_path / "new" / "c.json").is_file()


def test_convert_of_a_run_keeps_the_run_tokenizer(lm_run, tmp_path):
    from moh.convert import convert

    conv = convert(str(lm_run), heads="100%")
    assert conv.tokenizer is not None
    assert (conv.save(tmp_path / "out") / "tokenizer.json").is_file()
