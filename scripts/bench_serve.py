#!/usr/bin/env python3
"""Concurrent streaming clients against `sparrow serve` and, in the same run, against
llama.cpp's server (`llama-cpp-python[server]`) on the same GGUF file: aggregate
generated tokens/s and time to first token per concurrency level (the official `openai`
client, the same prompts and settings for both).

    python3 scripts/bench_serve.py [--model smollm2-135m-instruct] [--clients 1,4,16,64]
        [--max-tokens 64] [--rounds 2] [--max-batch 16] [--weights native|f16|...]
        [--bin target/release/sparrow] [--peer llamacpp|none]

The peer runs with as many threads as the machine has cores, `--n_ctx 2048`. When
`llama_cpp.server` cannot be imported the script installs `llama-cpp-python[server]`
(pinned; pip builds llama.cpp from source with GGML_NATIVE, ~15 minutes on 2 cores).

Each level starts N clients at once, each streaming one completion of a different prose
prompt (`/v1/completions`, seeded sampling at temperature 0.8, `max_tokens` new tokens,
usage from `stream_options.include_usage`); a level runs `--rounds` times and the best
round is kept (the machine is shared and noisy). Aggregate = all generated tokens / the
level's wall time; TTFT = from a request's start to its first streamed text. Prints a
Markdown table; the ratio column is each level's aggregate over one client's.
"""

import argparse
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai

LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"

PROMPTS = [
    "The old lighthouse keeper climbed the stairs every evening, and",
    "In the spring of that year the river rose higher than anyone remembered, so",
    "She opened the letter slowly, knowing that whatever it said",
    "The market was crowded with merchants from the southern coast who",
    "When the train finally stopped at the small station, the passengers",
    "Nobody in the village could explain why the bells had rung at midnight, but",
    "The garden behind the house had been left wild for years until",
    "After the storm, the fishermen gathered on the beach to",
]


def start_server(args):
    cmd = [args.bin, "serve", "--model", args.model, "--port", "0", "--max-batch", str(args.max_batch),
           "--max-queue", str(max(64, max(args.clients))), "--weights", args.weights]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = None
    for line in p.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # drain the log
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{url}/health").status == 200:
                return p, url
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit("the server never became ready")


def gguf_path(model):
    """The GGUF file of a named model in Sparrow's model cache (fetched when absent)."""
    if os.path.isfile(model):
        return model
    home = os.environ.get("SPARROW_HOME", os.path.expanduser("~/.cache/sparrow"))
    d = os.path.join(home, "models", model)
    if not os.path.isdir(d):
        subprocess.run([ARGS.bin, "model", "fetch", model], check=True)
    files = [f for f in sorted(os.listdir(d)) if f.endswith(".gguf")]
    if not files:
        sys.exit(f"no GGUF file in {d}")
    return os.path.join(d, files[0])


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llamacpp(args):
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        print(f"# installing {LLAMA_CPP_PYTHON} (builds llama.cpp: ~15 minutes on 2 cores)", file=sys.stderr)
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON", PIP_BREAK_SYSTEM_PACKAGES="1")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON], check=True, env=env)
    port = free_port()
    threads = str(os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(args.model), "--model_alias", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", threads,
           "--n_threads_batch", threads,
           # By default a new request interrupts the one running; queue them instead.
           "--interrupt_requests", "False"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{url}/v1/models").status == 200:
                return p, url
        except Exception:
            pass
        if p.poll() is not None:
            sys.exit("llama.cpp's server exited at start")
        time.sleep(0.2)
    sys.exit("llama.cpp's server never became ready")


def one_request(client, model, i, max_tokens):
    t0 = time.perf_counter()
    first = None
    tokens = None
    chunks = 0
    finish = None
    stream = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                       temperature=0.8, seed=i, stream=True,
                                       stream_options={"include_usage": True})
    for ch in stream:
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
        if ch.choices and ch.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
    # A server that sends no usage chunk (llama-cpp-python) streams one token per chunk.
    n = tokens if tokens is not None else chunks
    return first if first is not None else float("nan"), n, finish in ("length", "stop")


def level(client, model, n, max_tokens):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: one_request(client, model, i, max_tokens), range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    ttfts = [r[0] for r in results]
    return {"clients": n, "tokens": tokens, "wall": wall, "agg": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_max": max(ttfts),
            "complete": sum(r[2] for r in results)}


def measure(url, args):
    """Every level against the server at `url`, best of `--rounds` each."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    one_request(client, args.model, 0, 4)  # warm-up
    rows = []
    for n in args.clients:
        best = max((level(client, args.model, n, args.max_tokens) for _ in range(args.rounds)),
                   key=lambda r: r["agg"])
        rows.append(best)
        print(f"# {url}: {n} clients: {best['agg']:.1f} tok/s, TTFT p50 {best['ttft_p50'] * 1000:.0f} ms",
              file=sys.stderr)
    return rows


def table(name, rows):
    base = rows[0]["agg"]
    print(f"\n**{name}**\n")
    print("| clients | requests completed | generated tokens | wall s | aggregate tok/s | x one client | TTFT p50 ms | TTFT max ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['complete']} | {r['tokens']} | {r['wall']:.2f} | {r['agg']:.1f} | "
              f"{r['agg'] / base:.2f} | {r['ttft_p50'] * 1000:.0f} | {r['ttft_max'] * 1000:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--weights", default="native", help="how the server holds the weights (sparrow serve --weights)")
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "sparrow"))
    ap.add_argument("--peer", default="llamacpp", choices=["llamacpp", "none"],
                    help="the engine measured beside Sparrow in the same run")
    args = ap.parse_args()
    global ARGS
    ARGS = args
    args.clients = [int(x) for x in args.clients.split(",")]
    # One server at a time: they share the machine's cores.
    proc, url = start_server(args)
    try:
        ours = measure(url, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    peer = None
    if args.peer == "llamacpp":
        proc, url = start_llamacpp(args)
        try:
            peer = measure(url, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"model {args.model}, {args.max_tokens} tokens per request, best of {args.rounds} rounds; "
          f"Sparrow --weights {args.weights} --max-batch {args.max_batch}")
    table("Sparrow (sparrow serve)", ours)
    if peer:
        table(f"llama.cpp ({LLAMA_CPP_PYTHON}, {os.cpu_count()} threads)", peer)
        print("\n| clients | Sparrow tok/s | llama.cpp tok/s | Sparrow / llama.cpp | TTFT p50 ms Sparrow / llama.cpp |")
        print("|---|---|---|---|---|")
        for a, b in zip(ours, peer):
            print(f"| {a['clients']} | {a['agg']:.1f} | {b['agg']:.1f} | {a['agg'] / b['agg']:.2f} | "
                  f"{a['ttft_p50'] * 1000:.0f} / {b['ttft_p50'] * 1000:.0f} |")


ARGS = None


if __name__ == "__main__":
    main()
