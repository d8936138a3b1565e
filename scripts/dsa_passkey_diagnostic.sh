#!/usr/bin/env bash
# Why the DSA adapter loses the passkey (MODEL.md "Where the passkey is lost"): the
# same trained indexers with fewer layers sparse, with more positions selected, and
# how much of the key line the answering query's selection holds in each layer.
# Passkey at 1024 / 2048 / 4096 tokens, depths 0 / 0.5 / 1, 2 prompts per cell (the
# dense original's grid is scripts/eval_smollm2_dsa.sh's). Outputs in $OUT, one JSON
# per variant; tables at the end. About 60 minutes on 2 cores.
#
#   scripts/dsa_passkey_diagnostic.sh [ADAPTER_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ADAPTER=${1:-models/smollm2-135m-instruct-dsa}
OUT=${OUT:-runs/dsa-passkey-diagnostic}
SP=${SPARROW:-./target/release/sparrow}
mkdir -p "$OUT"
[ -x "$SP" ] || cargo build --release --bin sparrow
GRID=(--lengths 1024,2048,4096 --depths 0,0.5,1 --trials 2 --json)
source scripts/run_once.sh
run() { run_once "$OUT/$1.jsonl" "${@:2}"; } # name, command...
# The shipped selection, and how much of the key line each layer's selection keeps.
run keysel "$SP" --quiet eval passkey --model "$ADAPTER" "${GRID[@]}" --key-selection
# Some layers dense (their indexers dropped), the others sparse as trained.
for layers in 0 0-2 0-14 15-29; do
  python3 scripts/dsa_dense_layers.py "$ADAPTER" "$layers" "$OUT/model-dense-$layers" > /dev/null
  run "dense-$layers" "$SP" --quiet eval passkey --model "$OUT/model-dense-$layers" "${GRID[@]}"
done
# More positions per query.
for k in 512 1024 2048; do
  run "k$k" "$SP" --quiet eval passkey --model "$ADAPTER" --topk "$k" "${GRID[@]}"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
def load(name):
    return json.loads((d / f"{name}.jsonl").read_text().splitlines()[0])
print("Passkey accuracy by length (6 prompts each):\n")
print("| variant | 1024 | 2048 | 4096 |\n|---|---|---|---|")
for name, label in [("keysel", "all 30 layers sparse, k = 256 (shipped)"),
                    ("dense-0", "layer 0 dense"), ("dense-0-2", "layers 0-2 dense"),
                    ("dense-0-14", "layers 0-14 dense (15-29 sparse)"),
                    ("dense-15-29", "layers 15-29 dense (0-14 sparse)"),
                    ("k512", "k = 512"), ("k1024", "k = 1024"), ("k2048", "k = 2048")]:
    r = load(name)
    cells = " | ".join(f"{b['accuracy'] * 100:.0f}%" for b in r["by_length"])
    print(f"| {label} | {cells} |")
r = load("keysel")
layers = len(r["trials"][0]["key_selected"])
print("\nShare of the key line in the answering query's selection, per layer (depths 0 and 0.5,"
      " where the dense original answers; mean over prompts):\n")
print("| length | mean over layers | (layer, prompt) pairs holding none of it | per layer 0..%d |" % (layers - 1))
print("|---|---|---|---|")
for length in sorted({t["length"] for t in r["trials"]}):
    ts = [t for t in r["trials"] if t["length"] == length and t["depth"] < 1]
    per = [sum(t["key_selected"][l] or 0 for t in ts) / len(ts) for l in range(layers)]
    none = sum(t["key_selected"][l] == 0 for t in ts for l in range(layers)) / (len(ts) * layers)
    print(f"| {length} | {sum(per) / layers:.0%} | {none:.0%} | {' '.join(f'{p * 100:.0f}' for p in per)} |")
PY
