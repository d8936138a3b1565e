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
  deepseek-v4    DeepSeek-V4 (37 tokens): 4 layers sliding / CSA / HCA / CSA, window 8,
                 CSA rate 4 (overlapping windows, 16 index heads x 8, top-3 of up to 9
                 entries), HCA rate 8, YaRN on the compressed layers' RoPE (factor 4 of
                 16 positions), 2 hyper-connection streams, hash_moe in layers 0 and 3,
                 sqrtsoftplus routing with a random bias, clamped SwiGLU (limit 1.5, so
                 the clamp bites), random sinks / position biases / expert tables.
  deepseek-v4-b  the other rates: HCA rate 6 / CSA rate 2 / sliding, window 5, 3 streams,
                 plain RoPE, top-5 of up to 18 entries, a quarter of each head rotated,
                 tied embeddings.
                 Both assert a margin between the k-th and (k+1)-th visible index score
                 of every CSA query (no ties at the selection boundary).
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
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    DynamicCache,
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


T_V4 = 37


def v4_margin(model, ids):
    """The smallest relative gap between the k-th and (k+1)-th visible index score of
    any CSA query in a full forward."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

    seen = []
    original = m.DeepseekV4IndexerScorer.forward

    def record(self, q, kv, hs):
        out = original(self, q, kv, hs)
        seen.append(out.detach().clone())
        return out

    m.DeepseekV4IndexerScorer.forward = record
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        m.DeepseekV4IndexerScorer.forward = original
    rate = model.config.compress_rates["compressed_sparse_attention"]
    k = model.config.index_topk
    gaps = []
    for scores in seen:
        for t in range(scores.shape[1]):
            visible = (t + 1) // rate
            if visible > k:
                v = scores[0, t, :visible].sort(descending=True).values
                gaps.append(((v[k - 1] - v[k]) / v[0].abs().clamp_min(1e-12)).item())
    return min(gaps)


def build_v4(name, config, seed):
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config)
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bname, b in sorted(model.named_buffers()):
            if bname.endswith("tid2eid"):
                b.copy_(torch.randint(0, config.n_routed_experts, b.shape, generator=g))
    model.eval()
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*"):
        f.unlink()
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, T_V4), generator=g)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(T_V4)]
    decode = torch.cat(steps, dim=1)
    err = (full - decode).abs().max().item() / full.abs().max().item()
    assert err < 1e-5, f"{name}: transformers' own full and cached logits differ: {err}"
    gap = v4_margin(model, ids)
    assert gap > 1e-3, f"{name}: index scores tie at the top-k boundary (gap {gap})"
    print(f"{name}: smallest relative top-k margin {gap:.3g}; full vs cached {err:.1e}")
    save_file(
        {
            "input_ids": ids.contiguous(),
            "logits_full": full.float().contiguous(),
            "logits_decode": decode.float().contiguous(),
        },
        str(out / "reference.safetensors"),
    )
    print(f"{name}: {sorted(p.name for p in out.iterdir())}")


def v4_fixtures():
    v4 = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        moe_intermediate_size=16,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        q_lora_rank=24,
        num_experts_per_tok=2,
        n_routed_experts=4,
        n_shared_experts=1,
        routed_scaling_factor=1.5,
        swiglu_limit=1.5,
        max_position_embeddings=64,
        o_groups=2,
        o_lora_rank=8,
        index_n_heads=16,
        index_head_dim=8,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    build_v4(
        "deepseek-v4",
        DeepseekV4Config(
            num_hidden_layers=4,
            layer_types=[
                "sliding_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention",
                "compressed_sparse_attention",
            ],
            mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            sliding_window=8,
            hc_mult=2,
            index_topk=3,
            partial_rotary_factor=0.5,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32,
                "beta_slow": 1,
            },
            **v4,
        ),
        seed=7,
    )
    build_v4(
        "deepseek-v4-b",
        DeepseekV4Config(
            num_hidden_layers=3,
            layer_types=[
                "heavily_compressed_attention",
                "compressed_sparse_attention",
                "sliding_attention",
            ],
            mlp_layer_types=["moe", "hash_moe", "moe"],
            compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 6},
            sliding_window=5,
            hc_mult=3,
            index_topk=5,
            partial_rotary_factor=0.25,
            tie_word_embeddings=True,
            **v4,
        ),
        seed=8,
    )


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
    if "--v4" in sys.argv:
        v4_fixtures()
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
    v4_fixtures()
    check_exports()


if __name__ == "__main__":
    main()
