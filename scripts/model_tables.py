#!/usr/bin/env python3
"""Markdown tables for MODEL.md from the outputs of scripts/eval_sparrow_small.sh.

Usage: scripts/model_tables.py EVAL_DIR [DENSE_EVAL_DIR]
Prints: passkey and needle accuracy (length x depth, with seconds per prompt),
perplexity (sparse vs dense twin when given), indexer recall per DSA layer, and
expert utilization per MoE layer. Standard library only.
"""
import json
import sys
from pathlib import Path


def load_jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def retrieval_table(report, other=None):
    depths = []
    for c in report["cells"]:
        if c["depth"] not in depths:
            depths.append(c["depth"])
    head = "| length | " + " | ".join(f"depth {d}" for d in depths) + " | all | s / prompt |"
    if other:
        head += " dense twin: all | dense twin: s / prompt |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for la in report["by_length"]:
        cells = [c for c in report["cells"] if c["length"] == la["length"]]
        row = f"| {la['length']} | " + " | ".join(f"{c['accuracy'] * 100:.0f}%" for c in cells)
        row += f" | **{la['accuracy'] * 100:.0f}%** | {la['mean_secs']:.2f} |"
        if other:
            o = next((x for x in other["by_length"] if x["length"] == la["length"]), None)
            row += f" {o['accuracy'] * 100:.0f}% | {o['mean_secs']:.2f} |" if o else " - | - |"
        lines.append(row)
    n = len(report["trials"])
    lines.append("")
    lines.append(f"{report['task']}: {report['accuracy'] * 100:.1f}% of {n} prompts overall.")
    return "\n".join(lines)


def main():
    ev = Path(sys.argv[1])
    dense = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    for task in ["passkey", "needle"]:
        p = ev / f"{task}.json"
        if p.exists():
            other = None
            if dense and (dense / f"{task}.json").exists():
                other = json.loads((dense / f"{task}.json").read_text())
            print(f"### {task}\n")
            print(retrieval_table(json.loads(p.read_text()), other))
            print()
    p = ev / "perplexity.jsonl"
    if p.exists():
        rows = load_jsonl(p)
        drows = {r["context"]: r for r in load_jsonl(dense / "perplexity.jsonl")} if dense and (dense / "perplexity.jsonl").exists() else {}
        print("### perplexity (held-out)\n")
        print("| context | windows | sparse ppl | dense twin ppl | sparse / dense | sparse ppl, 2nd half | dense ppl, 2nd half |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            d = drows.get(r["context"])
            ratio = f"{(r['perplexity'] / d['perplexity'] - 1) * 100:+.2f}%" if d else "-"
            dp = f"{d['perplexity']:.2f}" if d else "-"
            dh = f"{d['perplexity_second_half']:.2f}" if d else "-"
            print(f"| {r['context']} | {r['windows']} | {r['perplexity']:.2f} | {dp} | {ratio} | {r['perplexity_second_half']:.2f} | {dh} |")
        print()
    files = sorted(ev.glob("recall*.jsonl"), key=lambda f: len(f.name))
    if files:
        print("### indexer recall\n")
        print("| layer | context | top-k | queries | mean | p5 | min |")
        print("|---|---|---|---|---|---|---|")
        for f in files:
            for r in load_jsonl(f):
                print(f"| {r['layer']} | {r['context']} | {r['topk']} | {r['queries']} | {r['mean']:.4f} | {r['p5']:.4f} | {r['min']:.4f} |")
        print()
    p = ev / "routing.jsonl"
    if p.exists():
        print("### expert utilization\n")
        print("| layer | tokens | MaxVio | CV | entropy | drop rate | dead |")
        print("|---|---|---|---|---|---|---|")
        for r in load_jsonl(p):
            print(f"| {r['layer']} | {r['tokens']} | {r['max_vio']:.3f} | {r['cv']:.3f} | {r['entropy']:.3f} | {r['drop_rate'] * 100:.2f}% | {r['dead']} |")
        print()


if __name__ == "__main__":
    main()
