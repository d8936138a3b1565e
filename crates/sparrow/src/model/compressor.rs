//! DeepSeek-V4's compressed entry store: a learned gated pooling of every `m` source
//! tokens into one entry (DESIGN.md §4), and CSA's indexer over those entries.
//!
//! `Compressor` (`self_attn.compressor`, and the indexer's own at `index_head_dim`):
//! `kv_proj` and `gate_proj` project each token; window w's entry is
//! `RMSNorm(sum_j softmax_j(gate_j + position_bias_j) * kv_j)` (softmax per channel over
//! the window's slots), RoPE'd at position `w * m`. HCA pools non-overlapping windows of
//! m tokens. CSA (`overlap`) projects 2d values per token, two series Ca | Cb: entry w
//! pools window w's Cb and window w-1's Ca together (2m slots, stride m; window 0 has
//! only its Cb). Only complete windows make entries: query t sees entry w when
//! `(w + 1) * m <= t + 1`.
//!
//! `V4Indexer` (`self_attn.compressor.indexer`): index queries from the query latent
//! (`q_b_proj`, RoPE'd at the query's position), keys from its own compressor, score
//! `I(t, w) = sum_h w_h(t) ReLU(q_h(t) . k(w)) / sqrt(index_head_dim)` with
//! `w_h(t) = weights_proj(x_t)_h / sqrt(index_n_heads)`; each query keeps its
//! `index_topk` best visible entries (ties: lower entry first, as `kernels::topk`).

use super::linear::{host_f32, Linear};
use super::norm::RmsNorm;
use super::params::{Init, Vb};
use super::rope::TailRope;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::topk::{StreamTopK, NONE};
use candle_core::Tensor;

/// Log-domain value of a masked slot or entry (finite: no inf - inf in gradients).
pub const MASKED: f64 = -1e9;

#[derive(Debug, Clone)]
pub struct Compressor {
    pub kv_proj: Linear,
    pub gate_proj: Linear,
    /// (m, d) or (m, 2d) with overlap
    pub position_bias: Tensor,
    pub kv_norm: RmsNorm,
    rate: usize,
    dim: usize,
    overlap: bool,
}

impl Compressor {
    /// A compressor of `rate` tokens into entries of `dim`, overlapping windows (CSA)
    /// when `overlap`.
    pub fn new(vb: &Vb, cfg: &ModelConfig, rate: usize, dim: usize, overlap: bool) -> Result<Self> {
        let width = if overlap { 2 * dim } else { dim };
        let (c, std) = (cfg.hidden_size, cfg.initializer_range);
        Ok(Self {
            kv_proj: Linear::new(&vb.pp("kv_proj"), c, width, std)?,
            gate_proj: Linear::new(&vb.pp("gate_proj"), c, width, std)?,
            position_bias: vb.get(&[rate, width], "position_bias", Init::Zeros)?,
            kv_norm: RmsNorm::new(&vb.pp("kv_norm"), dim, cfg.rms_norm_eps)?,
            rate,
            dim,
            overlap,
        })
    }

    /// Source tokens per entry.
    pub fn rate(&self) -> usize {
        self.rate
    }

    /// Values per entry.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Whether windows overlap (CSA's two series per token).
    pub fn overlaps(&self) -> bool {
        self.overlap
    }

    /// The entries of a whole window x (B, T, C) from position 0: (B, T / m, d), RoPE'd
    /// by `rope`; None when T < m.
    pub fn pool(&self, x: &Tensor, rope: &TailRope) -> Result<Option<Tensor>> {
        let (b, t, _c) = x.dims3()?;
        let (m, d) = (self.rate, self.dim);
        let n = t / m;
        if n == 0 {
            return Ok(None);
        }
        let xs = x.narrow(1, 0, n * m)?;
        let width = if self.overlap { 2 * d } else { d };
        let kv = self.kv_proj.forward(&xs)?.reshape((b, n, m, width))?;
        let gate = self
            .gate_proj
            .forward(&xs)?
            .reshape((b, n, m, width))?
            .broadcast_add(&self.position_bias)?;
        let (kv, gate) = if self.overlap {
            // Slots 0..m: the previous window's Ca (none before window 0); m..2m: Cb.
            let (ca, cb) = (kv.narrow(3, 0, d)?, kv.narrow(3, d, d)?);
            let (ga, gb) = (gate.narrow(3, 0, d)?, gate.narrow(3, d, d)?);
            let first_kv = Tensor::zeros((b, 1, m, d), kv.dtype(), kv.device())?;
            let first_gate = (Tensor::ones((b, 1, m, d), gate.dtype(), gate.device())? * MASKED)?;
            let prev_kv = Tensor::cat(&[first_kv, ca.narrow(1, 0, n - 1)?], 1)?;
            let prev_gate = Tensor::cat(&[first_gate, ga.narrow(1, 0, n - 1)?], 1)?;
            (
                Tensor::cat(&[prev_kv, cb], 2)?,
                Tensor::cat(&[prev_gate, gb], 2)?,
            ) // (B, n, 2m, d)
        } else {
            (kv, gate)
        };
        let weights = candle_nn::ops::softmax(&gate, 2)?;
        let pooled = (kv * weights)?.sum(2)?; // (B, n, d)
        let pooled = self.kv_norm.forward(&pooled)?;
        let positions: Vec<usize> = (0..n).map(|w| w * m).collect();
        Ok(Some(rope.apply(&pooled, &positions, false)?))
    }
}

