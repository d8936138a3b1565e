#!/usr/bin/env python3
"""Markdown tables for models/smollm2-135m-instruct-dsa/MODEL.md from the outputs of
scripts/eval_smollm2_dsa.sh: indexer recall per layer and against k, perplexity of the
DSA model against the dense original, decode / prefill speed at 8192 tokens, passkey
and needle accuracy, and each target met or not. Standard library only.

Usage: scripts/dsa_tables.py EVAL_DIR [TOPK]   (TOPK: the adapter's k, default 256)
"""
import json
import statistics
import sys
from pathlib import Path


def rows(path):
    if not path.exists():
        return None
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def recall_tables(rec, topk):
    ks = sorted({r["topk"] for r in rec})
    print("Indexer recall (share of the dense attention mass on the selection), 4096 tokens:")
    print()
    print(
        "| top-k | mean over layers | worst layer mean | mean p5 | layers >= 0.95 "
        "| best possible: mean over layers | best possible: worst layer | indexer / best |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for k in ks:
        rs = [r for r in rec if r["topk"] == k]
        means = [r["mean"] for r in rs]
        best = [r.get("best_mean", float("nan")) for r in rs]
        summary[k] = (statistics.mean(means), min(means), statistics.mean(best), min(best))
        print(
            f"| {k} | {statistics.mean(means):.4f} | {min(means):.4f} | "
            f"{statistics.mean(r['p5'] for r in rs):.4f} | {sum(m >= 0.95 for m in means)} of {len(rs)} "
            f"| {statistics.mean(best):.4f} | {min(best):.4f} | {statistics.mean(means) / statistics.mean(best):.3f} |"
        )
    at = [r for r in rec if r["topk"] == topk]
    if at:
        print()
        print(f"Per layer at k = {topk}:")
        print()
        print("| layer | mean | p5 | min | best possible (oracle top-k) |")
        print("|---|---|---|---|---|")
        for r in at:
            print(
                f"| {r['layer']} | {r['mean']:.4f} | {r['p5']:.4f} | {r['min']:.4f} "
                f"| {r.get('best_mean', float('nan')):.4f} |"
            )
    return summary


def perplexity_table(dense, sparse, title):
    print(title)
    print()
    print("| context | dense ppl | DSA ppl | DSA / dense | dense ppl 2nd half | DSA ppl 2nd half |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for s in sparse:
        d = next((x for x in dense if x["context"] == s["context"]), None)
        if d is None:
            continue
        ratio = s["perplexity"] / d["perplexity"]
        ratios[s["context"]] = ratio
        print(
            f"| {s['context']} | {d['perplexity']:.3f} | {s['perplexity']:.3f} | {ratio:.4f} | "
            f"{d['perplexity_second_half']:.3f} | {s['perplexity_second_half']:.3f} |"
        )
    return ratios


def speed_table(sparse_bench, dense_bench):
    print("Speed at 8192 tokens of context (one sequence; `bench generate`):")
    print()
    print("| model | selectors | prefill tok/s | decode tok/s | cache bytes / token |")
    print("|---|---|---|---|---|")
    out = {}
    for name, rs in (("DSA adapter", sparse_bench), ("dense original", dense_bench)):
        for r in rs or []:
            if "mode" not in r or r.get("bench") in ("machine", "generate_bound", "generate_ratio"):
                continue  # the machine's bandwidth and the step bounds
            print(
                f"| {name} | {r['mode']} | {r['prefill_tokens_per_s']:.1f} | "
                f"{r['decode_tokens_per_s']:.2f} | {r['kv_bytes_per_token']:.0f} |"
            )
            out[(name, r["mode"])] = r
    return out


def retrieval_table(task, dense, sparse):
    print(f"{task} accuracy by length (all depths):")
    print()
    print("| length | dense | DSA | DSA - dense |")
    print("|---|---|---|---|")
    worst = None
    for s in sparse["by_length"]:
        d = next((x for x in dense["by_length"] if x["length"] == s["length"]), None)
        if d is None:
            continue
        diff = (s["accuracy"] - d["accuracy"]) * 100
        worst = diff if worst is None else min(worst, diff)
        print(
            f"| {s['length']} | {d['accuracy'] * 100:.0f}% | {s['accuracy'] * 100:.0f}% | {diff:+.0f} |"
        )
    print()
    return worst


def main():
    d = Path(sys.argv[1])
    topk = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    targets = []
    rec = rows(d / "recall.jsonl")
    if rec:
        summary = recall_tables(rec, topk)
        print()
        if topk in summary:
            mean, worst, best_mean, best_worst = summary[topk]
            targets.append(
                ("mean indexer recall per layer >= 0.95 at 4096, k = %d" % topk,
                 worst >= 0.95,
                 f"worst layer {worst:.4f}, mean {mean:.4f}; the dense attention's own top-{topk} "
                 f"holds {best_mean:.4f} on average, {best_worst:.4f} in its worst layer")
            )
    pd, ps = rows(d / "perplexity-dense.jsonl"), rows(d / "perplexity-sparse.jsonl")
    if pd and ps:
        ratios = perplexity_table(pd, ps, "Held-out perplexity (the corpus' validation split):")
        print()
        p512 = rows(d / "perplexity-sparse-k512.jsonl")
        if p512:
            r512 = perplexity_table(pd, p512, "The same adapter selecting 512 positions (`--topk 512`):")
            print()
        else:
            r512 = {}
        if 8192 in ratios:
            best = min([ratios[8192]] + ([r512[8192]] if 8192 in r512 else []))
            targets.append(
                ("perplexity at 8192 within 1% of dense, k <= 512", best <= 1.01,
                 f"DSA / dense = {ratios[8192]:.4f} (k = 256)"
                 + (f", {r512[8192]:.4f} (k = 512)" if 8192 in r512 else ""))
            )
    bd, bs = rows(d / "beyond-dense.jsonl"), rows(d / "beyond-sparse.jsonl")
    if bd and bs:
        perplexity_table(bd, bs, "Past the trained length (RoPE extrapolation):")
        print()
    sb, db = rows(d / "bench-sparse.jsonl"), rows(d / "bench-dense.jsonl")
    for r in rows(d / "bench-sparse-int8.jsonl") or []:
        if "mode" in r and r.get("bench") not in ("machine", "generate_bound", "generate_ratio"):
            sb = (sb or []) + [dict(r, mode="model, int8 index keys")]
    if sb or db:
        speed = speed_table(sb, db)
        print()
        s = speed.get(("DSA adapter", "model"))
        o = speed.get(("dense original", "model"))
        if s and o:
            ratio = s["decode_tokens_per_s"] / o["decode_tokens_per_s"]
            targets.append(
                ("decode at 8192 >= 2.5x the dense original", ratio >= 2.5, f"{ratio:.2f}x")
            )
    for task in ("passkey", "needle"):
        dr, sr = rows(d / f"{task}-dense.jsonl"), rows(d / f"{task}-sparse.jsonl")
        if dr and sr:
            worst = retrieval_table(task, dr[0], sr[0])
            if worst is not None:
                targets.append(
                    (f"{task} >= dense - 5 points at every length", worst >= -5,
                     f"worst difference {worst:+.0f} points")
                )
    if targets:
        print("Targets:")
        print()
        print("| target | met | measured |")
        print("|---|---|---|")
        for name, ok, what in targets:
            print(f"| {name} | {'yes' if ok else '**no**'} | {what} |")


if __name__ == "__main__":
    main()
