"""Zero-shot accuracy of model directories on local lm-eval tasks (moh data tasks output).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/convert/zeroshot.py MODEL_DIR ... \
        --include data/english/smollm2-tasks-val --tasks smolval_cloze smolval_next_sentence [--limit N] \
        [--samples items.jsonl]

A MODEL_DIR may also be a moh train run (LoRA merged, as eval_all.py loads it). Each accuracy comes
with n (items) and its standard error sqrt(p (1 - p) / (n - 1)) (lm-eval's closed form for a mean;
lm-eval itself is run with bootstrap_iters=0, which skips it). --samples appends one line per
model, task and item ({model, task, id, acc[, acc_norm]}) for paired comparisons
(zeroshot_compare.py).
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch
from transformers import AutoTokenizer
import moh  # noqa: F401
from moh.core.attention import set_backend


ITEM_METRICS = ("acc", "acc_norm")


def run(model, tok, include, tasks, limit=None, batch=8, items=None):
    """lm-eval results per task, plus n and the stderr of each accuracy; ``items`` (a dict) receives
    the per-item accuracies, {task: [{id, acc, ...}, ...]}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch, max_length=1024)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=include), limit=limit,
                          log_samples=True, bootstrap_iters=0)
    out = {t: {k: v for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k}
           for t, r in res["results"].items()}
    for t, samples in res.get("samples", {}).items():
        rows = [{"id": s["doc"]["id"], **{m: float(s[m]) for m in ITEM_METRICS if m in s}} for s in samples]
        if items is not None:
            items[t] = rows
        out[t]["n"] = n = len(rows)
        for m in ITEM_METRICS:
            if rows and m in rows[0] and n > 1:
                p = sum(r[m] for r in rows) / n
                out[t][f"{m}_stderr"] = (p * (1 - p) / (n - 1)) ** 0.5
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--include", default="data/english/smollm2-tasks-val")
    ap.add_argument("--tasks", nargs="+", default=["smolval_cloze", "smolval_next_sentence"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backend", default="sparse")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", default=None, help="JSONL file to append the per-item accuracies to")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from eval_all import load
    for m in a.models:
        model, tok_dir = load(m)
        if model.config.model_type == "moh":
            set_backend(model, a.backend)
        tok = AutoTokenizer.from_pretrained(a.tokenizer or tok_dir)
        t, items = time.time(), {}
        r = run(model, tok, a.include, a.tasks, a.limit, a.batch_size, items)
        print(json.dumps({"model": m, "results": r, "seconds": round(time.time() - t, 1)}), flush=True)
        if a.samples:
            with open(a.samples, "a") as f:
                for task, rows in items.items():
                    for row in rows:
                        f.write(json.dumps({"model": m, "task": task, **row}) + "\n")
