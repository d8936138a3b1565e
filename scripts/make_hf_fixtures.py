#!/usr/bin/env python3
"""Reference fixtures for Sparrow's Hugging Face parity tests (run by hand, never in CI).

Builds tiny random models with the `transformers` classes under fixed seeds, saves them
with `save_pretrained` into fixtures/hf/<name>/, and stores reference outputs for fixed
token ids in fixtures/hf/<name>/reference.safetensors:
  input_ids      (1, T) int64
  logits_full    (1, T, V) float32   one forward over all T tokens
  logits_decode  (1, T, V) float32   T cached forwards of one token each

Needs the PyPI packages torch, transformers and safetensors (about 3 GB):
    python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers safetensors
    /tmp/hfenv/bin/python scripts/make_hf_fixtures.py

Then (the second half of the parity check, which CI cannot run) it converts every fixture
with `sparrow convert --to hf` (cargo must be on PATH), loads Sparrow's export with
transformers and checks that it reproduces the reference logits. `--check-export` runs
only that half, against the committed fixtures.

Models (all f32, eager attention):
  llama          GQA (4 query heads over 2 KV heads), untied head
  llama-sharded  the same architecture, MQA, tied head, saved in 3+ shards
                 (model.safetensors.index.json)
  mixtral        4 experts top-2 in every layer, GQA
  deepseek-v3    MLA with a query latent (q_lora_rank), interleaved RoPE, a dense first
                 layer, then 8 routed experts top-2 in 2 groups (1 kept) + 1 shared
                 expert, sigmoid router with a random e_score_correction_bias,
                 routed_scaling_factor 2.5
  deepseek-v3-noq  MLA without a query latent (q_proj), non-interleaved RoPE, every
                 layer MoE (4 experts + 1 shared), no groups
"""

import pathlib
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "hf"
T = 11
VOCAB = 97


def token_ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, T), generator=g)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-default random weights (std 0.2) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


@torch.no_grad()
def reference(model, ids):
    full = model(input_ids=ids, use_cache=False).logits
    past = None
    steps = []
    for t in range(ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    decode = torch.cat(steps, dim=1)
    err = (full - decode).abs().max().item() / full.abs().max().item()
    assert err < 1e-5, f"transformers' own full and cached logits differ: {err}"
    return full, decode


def build(name, model, seed, **save_kwargs):
    torch.manual_seed(seed)
    init_weights(model, seed)
    model.eval()
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*"):
        f.unlink()
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    ids = token_ids(seed)
    full, decode = reference(model, ids)
    save_file(
        {
            "input_ids": ids.contiguous(),
            "logits_full": full.float().contiguous(),
            "logits_decode": decode.float().contiguous(),
        },
        str(out / "reference.safetensors"),
    )
    print(f"{name}: {sorted(p.name for p in out.iterdir())}")


def check_exports():
    """transformers loads `sparrow convert --to hf` output and reproduces the logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    repo = ROOT.parent.parent
    for fixture in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                ["cargo", "run", "-q", "--release", "--bin", "sparrow", "--", "convert",
                 "--to", "hf", "--model", str(fixture), "--out", tmp],
                cwd=repo, check=True,
            )
            model = AutoModelForCausalLM.from_pretrained(
                tmp, attn_implementation="eager", dtype=torch.float32
            ).eval()
            ref = load_file(str(fixture / "reference.safetensors"))
            with torch.no_grad():
                logits = model(input_ids=ref["input_ids"], use_cache=False).logits
            err = (logits - ref["logits_full"]).abs().max().item() / ref["logits_full"].abs().max().item()
            assert err < 1e-5, f"{fixture.name}: transformers on Sparrow's export differs by {err}"
            print(f"{fixture.name}: transformers reproduces the logits from Sparrow's export (rel err {err:.1e})")


def main():
    if "--check-export" in sys.argv:
        check_exports()
        return
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    build(
        "llama",
        LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, rope_theta=10000.0, **common)),
        seed=1,
    )
    build(
        "llama-sharded",
        LlamaForCausalLM(
            LlamaConfig(
                num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True, **common
            )
        ),
        seed=2,
        max_shard_size="8KB",
    )
    build(
        "mixtral",
        MixtralForCausalLM(
            MixtralConfig(
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common
            )
        ),
        seed=3,
    )
    mla = dict(
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        moe_intermediate_size=16,
        num_experts_per_tok=2,
        num_key_value_heads=4,
    )
    build(
        "deepseek-v3",
        DeepseekV3ForCausalLM(
            DeepseekV3Config(
                q_lora_rank=20,
                n_routed_experts=8,
                n_shared_experts=1,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                rope_interleave=True,
                **mla,
                **common,
            )
        ),
        seed=4,
    )
    build(
        "deepseek-v3-noq",
        DeepseekV3ForCausalLM(
            DeepseekV3Config(
                q_lora_rank=None,
                n_routed_experts=4,
                n_shared_experts=1,  # transformers builds a 0-wide shared MLP for 0
                n_group=1,
                topk_group=1,
                first_k_dense_replace=0,
                routed_scaling_factor=1.0,
                rope_interleave=False,
                **mla,
                **common,
            )
        ),
        seed=5,
    )
    check_exports()


if __name__ == "__main__":
    main()
