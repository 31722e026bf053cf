"""Convert SmolLM2-135M with each router from one calibration pass (the statistics are shared).

    python benchmarks/convert/routers.py .cache/smollm2-135m data/english/smollm2-tokens runs/convert

Writes OUT/smollm2-{all100, qn75, qn75-calshared, ts75-zero, ts75-cal, cal75}; each is exactly what
`moh convert` writes with the same options (this script only avoids repeating the calibration pass).
"""
import sys
import torch
from moh.convert import calibrate as cal
from moh.convert import convert, load_source

src, tokens, out = sys.argv[1:4]
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
torch.set_num_threads(2)
source = load_source(src)
ids, info = cal.calibration_ids(tokens, source.tokenizer, 16384, 512, 0, vocab_size=source.model.config.vocab_size)
memo = {}
collect = cal.collect


def cached(model, ids_NT, batch_size=4):
    if "stats" not in memo:
        memo["stats"] = collect(model, ids_NT, batch_size)
    return memo["stats"]


cal.collect = cached
VARIANTS = {
    "all100": dict(heads="100%", router="all"),
    "qn75": dict(heads="75%", router="query_norm"),
    "qn75-calshared": dict(heads="75%", router="query_norm", calib_ids=ids),
    "ts75-zero": dict(heads="75%", router="two_stage"),
    "ts75-cal": dict(heads="75%", router="two_stage", calib_ids=ids),
    "cal75": dict(heads="75%", router="calibrated", calib_ids=ids),
}
for name, kw in VARIANTS.items():
    if only and name not in only:
        continue
    conv = convert(source, **kw)
    if conv.report.get("calibration"):
        conv.report["calibration"].update({k: v for k, v in info.items() if k not in conv.report["calibration"]})
    path = conv.save(f"{out}/smollm2-{name}", overwrite=True)
    print(name, path, conv.report["check"], flush=True)
