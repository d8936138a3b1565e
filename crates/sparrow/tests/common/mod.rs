//! Shared test helpers: configs, a synthetic corpus, finite-difference checks.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::ModelConfig;
use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `configs/tiny.json`.
pub fn tiny_config() -> ModelConfig {
    ModelConfig::from_file(&repo_root().join("configs/tiny.json")).expect("tiny config")
}

/// A small English-like corpus written into `dir` (two documents), so tests never need
/// a download or ../shared.
pub fn write_synthetic_corpus(dir: &Path) {
    let subjects = [
        "The whale",
        "A sailor",
        "The captain",
        "Our ship",
        "The sea",
        "An old man",
        "The harbour",
    ];
    let verbs = [
        "watched",
        "followed",
        "crossed",
        "remembered",
        "feared",
        "sought",
        "found",
    ];
    let objects = [
        "the grey horizon",
        "a distant light",
        "the cold water",
        "the long voyage",
        "a quiet town",
        "the morning tide",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    std::fs::create_dir_all(dir).unwrap();
    for doc in 0..2 {
        let mut text = String::new();
        for i in 0..1500 {
            let s = subjects[rng.random_range(0..subjects.len())];
            let v = verbs[rng.random_range(0..verbs.len())];
            let o = objects[rng.random_range(0..objects.len())];
            text.push_str(&format!("{s} {v} {o}."));
            text.push(if i % 6 == 5 { '\n' } else { ' ' });
        }
        std::fs::write(dir.join(format!("doc{doc}.txt")), text).unwrap();
    }
}

pub fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Compare analytic gradients of `loss()` with central finite differences for up to
/// `per_var` random entries of each of `vars`. Panics naming the variable on mismatch.
pub fn check_gradients(vars: &[(String, Var)], loss: impl Fn() -> Tensor, per_var: usize) {
    let l = loss();
    let grads = l.backward().unwrap();
    let eps = 1e-6;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let analytic = to_f64_vec(g);
        let base = to_f64_vec(var.as_tensor());
        let shape = var.dims().to_vec();
        for _ in 0..per_var.min(base.len()) {
            let i = rng.random_range(0..base.len());
            let mut plus = base.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let lp: f64 = loss().to_scalar().unwrap();
            let mut minus = base.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let lm: f64 = loss().to_scalar().unwrap();
            var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * eps);
            let a = analytic[i];
            let err = (numeric - a).abs();
            let tol = 1e-5 * numeric.abs().max(a.abs()) + 1e-8;
            assert!(
                err <= tol,
                "`{name}`[{i}]: analytic {a:e} vs finite difference {numeric:e} (err {err:e})"
            );
        }
    }
}

/// max |a - b| / max |b|
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = to_f64_vec(a);
    let b = to_f64_vec(b);
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

/// `configs/tiny.json` with a dense first layer and a DSA second layer.
pub fn tiny_dsa_config(kind: sparrow::config::IndexerKind, topk: usize) -> ModelConfig {
    use sparrow::config::AttentionKind;
    let mut cfg = tiny_config();
    cfg.layer_types = Some(vec![AttentionKind::Dense, AttentionKind::Dsa]);
    cfg.index_topk = topk;
    cfg.indexer_kind = kind;
    cfg.index_n_heads = 3;
    cfg.index_head_dim = 8;
    cfg.index_rope_head_dim = 4;
    cfg.index_gate_intermediate_size = 12;
    cfg.validate().expect("valid DSA config");
    cfg
}

/// A tiny MLA model at awkward sizes (3 heads, latent rank 7, nope 5, rope 4, value 3,
/// interleaved RoPE); `q_lora` = the query latent's rank; with `dsa_topk` its second
/// layer is a DeepSeek-V3.2 DSA layer (lightning indexer over the query latent, 16
/// heads: tie-free scores).
pub fn tiny_mla_config(q_lora: Option<usize>, dsa_topk: Option<usize>) -> ModelConfig {
    use sparrow::config::AttentionKind;
    let mut cfg = tiny_config();
    cfg.hidden_size = 24;
    cfg.num_attention_heads = 3;
    cfg.num_key_value_heads = Some(3);
    cfg.kv_lora_rank = Some(7);
    cfg.q_lora_rank = q_lora;
    cfg.qk_nope_head_dim = 5;
    cfg.qk_rope_head_dim = 4;
    cfg.v_head_dim = 3;
    cfg.rope_interleave = true;
    if let Some(k) = dsa_topk {
        cfg.layer_types = Some(vec![AttentionKind::Dense, AttentionKind::Dsa]);
        cfg.index_topk = k;
        cfg.index_n_heads = 16;
        cfg.index_head_dim = 8;
    }
    cfg.validate().expect("valid MLA config");
    cfg
}

