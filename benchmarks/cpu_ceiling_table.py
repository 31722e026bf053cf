"""Markdown tables of the CPU ceiling (issue 11, section 2) from the JSON of benchmarks/cpu_ceiling.sh.

    python benchmarks/cpu_ceiling_table.py [results/cpu-ceiling]

For each setting (threads x clock) and case x active-head ratio: SDPA, sparse and ideal latency,
sparse vs SDPA (measured), ideal vs SDPA (the ceiling), % of ideal = measured / ideal, and the
issue's goal (>= 90% forward and training step, >= 85% decode). Then the training step's peak
memory, sparse against SDPA (goal: sparse at most SDPA).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GOAL = {"forward": 0.90, "train": 0.90, "decode": 0.85}
KIND_ORDER = {"forward": 0, "train": 1, "decode": 2}


def _load(folder: Path) -> dict[str, list[dict]]:
    """{setting label: [documents]} for every JSON in the folder, in name order."""
    settings: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        if "results" not in doc:
            continue
        log = path.with_suffix(".log")
        doc["_name"] = path.name
        doc["_start_load"] = None
        if log.is_file():
            m = re.search(r"start \|.*load average: ([\d.]+), ([\d.]+), ([\d.]+)", log.read_text())
            if m:
                doc["_start_load"] = float(m.group(1))
        m, s = doc["machine"], doc["settings"]
        label = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}, {s['clock']} clock"
        settings.setdefault(label, []).append(doc)
    return settings


def _case(r: dict) -> str:
    mask = "causal" if r["causal"] else "bidirectional"
    if r["kind"] == "decode":
        return f"decode, {r['seq_len']}-token cache"
    name = "forward" if r["kind"] == "forward" else "training step"
    return f"{name} N={r['seq_len']} {mask}"


def tables(folder: Path) -> str:
    out = []
    for label, docs in _load(folder).items():
        out.append(f"### {label}\n")
        for d in docs:
            m, s = d["machine"], d["settings"]
            start = f"{d['_start_load']:.2f}" if d["_start_load"] is not None else "?"
            out.append(f"- `{d['_name']}`: {m['date']}, torch {m['torch']}, {m['cpu']}, median of {s['repeats']} "
                       f"(interleaved) after {s['warmup']} warm-up, load average (1 min) {start} at the start, "
                       f"{m['load_average_1min']:.2f} at the end")
        out.append("")
        out.append("| case | active | SDPA ms | sparse ms | ideal ms | sparse vs SDPA | ideal vs SDPA | % of ideal "
                   "| goal | met? |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        mem = []
        rows = [r for d in docs for r in d["results"]]
        keys = sorted({(r["kind"], r["seq_len"], r["causal"]) for r in rows},
                      key=lambda k: (KIND_ORDER[k[0]], k[1], k[2]))
        met_count = total = 0
        for kind, n, causal in keys:
            case_rows = [r for r in rows if (r["kind"], r["seq_len"], r["causal"]) == (kind, n, causal)]
            sdpa = next(r for r in case_rows if r["backend"] == "sdpa")
            for ratio in sorted({r["ratio"] for r in case_rows if r["ratio"] < 1.0}):
                sp = next((r for r in case_rows if r["backend"] == "sparse" and r["ratio"] == ratio), None)
                ideal = next((r for r in case_rows if r["backend"] == "ideal" and r["ratio"] == ratio), None)
                if sp is None or ideal is None:
                    continue
                pct = sp["vs_sdpa"] / ideal["vs_sdpa"]
                ok = pct >= GOAL[kind]
                met_count += ok
                total += 1
                out.append(f"| {_case(sdpa)} | {ratio:.0%} | {sdpa['ms']:.2f} | {sp['ms']:.2f} | {ideal['ms']:.2f} "
                           f"| {sp['vs_sdpa']:.2f}x | {ideal['vs_sdpa']:.2f}x | {pct:.0%} | ≥ {GOAL[kind]:.0%} "
                           f"| {'yes' if ok else '**no**'} |")
                if kind == "train":
                    mem.append(f"| {_case(sdpa)} | {ratio:.0%} | {sdpa['peak_mb']:.1f} | {sp['peak_mb']:.1f} "
                               f"| {ideal['peak_mb']:.1f} | {'yes' if sp['peak_mb'] <= sdpa['peak_mb'] else '**no**'} |")
        out.append("")
        out.append(f"Goal met in {met_count} of {total} rows.\n")
        if mem:
            out.append("Training-step peak memory (MB allocated by torch's CPU allocator above the level before the "
                       "call; goal: sparse ≤ SDPA):\n")
            out.append("| case | active | SDPA MB | sparse MB | ideal MB | met? |")
            out.append("|---|---|---|---|---|---|")
            out += mem
            out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    folder = Path(argv[1] if len(argv) > 1 else "results/cpu-ceiling")
    print(tables(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
