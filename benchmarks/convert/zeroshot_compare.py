"""Zero-shot accuracies of several models against one reference, paired over the same items.

    python benchmarks/convert/zeroshot_compare.py items.jsonl --ref .cache/smollm2-135m [--md]

Reads zeroshot.py --samples lines ({model, task, id, acc[, acc_norm]}). Per model, task and metric:
n, accuracy, its stderr sqrt(p (1 - p) / (n - 1)), the ratio to the reference's accuracy, and the
paired stderr of the difference (the sample standard deviation of the per-item differences over
sqrt(n)); the ratio's stderr is that divided by the reference's accuracy (the reference's own
noise is shared by both, so it mostly cancels). Only items both models answered are compared.
"""
import argparse, json, math
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("samples")
ap.add_argument("--ref", required=True, help="the reference model, as named in the samples")
ap.add_argument("--md", action="store_true", help="print a Markdown table")
a = ap.parse_args()
acc = defaultdict(dict)  # (model, task, metric) -> {id: value}
for line in open(a.samples):
    r = json.loads(line)
    for m in ("acc", "acc_norm"):
        if m in r:
            acc[(r["model"], r["task"], m)][r["id"]] = r[m]
models = list(dict.fromkeys(k[0] for k in acc))
rows = []
for (model, task, metric), vals in acc.items():
    ref = acc.get((a.ref, task, metric))
    if ref is None:
        continue
    ids = sorted(set(vals) & set(ref))
    n = len(ids)
    p, q = sum(vals[i] for i in ids) / n, sum(ref[i] for i in ids) / n
    d = [vals[i] - ref[i] for i in ids]
    dm = sum(d) / n
    se_d = math.sqrt(sum((x - dm) ** 2 for x in d) / (n - 1) / n)
    rows.append(dict(model=model, task=task, metric=metric, n=n, acc=round(p, 4),
                     stderr=round(math.sqrt(p * (1 - p) / (n - 1)), 4), ref_acc=round(q, 4),
                     ratio=round(p / q, 4) if q else None, diff=round(dm, 4), paired_se_diff=round(se_d, 4),
                     ratio_se=round(se_d / q, 4) if q else None))
rows.sort(key=lambda r: (r["task"], r["metric"], models.index(r["model"])))
if a.md:
    print("| model | task | metric | n | acc ± stderr | ratio to ref ± paired se | diff ± paired se |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['task']} | {r['metric']} | {r['n']} | {r['acc']:.3f} ± {r['stderr']:.3f} | "
              f"{r['ratio']:.3f} ± {r['ratio_se']:.3f} | {r['diff']:+.3f} ± {r['paired_se_diff']:.3f} |")
else:
    for r in rows:
        print(json.dumps(r))
