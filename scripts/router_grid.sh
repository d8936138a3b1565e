#!/usr/bin/env bash
# The router grid of BENCHMARKS.md ("Routers over seeds"): every router, three seeds, on
# the full corpus, with the out-of-distribution check on Rust source, in four cells:
#   routers-150  configs/routers.json, 150 steps (with every remedy arm)
#   routers-800  configs/routers.json, 800 steps
#   small-150    configs/small.json,   150 steps
#   small-800    configs/small.json,   800 steps
# Each cell is one `sparrow experiment routers` directory under OUT (default runs/grid):
# rerunning the script reuses finished runs and resumes interrupted ones, so it can be
# stopped and continued at will. CELLS picks cells (default: all four, in the order
# above); SEEDS the seeds (default 1,2,3); SPARROW_BIN the binary.
# Each cell runs the five routers over every seed first, then the remedy arms.
# Wall time on the 2-core Intel Xeon of BENCHMARKS.md, alone on the machine: routers-150
# ~1.1 h (33 runs of ~2 min), small-150 ~2.2 h (21 runs of ~6 min), routers-800 1.9 h
# (21 runs of ~4-5 min: 89 min for the five routers); small-800 ~9 h by the same scaling
# (not run).
# Usage: scripts/router_grid.sh [OUT]
set -euo pipefail
out=${1:-runs/grid}
bin=${SPARROW_BIN:-target/release/sparrow}
corpus=${CORPUS:-data/corpus}
ood=${OOD_CORPUS:-data/ood-code}
seeds=${SEEDS:-1,2,3}
cells=${CELLS:-routers-150 routers-800 small-150 small-800}

[ -x "$bin" ] || cargo build --release --locked
[ -d "$corpus" ] || "$bin" corpus fetch --out "$corpus"
if [ ! -d "$ood" ]; then # the .rs sources of candle-core 0.11.1, a dependency, as text
  src=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -maxdepth 1 -mindepth 1 -type d \
    -exec test -d {}/candle-core-0.11.1/src \; -print | head -1)
  [ -n "$src" ] || { echo "candle-core 0.11.1 sources not found: build first" >&2; exit 1; }
  mkdir -p "$ood"
  for f in $(find "$src/candle-core-0.11.1/src" -name '*.rs' | sort); do
    cp "$f" "$ood/$(echo "${f#*/src/}" | tr / _).txt"
  done
fi

# The remedies measured in every cell: the weaker CV^2 weight for capacity_aware, the
# proportional bias step for noaux_bias.
common=(--variant cap_cv2_0.03=capacity_aware:router_cv2_loss_coef=0.03
        --variant noaux_prop=noaux_bias:router_bias_update_rule=proportional)
# The single-knob arms, measured once on the smallest cell.
knobs=(--variant noaux_frozen50=noaux_bias:router_gate_frozen_steps=50
       --variant noaux_seq=noaux_bias:router_seq_aux_loss_coef=1e-4
       --variant cap_warm50=capacity_aware:router_balance_loss_warmup_steps=50
       --variant cap_factor2=capacity_aware:capacity_factor=2.0)

for cell in $cells; do
  case $cell in
    routers-150) config=configs/routers.json steps=150 extra=("${knobs[@]}") ;;
    routers-800) config=configs/routers.json steps=800 extra=() ;;
    small-150) config=configs/small.json steps=150 extra=() ;;
    small-800) config=configs/small.json steps=800 extra=() ;;
    *) echo "unknown cell $cell (routers-150, routers-800, small-150, small-800)" >&2; exit 2 ;;
  esac
  echo "== $cell: $config, $steps steps, seeds $seeds"
  start=$(date +%s)
  run=("$bin" experiment routers --config "$config" --corpus "$corpus" --out "$out/$cell"
       --steps "$steps" --val-every 25 --seeds "$seeds" --ood-corpus "$ood"
       --routers topk_softmax,capacity_aware,noaux_bias,switch_capacity,hash)
  # The five routers over every seed first (the cell's headline table, in routers.md
  # as soon as they end), then the remedy arms, which reuse those runs.
  "${run[@]}"
  echo "== $cell: five routers done after $(( ($(date +%s) - start) / 60 )) min"
  "${run[@]}" "${common[@]}" "${extra[@]}"
  echo "== $cell: $(( ($(date +%s) - start) / 60 )) min; report in $out/$cell/routers.md"
done
