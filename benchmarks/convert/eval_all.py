"""Every number of one model for docs/results/convert.md, as one JSON line:
held-out perplexity (the lee-test news, non-overlapping 512-token windows), validation perplexity
(the first N non-overlapping 512-token windows of the validation documents), the engine's eval
loss on the run configs' eval set (data set "text", split test, 4 batches of 2: step 0 of the
recovery curves), heads active per layer, and zero-shot accuracy on local lm-eval tasks.

    python benchmarks/convert/eval_all.py MODEL_DIR_OR_RUN ... [--val-windows 16] [--zeroshot] [--limit 250]
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import moh  # noqa: F401
from moh.core.attention import set_backend
from ppl import ppl, windows


def load(path):
    """A model directory, or a moh train run (LoRA merged); and the tokenizer directory."""
    if os.path.isfile(os.path.join(path, "final.json")):
        from moh.train.engine import load_run
        from moh.train.finetune import merged
        model, cfg = load_run(path)
        return merged(model).float().eval(), cfg.model.name.split(":", 1)[1]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path


@torch.no_grad()
def engine_eval(model, root):
    """Mean next-token loss over the runs' eval set: the first 4 x 2 windows of PackedText("test")
    (what moh.train.engine.evaluate reports with batch_size=2, max_batches=4), for any model."""
    import torch.nn.functional as F
    from moh.data.text.tokens import PackedText
    data = PackedText("test", root, 512)
    ids = torch.stack([data[i]["input_ids"] for i in range(8)])
    total, n = 0.0, 0
    for s in range(0, 8, 2):
        x = ids[s:s + 2]
        lg = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum").item()
        n += x[:, 1:].numel()
    return {"loss": total / n}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", default="data/english/smollm2-tokens")
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--zeroshot", action="store_true")
    ap.add_argument("--include", default="data/english/smollm2-tasks-val")
    ap.add_argument("--tasks", nargs="+", default=["smolval_cloze", "smolval_next_sentence"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backend", default="sparse")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ppl", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    held = windows(a.tokens, "heldout", 512)
    val = windows(a.tokens, "validation", 512, a.val_windows)
    for path in a.models:
        t0 = time.time()
        model, tok_dir = load(path)
        if model.config.model_type == "moh":
            set_backend(model, a.backend)
        rec = {"model": path, "active_fraction": getattr(model.config, "active_fraction", 1.0)
               if model.config.model_type == "moh" else 1.0}
        if not a.skip_ppl:
            h = ppl(model, held)
            v = ppl(model, val)
            e = engine_eval(model, a.tokens)
            rec.update(heldout_ppl=round(h["ppl"], 3), heldout_tokens=h["tokens"], val_ppl=round(v["ppl"], 3),
                       val_tokens=v["tokens"], engine_eval_loss=round(e["loss"], 5),
                       heads_active_per_layer=[round(x, 3) for x in (h["heads_active_per_layer"] or [])])
        if a.zeroshot:
            from zeroshot import run
            rec["zeroshot"] = run(model, AutoTokenizer.from_pretrained(tok_dir), a.include, a.tasks, a.limit)
        rec["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(rec), flush=True)
