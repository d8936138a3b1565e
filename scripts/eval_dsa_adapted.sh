#!/usr/bin/env bash
# The sparse stage with the base adapting (issue 15's "measure both"): each MODEL (an
# adapter run) against the dense original on the held-out windows of
# scripts/eval_smollm2_dsa.sh, and against its own weights with dense selection (top-k
# past the context: every position), which separates what the selection costs from
# what the adaptation to the corpus gains. JSON lines in $OUT/NAME-*.jsonl, a table at
# the end.
#
#   scripts/eval_dsa_adapted.sh MODEL...      (e.g. runs/smol-dsa-s2n runs/smol-dsa-s2a)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/dsa-adapted-eval}
CORPUS=${CORPUS:-data/corpus}
SP=${SPARROW:-./target/release/sparrow}
DENSE=smollm2-135m-instruct
CONTEXTS=${CONTEXTS:-1024,4096,8192}
WINDOWS=${WINDOWS:-2}
mkdir -p "$OUT"
[ -x "$SP" ] || cargo build --release --bin sparrow
[ -d "$CORPUS" ] || "$SP" corpus fetch --out "$CORPUS"
source scripts/run_once.sh
ppl() { "$SP" --quiet eval perplexity --corpus "$CORPUS" --context "$CONTEXTS" --windows "$WINDOWS" --json "$@"; }
run_once "$OUT/dense.jsonl" ppl --model "$DENSE"
for m in "$@"; do
  name=$(basename "$m")
  run_once "$OUT/$name-k256.jsonl" ppl --model "$m"
  run_once "$OUT/$name-k512.jsonl" ppl --model "$m" --topk 512
  run_once "$OUT/$name-all.jsonl" ppl --model "$m" --topk 1000000
  run_once "$OUT/$name-recall.jsonl" "$SP" --quiet eval recall --model "$m" --corpus "$CORPUS" \
    --context 4096 --windows 2 --topk 256 --json
done
python3 - "$OUT" "$@" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(p):
    return [json.loads(l) for l in p.read_text().splitlines() if l.startswith("{")]
dense = {r["context"]: r["perplexity"] for r in load(out / "dense.jsonl")}
print("| model | context | dense original | all positions (same weights) | k = 256 | k = 512 | k = 256 / dense original | k = 256 / all positions |")
print("|---|---|---|---|---|---|---|---|")
for m in sys.argv[2:]:
    n = Path(m).name
    k256, k512, full = ({r["context"]: r["perplexity"] for r in load(out / f"{n}-{s}.jsonl")} for s in ("k256", "k512", "all"))
    for c in sorted(dense):
        print(f"| {n} | {c} | {dense[c]:.3f} | {full[c]:.3f} | {k256[c]:.3f} | {k512[c]:.3f} | {k256[c] / dense[c]:.4f} | {k256[c] / full[c]:.4f} |")
    rec = load(out / f"{n}-recall.jsonl")
    print(f"| {n} | recall @ 4096, k = 256 | mean {statistics.mean(r['mean'] for r in rec):.4f} | best possible {statistics.mean(r['best_mean'] for r in rec):.4f} | | | | |")
PY
