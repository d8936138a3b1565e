#!/usr/bin/env bash
# Every figure of models/smollm2-135m-instruct-dsa/MODEL.md: the DSA adapter against the
# dense original (SmolLM2-135M-Instruct, Q4_1 GGUF) on the same held-out text and
# prompts. Results go to $OUT as JSON lines, one file per evaluation; a summary table
# is printed at the end.
#
#   scripts/eval_smollm2_dsa.sh [ADAPTER] [quick|full] [PART...]
#
# ADAPTER defaults to the shipped adapter; `quick` (the default) runs the grids with
# fewer prompts (2 per cell, depths 0 / 0.5 / 1, 2 perplexity windows, 16384 tokens past
# the trained length) for a session's budget, `full` with the issue's 4 per cell, 5
# depths, 4 windows, and 32768 too. TRIALS, DEPTHS, WINDOWS and BEYOND in the
# environment override the preset's. PARTS (default all): recall, perplexity, speed,
# retrieval, beyond; outputs already in $OUT are kept, not recomputed.
set -euo pipefail
cd "$(dirname "$0")/.."
SPARSE=${1:-smollm2-135m-instruct-dsa}
SIZE=${2:-quick}
PARTS=("${@:3}")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(recall perplexity speed retrieval beyond)
wants() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
for p in "${PARTS[@]}"; do
  case "$p" in recall|perplexity|speed|retrieval|beyond) ;; *) echo "unknown part $p" >&2; exit 2 ;; esac
done
DENSE=smollm2-135m-instruct
OUT=${OUT:-runs/smollm2-dsa-eval}
CORPUS=${CORPUS:-data/corpus}
SP=${SPARROW:-./target/release/sparrow}
# Retrieval prompts plain (the default: SmolLM2 continues "The pass key is" with the key)
# or in the chat template's user turn (CHAT=--chat: 0% of 6 passkey prompts at 1024 tokens
# for the dense model, which answers "The pass key is a magical number that", against 67% plain).
CHAT=${CHAT:-}
mkdir -p "$OUT"
[ -x "$SP" ] || cargo build --release --bin sparrow
[ -d "$CORPUS" ] || "$SP" corpus fetch --out "$CORPUS"
case "$SIZE" in
  quick) T=2; W=2; D=0,0.5,1; B=16384 ;;
  full) T=4; W=4; D=0,0.25,0.5,0.75,1; B=16384,32768 ;;
  *) echo "size must be quick or full" >&2; exit 2 ;;
esac
TRIALS=${TRIALS:-$T}; WINDOWS=${WINDOWS:-$W}; DEPTHS=${DEPTHS:-$D}; BEYOND=${BEYOND:-$B}
source scripts/run_once.sh
run() { run_once "$OUT/$1.jsonl" "${@:2}"; } # name, command...

# Indexer recall per layer at 4096 tokens of context, and the recall-vs-k curve.
wants recall && run recall "$SP" --quiet eval recall --model "$SPARSE" --corpus "$CORPUS" --context 4096 \
  --windows "$WINDOWS" --topk 64,128,256,512,1024,2048 --json
# Perplexity at 1024, 4096, 8192 (the trained length) and beyond it.
wants perplexity && for m in dense:$DENSE sparse:$SPARSE; do
  run "perplexity-${m%%:*}" "$SP" --quiet eval perplexity --model "${m#*:}" --corpus "$CORPUS" \
    --context 1024,4096,8192 --windows "$WINDOWS" --json
done
# The same at k = 512 (the issue's perplexity target allows k <= 512).
wants perplexity && run perplexity-sparse-k512 "$SP" --quiet eval perplexity --model "$SPARSE" --corpus "$CORPUS" \
  --context 1024,4096,8192 --windows "$WINDOWS" --topk 512 --json
# Decode and prefill speed at 8192 tokens of context (and the dense selectors of the same
# weights in the same run); the 32 timed decode steps go just past 8192 positions.
wants speed && run bench-sparse "$SP" --quiet bench generate --model "$SPARSE" --context 8192 --dense \
  --lift-context-limit --json
wants speed && run bench-dense "$SP" --quiet bench generate --model "$DENSE" --context 8192 \
  --lift-context-limit --json
# Passkey and needle grids up to the trained length (8184 + the 8 answer tokens = 8192).
wants retrieval && for m in dense:$DENSE sparse:$SPARSE; do
  run "passkey-${m%%:*}" "$SP" --quiet eval passkey --model "${m#*:}" \
    --lengths 1024,2048,4096,8184 --depths "$DEPTHS" --trials "$TRIALS" $CHAT --json
  run "needle-${m%%:*}" "$SP" --quiet eval needle --model "${m#*:}" --corpus "$CORPUS" \
    --lengths 1024,2048,4096,8184 --depths "$DEPTHS" --trials "$TRIALS" $CHAT --json
done
# The int8 index keys (a quarter of the f32 keys' bytes per decode step).
wants speed && run bench-sparse-int8 "$SP" --quiet bench generate --model "$SPARSE" --context 8192 \
  --index-dtype int8 --lift-context-limit --json
# Past the trained 8192 tokens (RoPE extrapolation): perplexity at 16384 and 32768.
wants beyond && for m in dense:$DENSE sparse:$SPARSE; do
  run "beyond-${m%%:*}" "$SP" --quiet eval perplexity --model "${m#*:}" --corpus "$CORPUS" \
    --context "$BEYOND" --windows 1 --lift-context-limit --json
done
python3 scripts/dsa_tables.py "$OUT"
