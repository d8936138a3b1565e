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
  deepseek-v32   deepseek-v3 plus the lightning indexer in every layer: 16 index heads
                 x 8 dims, top-4 of 11 positions, so the sparse selection is exercised;
                 reference.safetensors also holds `topk_layer{i}` (1, T, 4), the indices
                 each layer's indexer selected in the full forward (sorted by score; for
                 queries that see fewer than 4 positions only the first t+1 are real).
                 The script asserts a margin between the 4th and 5th index scores, so
                 the selection has no ties (DESIGN.md §6).
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
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
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


def capture_topk(model, ids):
    """Each layer's indexer selection in a full forward, and the smallest relative gap
    between the k-th and (k+1)-th visible index score over all queries."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    picked, gaps, hooks = {}, [], []
    for i, layer in enumerate(model.model.layers):
        ix = layer.self_attn.indexer

        def hook(mod, args, kwargs, out, i=i):
            hs, q_resid, (cos, sin) = args[0], args[1], args[2]
            b, s, _ = hs.shape
            q = mod.wq_b(q_resid).view(b, s, mod.n_heads, mod.head_dim)
            q_rot, q_pass = torch.split(q, [mod.qk_rope_head_dim, mod.head_dim - mod.qk_rope_head_dim], -1)
            k = mod.k_norm(mod.wk(hs)).unsqueeze(2)
            k_rot, k_pass = torch.split(k, [mod.qk_rope_head_dim, mod.head_dim - mod.qk_rope_head_dim], -1)
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
            q = torch.cat([q_rot, q_pass], -1)
            k = torch.cat([k_rot, k_pass], -1).squeeze(2)
            sc = torch.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * mod.softmax_scale)
            w = mod.weights_proj(hs).float() * mod.n_heads**-0.5
            scores = torch.matmul(w.unsqueeze(-2), sc).squeeze(-2)[0]  # (S, T)
            kk = mod.index_topk
            for t in range(kk, s):
                vis = scores[t, : t + 1].sort(descending=True).values
                gaps.append(((vis[kk - 1] - vis[kk]) / vis[0].abs().clamp_min(1e-12)).item())
            picked[f"topk_layer{i}"] = out.to(torch.int64).contiguous()

        hooks.append(ix.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return picked, min(gaps)


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
    tensors = {
        "input_ids": ids.contiguous(),
        "logits_full": full.float().contiguous(),
        "logits_decode": decode.float().contiguous(),
    }
    if hasattr(model.model.layers[0].self_attn, "indexer"):
        picked, gap = capture_topk(model, ids)
        assert gap > 1e-3, f"{name}: index scores tie at the top-k boundary (gap {gap})"
        print(f"{name}: smallest relative top-k margin {gap:.3g}")
        tensors.update(picked)
    save_file(tensors, str(out / "reference.safetensors"))
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
    # The DeepSeek-V3 MoE shared by deepseek-v3 and deepseek-v32.
    v3_moe = dict(
        q_lora_rank=20,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
    )
    build(
        "deepseek-v3",
        DeepseekV3ForCausalLM(
            DeepseekV3Config(rope_interleave=True, **v3_moe, **mla, **common)
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
    build(
        "deepseek-v32",
        DeepseekV32ForCausalLM(
            DeepseekV32Config(
                index_topk=4,
                index_n_heads=16,
                index_head_dim=8,
                **v3_moe,
                **mla,
                **common,
            )
        ),
        seed=6,
    )
    check_exports()


if __name__ == "__main__":
    main()
