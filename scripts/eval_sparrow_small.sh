#!/usr/bin/env bash
# Every evaluation MODEL.md reports, for one model directory, into OUT:
# passkey.json/.png, needle.json/.png, perplexity.jsonl, and for DSA / MoE models
# recall.jsonl (+ recall-k1024/-k2048.jsonl: larger selections) and routing.jsonl. Usage: scripts/eval_sparrow_small.sh MODEL OUT
# (LENGTHS, TRIALS, RECALL_TOPK, CORPUS override the grid; SPARROW_BIN the binary).
set -euo pipefail
model=${1:?usage: $0 MODEL OUT}
out=${2:?usage: $0 MODEL OUT}
bin=${SPARROW_BIN:-target/release/sparrow}
corpus=${CORPUS:-data/corpus}
lengths=${LENGTHS:-1024,2048,4096,8192,16384}
trials=${TRIALS:-2}
mkdir -p "$out"
"$bin" --quiet eval passkey --model "$model" --lengths "$lengths" --trials "$trials" \
  --plot "$out/passkey.png" --json > "$out/passkey.json"
"$bin" --quiet eval perplexity --model "$model" --corpus "$corpus" --context 1024,8192 \
  --windows 8 --json > "$out/perplexity.jsonl"
"$bin" --quiet eval needle --model "$model" --corpus "$corpus" --lengths "$lengths" \
  --trials "$trials" --plot "$out/needle.png" --json > "$out/needle.json"
if grep -q '"dsa"' "$model/config.json"; then
  "$bin" --quiet eval recall --model "$model" --corpus "$corpus" --context 8192 \
    --windows 2 --json > "$out/recall.jsonl"
  for k in ${RECALL_TOPK:-1024 2048}; do  # how recall grows with the selection
    "$bin" --quiet eval recall --model "$model" --corpus "$corpus" --context 8192 \
      --windows 2 --topk $k --json > "$out/recall-k$k.jsonl"
  done
fi
if grep -q '"n_routed_experts": [1-9]' "$model/config.json"; then
  "$bin" --quiet eval routing --model "$model" --corpus "$corpus" --seq-len 1024 \
    --windows 64 --batch-size 8 --json > "$out/routing.jsonl"
fi
echo "evaluations of $model written to $out"
