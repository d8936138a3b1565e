#!/usr/bin/env python3
"""Sparrow against llama.cpp on the same GGUF file, in one run, same thread count.

    pip install llama-cpp-python==0.3.36        # builds llama.cpp (~15 min on 2 cores)
    cargo build --release
    python3 scripts/bench_llamacpp.py [--model smollm2-135m-instruct] [--threads 2]
        [--contexts 128,512,4096] [--decode-tokens 64] [--out bench-llamacpp.json]

For each context length: llama.cpp (llama-cpp-python, n_batch 512, default f16 KV
cache) prefills a prompt of that many tokens, then decodes `--decode-tokens` tokens one
at a time (argmax); prefill tokens/s and decode tokens/s are timed around its eval
calls (greedy `sample(temp=0)` between them, as Sparrow samples inside its timed
steps). Sparrow's figures come from `sparrow bench generate` on the same file (prefill
in chunks of 512, batch 1, native quantized weights, its GGUF default f16 KV cache), run
by this script in the same session. Prints the table and the ratios (Sparrow /
llama.cpp) and writes them as JSON.
"""

import argparse
import json
import os
import pathlib
import subprocess
import time

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def model_path(name):
    p = pathlib.Path(name)
    if p.is_file():
        return p
    out = subprocess.run(
        [str(ROOT / "target/release/sparrow"), "model", "fetch", name],
        check=True, capture_output=True, text=True,
    ).stdout
    return pathlib.Path(out.strip().split(" is at ", 1)[1])


def llama_cpp_row(llm, ctx, decode_tokens):
    rng = np.random.default_rng(ctx)
    prompt = [int(t) for t in rng.integers(100, 40000, size=ctx)]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    tok = int(llm.sample(temp=0.0))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([tok])
        tok = int(llm.sample(temp=0.0))
    decode = time.perf_counter() - t0
    return {"prefill_tokens_per_s": ctx / prefill, "decode_tokens_per_s": decode_tokens / decode}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="128,512,4096")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench-llamacpp.json")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    path = model_path(a.model)
    n_ctx = max(contexts) + a.decode_tokens + 8

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
        n_batch=512, verbose=False, seed=0,
    )
    peer = {c: llama_cpp_row(llm, c, a.decode_tokens) for c in contexts}
    del llm

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = subprocess.run(
        [str(ROOT / "target/release/sparrow"), "--quiet", "bench", "generate", "--model", str(path),
         "--context", a.contexts, "--batch", "1", "--decode-tokens", str(a.decode_tokens),
         "--prefill-chunk", "512", "--json"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    ours = {}
    machine = {}
    for line in out.splitlines():
        v = json.loads(line)
        if v.get("bench") == "generate" and v["mode"] == "model":
            ours[v["context"]] = v
        elif v.get("bench") == "machine":
            machine = v

    rows = []
    print(f"{path.name}, {a.threads} threads, read bandwidth {machine.get('read_gbps', 0):.1f} GB/s")
    print(f"{'context':>8} {'prefill/s sparrow':>18} {'llama.cpp':>10} {'ratio':>6} "
          f"{'decode/s sparrow':>17} {'llama.cpp':>10} {'ratio':>6} {'RSS MB':>7}")
    for c in contexts:
        s, p = ours[c], peer[c]
        row = {
            "context": c,
            "sparrow_prefill_tokens_per_s": s["prefill_tokens_per_s"],
            "llamacpp_prefill_tokens_per_s": p["prefill_tokens_per_s"],
            "prefill_ratio": s["prefill_tokens_per_s"] / p["prefill_tokens_per_s"],
            "sparrow_decode_tokens_per_s": s["decode_tokens_per_s"],
            "llamacpp_decode_tokens_per_s": p["decode_tokens_per_s"],
            "decode_ratio": s["decode_tokens_per_s"] / p["decode_tokens_per_s"],
            "sparrow_peak_rss_mb": s["peak_rss_bytes"] / 1e6,
        }
        rows.append(row)
        print(f"{c:>8} {row['sparrow_prefill_tokens_per_s']:>18.1f} {row['llamacpp_prefill_tokens_per_s']:>10.1f} "
              f"{row['prefill_ratio']:>6.2f} {row['sparrow_decode_tokens_per_s']:>17.1f} "
              f"{row['llamacpp_decode_tokens_per_s']:>10.1f} {row['decode_ratio']:>6.2f} "
              f"{row['sparrow_peak_rss_mb']:>7.0f}")
    pathlib.Path(a.out).write_text(json.dumps({
        "model": str(path), "threads": a.threads, "llama_cpp_python": llama_cpp.__version__,
        "machine": machine, "rows": rows,
    }, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
