#!/usr/bin/env bash
# Train the default model (models/sparrow-small, KIND=sparse) or its dense twin
# (KIND=dense) in four stages, as recorded in models/sparrow-small/MODEL.md:
#   1. language modelling on the corpus, 1024-token windows (DSA: dense warm-up of the
#      indexer for the first 150 steps, then sparse);
#   2. the same length with 60% of the rows replaced by generated passkey / needle
#      documents (the model learns to look things up; DSA: dense attention with the
#      indexer learning by KL for the first half, so it learns where lookups attend,
#      then sparse);
#   3. 90% retrieval rows, 80% of them passkey prompts (their filler is predictable, so
#      the answers' gradient is not drowned by text), again dense first, then sparse;
#   4. the long-context stage: 8192-token windows, 75% retrieval rows (80% passkey),
#      sparse.
# Each stage starts from the previous one's weights (`train --init-from`); an existing
# stage directory is resumed (a finished one is left as it is), so rerunning continues.
# Usage: scripts/train_sparrow_small.sh sparse|dense [OUT_PREFIX] (default runs/ss/...)
set -euo pipefail
kind=${1:?usage: $0 sparse|dense [OUT_PREFIX]}
case $kind in
  sparse) c1=configs/sparrow-small.json; name=sparrow-small
          s2_extra=(--indexer-dense-warmup-steps $((${S2_STEPS:-240} / 2)))
          s3_extra=(--indexer-dense-warmup-steps $((${S3_STEPS:-160} / 2)))
          s4_extra=(--indexer-dense-warmup-steps 0) ;;
  dense) c1=configs/sparrow-small-dense.json; name=sparrow-small-dense
         s2_extra=(); s3_extra=(); s4_extra=() ;;
  *) echo "KIND must be sparse or dense" >&2; exit 2 ;;
esac
prefix=${2:-runs/ss}/$name
bin=${SPARROW_BIN:-target/release/sparrow}
corpus=${CORPUS:-data/corpus}
S1_STEPS=${S1_STEPS:-260} S2_STEPS=${S2_STEPS:-240} S3_STEPS=${S3_STEPS:-160}
S4_STEPS=${S4_STEPS:-100}
mkdir -p "$(dirname "$prefix")"
tok=$(dirname "$prefix")/tokenizer.json
[ -f "$tok" ] || "$bin" tokenizer train --corpus "$corpus" --vocab-size 8192 --out "$tok"

stage() { # DIR, then the arguments of a new run
  local dir=$1; shift
  if [ -f "$dir/train_state.json" ]; then "$bin" train --resume "$dir"; else "$bin" train --out "$dir" "$@"; fi
}
stage "$prefix-s1" --config "$c1" --corpus "$corpus" --tokenizer "$tok" \
  --steps "$S1_STEPS" --batch-size 8 --seq-len 1024 --lr 2e-3 --warmup-steps 30 \
  --val-every 50 --val-batches 4 --checkpoint-every 50
# Stages 2-4 of two concurrent invocations (sparse and dense) run one at a time:
# together they would not fit in 24 GB.
exec 9>"$(dirname "$prefix")/.stage23.lock"
flock 9
stage "$prefix-s2" --corpus "$corpus" --init-from "$prefix-s1" "${s2_extra[@]}" \
  --steps "$S2_STEPS" --batch-size 8 --seq-len 1024 --lr 1e-3 --warmup-steps 20 \
  --retrieval-mix 0.6 --val-every 50 --val-batches 4 --checkpoint-every 50
stage "$prefix-s3" --corpus "$corpus" --init-from "$prefix-s2" "${s3_extra[@]}" \
  --steps "$S3_STEPS" --batch-size 8 --seq-len 1024 --lr 1e-3 --warmup-steps 10 \
  --retrieval-mix 0.9 --retrieval-passkey-share 0.8 --val-every 40 --val-batches 4 \
  --checkpoint-every 40
stage "$prefix-s4" --corpus "$corpus" --init-from "$prefix-s3" "${s4_extra[@]}" \
  --steps "$S4_STEPS" --batch-size 1 --seq-len 8192 --lr 5e-4 --warmup-steps 10 \
  --retrieval-mix 0.75 --retrieval-passkey-share 0.8 --val-every 25 --val-batches 4 \
  --checkpoint-every 25