/// Entries visible to query t of a whole window: `(t + 1) / m`.
pub fn visible_entries(t: usize, rate: usize) -> usize {
    (t + 1) / rate
}

/// The additive mask (B, T, n) of HCA: entry w visible to query t when complete.
pub fn causal_entry_mask(b: usize, t: usize, n: usize, rate: usize, x: &Tensor) -> Result<Tensor> {
    let mut m = vec![0f32; t * n];
    for q in 0..t {
        for w in visible_entries(q, rate).min(n)..n {
            m[q * n + w] = MASKED as f32;
        }
    }
    let m = Tensor::from_vec(m, (1, t, n), x.device())?.to_dtype(x.dtype())?;
    Ok(m.broadcast_as((b, t, n))?.contiguous()?)
}

#[derive(Debug, Clone)]
pub struct V4Indexer {
    pub compressor: Compressor,
    /// (H_I * d_I, q_lora_rank)
    pub q_b_proj: Linear,
    /// `scorer.weights_proj`: (H_I, C)
    pub weights_proj: Linear,
    n_heads: usize,
    head_dim: usize,
    topk: usize,
}

impl V4Indexer {
    pub fn new(vb: &Vb, cfg: &ModelConfig, rate: usize) -> Result<Self> {
        let (hi, di) = (cfg.index_n_heads, cfg.index_head_dim);
        let rank = cfg.q_lora_rank.unwrap_or(0);
        let std = cfg.initializer_range;
        Ok(Self {
            compressor: Compressor::new(vb, cfg, rate, di, true)?,
            q_b_proj: Linear::new(&vb.pp("q_b_proj"), rank, hi * di, std)?,
            weights_proj: Linear::new(
                &vb.pp("scorer").pp("weights_proj"),
                cfg.hidden_size,
                hi,
                std,
            )?,
            n_heads: hi,
            head_dim: di,
            topk: cfg.index_topk,
        })
    }

    /// Entries each query keeps.
    pub fn topk(&self) -> usize {
        self.topk
    }

    /// Index scores of a whole window: x (B, T, C), the query latent q_res (B, T, R)
    /// -> (B, T, n) over the n = T / m entries (future entries included; the selection
    /// skips them), or None when there is no entry yet.
    pub fn scores(&self, x: &Tensor, q_res: &Tensor, rope: &TailRope) -> Result<Option<Tensor>> {
        let (b, t, _c) = x.dims3()?;
        let Some(keys) = self.compressor.pool(x, rope)? else {
            return Ok(None);
        }; // (B, n, dI)
        let (hi, di) = (self.n_heads, self.head_dim);
        let positions: Vec<usize> = (0..t).collect();
        let q = self
            .q_b_proj
            .forward(q_res)?
            .reshape((b, t, hi, di))?
            .transpose(1, 2)?
            .contiguous()?; // (B, HI, T, dI)
        let q = rope.apply(&q, &positions, false)?;
        let dots = q.broadcast_matmul(&keys.unsqueeze(1)?.transpose(2, 3)?)?; // (B, HI, T, n)
        let relu = (dots.relu()? / (di as f64).sqrt())?;
        let w = (self.weights_proj.forward(x)? / (hi as f64).sqrt())?; // (B, T, HI)
        let w = w.transpose(1, 2)?.unsqueeze(3)?; // (B, HI, T, 1)
        Ok(Some(relu.broadcast_mul(&w)?.sum(1)?)) // (B, T, n)
    }

    /// The additive selection mask (B, T, n) of a whole window: 0 on each query's top
    /// `index_topk` visible entries, MASKED elsewhere.
    pub fn selection_mask(&self, scores: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, t, n) = scores.dims3()?;
        let host = host_f32(scores)?;
        let mut m = vec![MASKED as f32; b * t * n];
        let rate = self.compressor.rate();
        for (row, (s, out)) in host.chunks_exact(n).zip(m.chunks_exact_mut(n)).enumerate() {
            let visible = visible_entries(row % t, rate).min(n);
            // The decode step's selection (`kernels::topk`: its tie-break too).
            let mut top = StreamTopK::new(self.topk);
            for (w, &score) in s[..visible].iter().enumerate() {
                top.push(score, w as u32);
            }
            let mut picked = vec![NONE; self.topk];
            top.finish_into(&mut picked);
            for w in picked.into_iter().filter(|&w| w != NONE) {
                out[w as usize] = 0.0;
            }
        }
        Ok(Tensor::from_vec(m, (b, t, n), x.device())?.to_dtype(x.dtype())?)
    }
}
