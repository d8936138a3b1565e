#!/usr/bin/env python3
"""A DSA adapter with some of its layers turned back to dense attention: copies the
adapter directory ADAPTER to OUT with `layer_types[l] = "dense"` for each l in LAYERS and
those layers' indexer tensors dropped from adapter.safetensors (the loader refuses
tensors a config does not use). The diagnostic of MODEL.md's "Which layers' selection
loses the passkey": the same trained indexers, fewer layers sparse. Standard library only.

Usage: scripts/dsa_dense_layers.py ADAPTER LAYERS OUT   (LAYERS: 0,1,2 or 0-14)
"""
import json
import shutil
import struct
import sys
from pathlib import Path


def parse_layers(spec):
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def drop_tensors(src, dst, prefixes):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    keep = {k: v for k, v in header.items() if not k.startswith(prefixes)}
    out, blobs, offset = {}, [], 0
    for name, info in sorted(keep.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = info["data_offsets"]
        blobs.append(data[a:b])
        out[name] = dict(info, data_offsets=[offset, offset + b - a])
        offset += b - a
    if meta is not None:
        out["__metadata__"] = meta
    head = json.dumps(out, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return len(header) - len(keep)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, layers, dst = Path(sys.argv[1]), parse_layers(sys.argv[2]), Path(sys.argv[3])
    config = json.loads((src / "config.json").read_text())
    kinds = config["layer_types"]
    bad = sorted(l for l in layers if l >= len(kinds) or kinds[l] != "dsa")
    if bad:
        sys.exit(f"layers {bad} are not dsa layers of {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "adapter.safetensors", "MODEL.md") and f.is_file():
            shutil.copy(f, dst / f.name)
    config["layer_types"] = ["dense" if l in layers else k for l, k in enumerate(kinds)]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    prefixes = tuple(f"model.layers.{l}.self_attn.indexer." for l in sorted(layers))
    dropped = drop_tensors(src / "adapter.safetensors", dst / "adapter.safetensors", prefixes)
    print(f"{dst}: layers {sorted(layers)} dense, {dropped} indexer tensors dropped")


if __name__ == "__main__":
    main()
