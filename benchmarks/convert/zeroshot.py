"""Zero-shot accuracy of model directories on local lm-eval tasks (moh data tasks output).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/convert/zeroshot.py MODEL_DIR ... \
        --include data/english/smollm2-tasks-val --tasks smolval_cloze smolval_next_sentence [--limit N]
"""
import argparse, json, os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import moh  # noqa: F401
from moh.core.attention import set_backend


def run(model, tok, include, tasks, limit=None, batch=8):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch, max_length=1024)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=include), limit=limit,
                          log_samples=False, bootstrap_iters=0)
    return {t: {k: v for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for t, r in res["results"].items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--include", default="data/english/smollm2-tasks-val")
    ap.add_argument("--tasks", nargs="+", default=["smolval_cloze", "smolval_next_sentence"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backend", default="sparse")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for m in a.models:
        model = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
        if model.config.model_type == "moh":
            set_backend(model, a.backend)
        tok = AutoTokenizer.from_pretrained(a.tokenizer or m)
        t = time.time()
        r = run(model, tok, a.include, a.tasks, a.limit)
        print(json.dumps({"model": m, "results": r, "seconds": round(time.time() - t, 1)}), flush=True)
