#!/usr/bin/env bash
# The engine's benchmark cells of BENCHMARKS.md ("The engine: the model's own path"),
# each through `sparrow bench generate` (the code `generate` and the server run).
# Run on a quiet machine: the cells share the cores with nothing else.
#   scripts/bench_engine.sh [OUT_DIR]   (default runs/bench-engine; ~40 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-engine}
mkdir -p "$out"
cargo build --release --bin sparrow
bin=target/release/sparrow

# 1. sparrow-small at 131072 tokens (its trained limit is 65536: lifted, speed does not
#    depend on what the model learned), batch 1, DSA vs the same weights with dense
#    selectors; the dense decode runs on the model row's caches cut back to the prompt.
for dtype in int8 f32; do
  /usr/bin/time -v "$bin" bench generate --context 131072 --batch 1 --decode-tokens 32 \
    --dense --lift-context-limit --index-dtype "$dtype" \
    > "$out/small-131k-$dtype.txt" 2> "$out/small-131k-$dtype.time"
done

# 2. Batched decode at 1024 tokens of context: aggregate tokens/s over batch 1's.
"$bin" bench generate --context 1024 --batch 1,4,16 --decode-tokens 32 > "$out/small-batch.txt"

# 3. A DeepSeek-V3.2-shaped model (MLA + DSA in every layer, ~50M parameters, random
#    init) against its dense-MLA selectors at 65536 tokens of context; int8 index keys
#    (V3.2 keeps FP8 ones). The dense decode runs on the model row's caches cut back to
#    the prompt (same shapes, same decode cost).
/usr/bin/time -v "$bin" bench generate --config configs/deepseek-v32-50m.json --context 65536 \
  --batch 1 --decode-tokens 16 --dense --dense-prefill-max 16384 --index-dtype int8 \
  > "$out/v32-50m-65k.txt" 2> "$out/v32-50m-65k.time"
echo "results in $out"
