"""``moh convert SRC OUT``: a pretrained LLaMA / Mistral / Qwen2 causal LM -> a moh model directory.

    moh convert .cache/smollm2-135m runs/smollm2-moh75 --heads 75% --router calibrated \\
        --calibrate data/english/tokens --calib-tokens 16384

prints the report and writes it to OUT/conversion.json beside the model (config.json,
model.safetensors, tokenizer). ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it once ``moh``
is imported; ``moh train`` starts from it with ``model.name: hf:OUT``.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moh.convert.families import supported

    p.add_argument("src", help="a Hugging Face causal-LM directory, a .gguf file, a hub id (online only), or a "
                               f"moh train run directory; families: {', '.join(supported())}")
    p.add_argument("out", help="the moh model directory to write")
    p.add_argument("--gguf-file", default=None, help="the .gguf file inside SRC when SRC is a directory")
    g = p.add_argument_group("heads")
    g.add_argument("--heads", default="75%",
                   help="heads each token uses: a percentage (75%%: 7 of 9 on SmolLM2) or a count; 100%% keeps "
                        "every head (default: 75%%)")
    g.add_argument("--shared", type=int, default=None,
                   help="shared heads per layer (default: half the active heads, rounded down to whole key/value "
                        "groups)")
    g.add_argument("--layer-heads", default=None,
                   help="per-layer S:K (shared:top-k), comma separated, one per layer, or one for all; or a JSON list")
    g.add_argument("--router", default=None,
                   help="calibrated (default below 100%%; needs --calibrate), two_stage, query_norm, all "
                        "(default at 100%%), or keep (a moh model or moh train run written as it is, LoRA merged)")
    g.add_argument("--backend", default="sparse", help="execution backend stored in the config (default: sparse)")
    c = p.add_argument_group("calibration (the pretrained weights stay frozen)")
    c.add_argument("--calibrate", default=None, metavar="TEXT_OR_DIR",
                   help="train text: a moh token directory (moh data tokenize), a corpus directory (moh data fetch "
                        "english), text / .jsonl files or a folder; only its train split is read")
    c.add_argument("--calib-tokens", type=int, default=16384, help="tokens of calibration text (default: 16384)")
    c.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration window (default: 512)")
    c.add_argument("--ridge", type=float, default=1e-4, help="ridge penalty per token of the router fit (default: 1e-4)")
    c.add_argument("--batch-size", type=int, default=4, help="windows per calibration forward (default: 4)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    p.add_argument("--dtype", default="auto", help="weights dtype written: auto (the source's), float32, bfloat16, "
                                                   "float16 (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even when it holds files")


def run(args: argparse.Namespace) -> int:
    from moh.convert import convert
    from moh.convert.convert import check_output

    check_output(args.out, args.overwrite)  # before the work: a refused OUT would lose it
    conv = convert(args.src, heads=args.heads, layer_heads=args.layer_heads, shared=args.shared, router=args.router,
                   calibrate=args.calibrate, calib_tokens=args.calib_tokens, calib_seq=args.calib_seq,
                   ridge=args.ridge, backend=args.backend, gguf_file=args.gguf_file, dtype=args.dtype,
                   batch_size=args.batch_size, seed=args.seed)
    out = conv.save(args.out, overwrite=args.overwrite)
    print(summary(conv.report))
    print(f"report: {out / 'conversion.json'}")
    return 0


def summary(report: dict) -> str:
    """The report in a few lines (the JSON file has everything)."""
    src, heads, par = report["source"], report["heads"], report["parameters"]
    splits = sorted({f"{s}+{k}" for s, k in heads["layer_heads"]})
    lines = [
        f"source      {src['architecture']} ({src['family']}, {src['kind']}: {src['path']}), {src['parameters']:,} parameters",
        f"replaced    {report['replaced']['attention_layers']} x {report['replaced']['from']} -> "
        f"{report['replaced']['to']} (router {report['replaced']['router']}, backend {report['replaced']['backend']})",
        f"heads       {heads['num_heads']} per layer ({heads['num_kv_heads']} key/value), shared+top-k {', '.join(splits)}:"
        f" {100 * heads['active_fraction']:.1f}% of heads per token; shared: {heads['shared_rule']}",
        f"parameters  {par['moh']:,} ({par['added']:+,}: router {par['router']:,})",
        f"router      {report['router_init']}",
    ]
    check = report.get("check")
    if check:
        vs = check["max_abs_logit_diff_every_head"]
        lines.append(f"check       every head, max |logit difference|: vs the source "
                     f"{'n/a (it routes)' if vs is None else f'{vs:.2e}'}, reordered vs not "
                     f"{check['max_abs_logit_diff_reordered']:.2e} (logits up to {check['scale']:.1f})")
    cal = report.get("calibration")
    if cal:
        lines.append(f"calibration {cal['tokens']} tokens ({cal.get('kind')}: {cal.get('path', '-')}, train split) "
                     f"in {cal['seconds']} s; R^2 of log contribution {cal['r2_mean']}")
    lines += [f"note        {n}" for n in report.get("notes", [])]
    lines.append(f"time        {report['seconds']} s, dtype {report['dtype']}")
    return "\n".join(lines)


__all__ = ["add_arguments", "run", "summary"]
