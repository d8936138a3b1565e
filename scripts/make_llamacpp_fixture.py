#!/usr/bin/env python3
"""llama.cpp's outputs on the real SmolLM2-135M-Instruct Q4_1 file, as a fixture that the
tests compare Sparrow against (run by hand, never in CI: building llama.cpp takes ~15
minutes on 2 cores).

    pip install llama-cpp-python==0.3.36   # builds llama.cpp (GGML_NATIVE)
    cargo run --release --bin sparrow -- model fetch smollm2-135m-instruct
    python3 scripts/make_llamacpp_fixture.py [PATH.gguf]

PATH defaults to the model cache ($SPARROW_HOME or ~/.cache/sparrow). Writes
fixtures/gguf/smollm2-llamacpp.json:
  tokenize        texts (unicode, runs of spaces and newlines, digits, code, special
                  tokens) and llama.cpp's ids (no BOS, special tokens parsed)
  continuations   20 prompts: their ids and llama.cpp's greedy 32-token continuation
  teacher_forced  a passage's ids and llama.cpp's top-1 prediction at every position
  chat            "What is the capital of France?" rendered in ChatML with and without
                  the file's default system line, and llama.cpp's greedy answer (ids)
  noise_floor     llama.cpp against itself with one benign change, its KV cache in f32
                  instead of f16: how many continuations stay identical and the
                  teacher-forced top-1 agreement. Rounding differences of this size
                  (activation quantization, f16 attention) flip greedy choices where the
                  model's top two logits nearly tie; Sparrow's agreement is judged
                  against this floor.
  export          Sparrow's GGUF export (`sparrow convert --to gguf`, from
                  target/release/sparrow) of the same model in f16, q8_0 and q4_1,
                  loaded by llama.cpp: its token ids for the texts and its greedy
                  continuation of the first prompt (q4_1 re-quantizes the file's own
                  blocks, so it must reproduce the original's continuation)
All with 2 threads, temperature 0 (argmax of the logits).
"""

import json
import os
import pathlib
import sys

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "gguf" / "smollm2-llamacpp.json"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\nafter three newlines\r\n",
    "tabs\tand\t\tmore\ttabs",
    "Numbers: 0 7 42 1234567890 3.14159 -12e+5 1,000,000",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))",
    "fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{v:?}\"); }",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語, 中文, 한국어",
    "emoji 🦀🔥👍🏽 and symbols ™ © ° ± ≠ ∞",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>a<|im_end|>b<|im_start|>",
    "don't won't it's we'll they've I'm she'd",
    "URL: https://example.com/path?q=1&r=2#frag",
    "a" * 50 + " " + "ab" * 20,
    "",
    " ",
    "\n",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "email@example.org, (parentheses) [brackets] {braces} <angles>",
]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "The theory of relativity states that",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1492, Christopher Columbus",
    "The largest planet in our solar system is",
    "To make a cup of tea, you first",
    "Photosynthesis is the process by which",
    "The quick brown fox",
    "My favorite book is",
    "Here is a list of fruits: apple, banana,",
    "The meaning of life is",
    "import numpy as np\n",
    "Dear Sir or Madam,\n",
    "The Great Wall of China",
    "Machine learning is a field of",
    "1, 2, 3, 4, 5,",
    "Shakespeare wrote many plays, including",
]

PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters. The sun rises in the east and sets in the "
    "west. Paris is the capital of France, and Berlin is the capital of Germany. One, two, "
    "three, four, five, six, seven, eight, nine, ten. The cat sat on the mat, and the dog "
    "slept by the fire while the rain fell softly on the roof of the old house."
)

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the capital of France?"


def default_path():
    home = os.environ.get("SPARROW_HOME") or os.path.join(os.environ["HOME"], ".cache", "sparrow")
    return pathlib.Path(home) / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if tok in (0, 2):  # <|endoftext|>, <|im_end|>
            break
        llm.eval([tok])
    return out


def check_export(path, fixture):
    import subprocess
    import tempfile

    out = {}
    first = fixture["continuations"][0]
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("f16", "q8_0", "q4_1"):
            gg = pathlib.Path(d) / f"export-{dtype}.gguf"
            subprocess.run(
                [str(ROOT / "target/release/sparrow"), "--quiet", "convert", "--to", "gguf",
                 "--model", str(path), "--dtype", dtype, "--out", str(gg)],
                check=True,
            )
            llm = llama_cpp.Llama(model_path=str(gg), n_ctx=512, n_threads=2, logits_all=True,
                                  verbose=False, seed=0)
            ids_equal = all(
                llm.tokenize(t["text"].encode("utf-8"), add_bos=False, special=True) == t["ids"]
                for t in fixture["tokenize"]
            )
            cont = greedy(llm, first["prompt_ids"], 32)
            out[dtype] = {"loads": True, "token_ids_equal": ids_equal,
                          "continuation_equal": cont == first["ids"]}
            print("export", dtype, out[dtype])
    assert out["q4_1"]["continuation_equal"] and all(v["token_ids_equal"] for v in out.values())
    return out


def main():
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=2048, n_threads=2, n_batch=512, logits_all=True,
        verbose=False, seed=0,
    )
    tok = lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
    fixture = {"llama_cpp_python": llama_cpp.__version__, "file": path.name}
    fixture["tokenize"] = [{"text": t, "ids": tok(t)} for t in TEXTS]
    fixture["continuations"] = []
    for p in PROMPTS:
        ids = tok(p)
        fixture["continuations"].append({"prompt": p, "prompt_ids": ids, "ids": greedy(llm, ids, 32)})
    ids = tok(PASSAGE)
    llm.reset()
    llm.eval(ids)
    top1 = [int(np.argmax(llm.scores[i])) for i in range(len(ids))]
    fixture["teacher_forced"] = {"text": PASSAGE, "ids": ids, "top1": top1}
    fixture["chat"] = []
    for system in (True, False):
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" if system else "") + (
            f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        )
        answer = greedy(llm, tok(prompt), 48)
        text = llm.detokenize([t for t in answer if t not in (0, 2)]).decode("utf-8", "replace")
        fixture["chat"].append({"system": system, "prompt": prompt, "answer_ids": answer, "answer": text})
        print("chat", "with" if system else "without", "system:", repr(text))
    f32kv = llama_cpp.Llama(
        model_path=str(path), n_ctx=2048, n_threads=2, n_batch=512, logits_all=True,
        verbose=False, seed=0, type_k=0, type_v=0,
    )
    same = sum(
        greedy(f32kv, c["prompt_ids"], 32) == c["ids"] for c in fixture["continuations"]
    )
    f32kv.reset()
    f32kv.eval(ids)
    agree = float(np.mean([int(np.argmax(f32kv.scores[i])) == t for i, t in enumerate(top1)]))
    fixture["noise_floor"] = {"kv_cache": "f32", "continuations_identical": int(same), "top1_agreement": agree}
    print("llama.cpp f32 KV vs f16 KV:", same, "/ 20 identical, top-1", agree)
    fixture["export"] = check_export(path, fixture)
    OUT.write_text(json.dumps(fixture, ensure_ascii=False) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
