#!/usr/bin/env bash
# Every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each, seeded from the repo's
# real files (GGUF and safetensors fixtures, configs, chat templates, a tokenizer, request
# bodies of both APIs), with
# libFuzzer's 2 GB RSS limit and a 10 s per-input timeout; prints executions and
# coverage per target and fails on any crash, hang or out-of-memory (the input is left
# in fuzz/artifacts/TARGET/).
#   scripts/fuzz.sh [SECONDS (default 60)] [TARGET ...]
# FUZZ_RUNS=N also ends each target after N executions (the issue's full run:
# FUZZ_RUNS=1000000 scripts/fuzz.sh 1800: a million executions or 30 minutes each).
# Needs the nightly toolchain and cargo-fuzz (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf safetensors config_json tokenizer_json chat_template topk expert_dispatch indexer_topk requests)
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

corpus=target/fuzz-corpus
seed() { # seed TARGET FILE... : copy files into the target's working corpus
  local t=$1; shift
  mkdir -p "$corpus/$t"
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$corpus/$t/seed-$(basename "$(dirname "$f")")-$(basename "$f")"; done
  return 0
}
seed gguf fixtures/gguf/*.gguf
seed safetensors fixtures/gguf/*.safetensors fixtures/hf/*/reference.safetensors
seed config_json configs/*.json fixtures/hf/*/config.json models/sparrow-small/config.json
seed tokenizer_json fuzz/seeds/tokenizer_json/*
seed chat_template fuzz/seeds/chat_template/*
seed expert_dispatch fuzz/seeds/expert_dispatch/*
seed requests fuzz/seeds/requests/*

summary=()
for t in "${targets[@]}"; do
  log=$(mktemp)
  mkdir -p "$corpus/$t" # targets without seed files start from an empty corpus
  echo "== $t ($secs s)"
  if ! cargo +nightly fuzz run --release "$t" "$corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=131072 \
      -print_final_stats=1 ${FUZZ_RUNS:+-runs=$FUZZ_RUNS} >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed: see fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | grep -o '[0-9]*')
  took=$(grep -o 'runs in [0-9]* second' "$log" | tail -1 | grep -o '[0-9]*')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  summary+=("$t: ${runs:-?} executions in ${took:-$secs} s, coverage ${cov:-?} edges, 0 crashes")
  echo "${summary[-1]}" # now, so a later target's finding does not lose this figure
  rm -f "$log"
done
printf '%s\n' "${summary[@]}"
