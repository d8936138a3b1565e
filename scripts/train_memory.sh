#!/usr/bin/env bash
# Peak resident memory of a few training steps, per model config and rows per step,
# for one or more `sparrow` binaries (e.g. two builds, before and after a change):
#   scripts/train_memory.sh [BIN ...]          (default: target/release/sparrow)
# env: CONFIGS (default "v4-small sparrow-small"), ROWS (default "1 2 4"), STEPS (3),
#      SEQ_LEN (1024), CORPUS (../shared/corpus if present, else data/corpus).
# Each run: `sparrow train` of STEPS steps, ROWS x SEQ_LEN tokens each, one validation
# batch at the end, under /usr/bin/time (its %M: peak RSS). Prints one line per run.
set -euo pipefail
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/sparrow)
corpus=${CORPUS:-../shared/corpus}
[ -d "$corpus" ] || corpus=data/corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-32s %-14s %5s %12s %10s\n' binary config rows peak_rss_gb tokens/s
for bin in "${bins[@]}"; do
  for cfg in ${CONFIGS:-v4-small sparrow-small}; do
    for rows in ${ROWS:-1 2 4}; do
      rm -rf "$tmp/run"
      out=$(/usr/bin/time -f "MAXRSS %M" "$bin" train --out "$tmp/run" \
        --config "configs/$cfg.json" --corpus "$corpus" \
        --tokenizer models/sparrow-small/tokenizer.json --steps "${STEPS:-3}" \
        --batch-size "$rows" --seq-len "${SEQ_LEN:-1024}" --lr 2e-3 --warmup-steps 1 \
        --val-every 1000 --val-batches 1 2>&1 || true)
      rss=$(grep -o 'MAXRSS [0-9]*' <<<"$out" | awk '{printf "%.2f", $2 / 1048576}')
      tps=$(grep -o '[0-9.]* tokens/s' <<<"$out" | tail -1 | awk '{print $1}')
      printf '%-32s %-14s %5s %12s %10s\n' "$bin" "$cfg" "$rows" "${rss:-failed}" "${tps:--}"
    done
  done
done