/// One sequence fed through the engine's step in `chunks` (their sum = its length):
/// the logits of every token, (1, T, V), and the sequence's cache.
pub fn stepped(
    model: &sparrow::model::Model,
    tokens: &[u32],
    chunks: &[usize],
) -> (Tensor, sparrow::model::cache::SeqCache) {
    use sparrow::model::step::StepOptions;
    let mut cache = sparrow::model::cache::SeqCache::for_config(&model.cfg);
    let opts = StepOptions {
        all_logits: true,
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut at = 0;
    for &n in chunks {
        let step = model.step_one(&tokens[at..at + n], &mut cache, &opts);
        rows.push(step.unwrap().logits);
        at += n;
    }
    assert_eq!(at, tokens.len(), "chunks do not cover the tokens");
    let logits = Tensor::cat(&rows, 0).unwrap().unsqueeze(0).unwrap();
    (logits, cache)
}

/// A prefill of `prefill` tokens, then one token per step, over `n` tokens.
pub fn prefill_then_decode(prefill: usize, n: usize) -> Vec<usize> {
    std::iter::once(prefill)
        .chain(std::iter::repeat_n(1, n - prefill))
        .collect()
}

/// max |got - want| / max |want|, f32 results against an f64 reference.
pub fn rel_err_f64(got: &[f32], want: &[f64]) -> f64 {
    let diff = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    diff / want.iter().map(|x| x.abs()).fold(1e-30, f64::max)
}

/// Per-row NLL of `targets` (N) u32 under `logits` (N, V), `logsumexp - logit[target]`
/// in f64 row by row: the plain reference of the evaluation NLL.
pub fn nll_reference(logits: &Tensor, targets: &Tensor) -> Vec<f64> {
    let v = logits.dim(1).unwrap();
    let x = to_f64_vec(logits);
    let t = targets.to_vec1::<u32>().unwrap();
    x.chunks(v)
        .zip(t)
        .map(|(row, target)| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|a| (a - max).exp()).sum::<f64>().ln();
            lse - row[target as usize]
        })
        .collect()
}

/// A small V4 model at awkward sizes: 3 heads of 10 (4 rotated), query latent 14, 3
/// output groups of rank 5, window 5, CSA rate 3 (5 index heads of 6, top-2), HCA rate
/// 5, 3 streams, 5 experts top-2 (hash_moe in the first layer), clamp 0.8.
pub fn tiny_v4_config() -> ModelConfig {
    use sparrow::config::{AttentionKind, CompressRates, MlpKind, RouterKind, ScoringFunc};
    let mut cfg = tiny_config();
    cfg.hidden_size = 24;
    cfg.num_attention_heads = 3;
    cfg.num_key_value_heads = Some(1);
    cfg.head_dim = Some(10);
    cfg.num_hidden_layers = 4;
    cfg.q_lora_rank = Some(14);
    cfg.qk_rope_head_dim = 4;
    cfg.layer_types = Some(vec![
        AttentionKind::CompressedSparseAttention,
        AttentionKind::SlidingAttention,
        AttentionKind::HeavilyCompressedAttention,
        AttentionKind::CompressedSparseAttention,
    ]);
    cfg.compress_rates = Some(CompressRates {
        compressed_sparse_attention: 3,
        heavily_compressed_attention: 5,
    });
    cfg.sliding_window = Some(5);
    cfg.o_groups = Some(3);
    cfg.o_lora_rank = 5;
    cfg.index_n_heads = 5;
    cfg.index_head_dim = 6;
    cfg.index_topk = 2;
    cfg.hc_mult = Some(3);
    cfg.n_routed_experts = 5;
    cfg.num_experts_per_tok = 2;
    cfg.n_shared_experts = 1;
    cfg.moe_intermediate_size = 7;
    cfg.first_k_dense_replace = 0;
    cfg.router_kind = RouterKind::NoauxBias;
    cfg.scoring_func = Some(ScoringFunc::Sqrtsoftplus);
    cfg.routed_scaling_factor = 1.5;
    cfg.mlp_layer_types = Some(vec![
        MlpKind::HashMoe,
        MlpKind::Moe,
        MlpKind::Moe,
        MlpKind::Moe,
    ]);
    cfg.swiglu_limit = Some(0.8);
    cfg.validate().expect("valid V4 config");
    cfg
}
