//! The DSA indexer (`self_attn.indexer.*`): a cheap scorer of every cached position for
//! each query, whose top-k decides where the main attention looks (DESIGN.md §4).
//!
//! Both kinds produce the same three tensors, consumed by the fused top-k kernel
//! (`kernels::indexer`) and by the differentiable scoring below:
//! q (B, T, Hi, di) index queries, w (B, T, Hi) head weights, k (B, T, di) index keys;
//! `I(t, s) = sum_j w(t, j) act(q(t, j) . k(s))`, act = ReLU (`lightning`) or identity
//! (`mlp_gate`, one head with w = di^-0.5).

use super::linear::{host_f32, Linear};
use super::params::{Init, Vb};
use super::rope::Rope;
use crate::config::{IndexerKind, ModelConfig};
use crate::error::Result;
use crate::kernels::indexer::{IndexShape, ScoreAct};
use crate::kernels::selected_scores::SelectedScores;
use candle_core::{Tensor, D};

/// LayerNorm with weight and bias, from plain ops (candle's fused one drops gradients).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(&[dim], "weight", Init::Ones)?,
            bias: vb.get(&[dim], "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        Ok(xc
            .broadcast_mul(&inv)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// DeepSeek-V3.2's lightning indexer.
#[derive(Debug, Clone)]
pub struct Lightning {
    /// (Hi * di, C), or on MLA layers `wq_b` (Hi * di, q_lora_rank): the index queries
    /// come from the attention's query latent (DeepSeek-V3.2).
    pub wq: Linear,
    /// (di, C)
    pub wk: Linear,
    pub k_norm: LayerNorm,
    /// (Hi, C)
    pub weights_proj: Linear,
    rope: Rope,
    heads: usize,
    dim: usize,
    rope_dim: usize,
}

/// The gate MLP indexer: fc1 -> SiLU -> (wq, wk).
#[derive(Debug, Clone)]
pub struct MlpGate {
    /// (W, C)
    pub fc1: Linear,
    /// (di, W)
    pub wq: Linear,
    /// (di, W)
    pub wk: Linear,
    dim: usize,
}

#[derive(Debug, Clone)]
pub enum Indexer {
    Lightning(Lightning),
    MlpGate(MlpGate),
}

/// What the indexer computes for T new tokens.
#[derive(Debug, Clone)]
pub struct IndexerOut {
    /// (B, T, Hi, di)
    pub q: Tensor,
    /// (B, T, Hi)
    pub w: Tensor,
    /// (B, T, di)
    pub k: Tensor,
}

/// An indexer's outputs for packed rows, on the host (see
/// `Indexer::infer_packed_with_query_input`).
#[derive(Debug, Clone)]
pub struct HostIndex {
    /// (N, Hi * di)
    pub q: Vec<f32>,
    /// (N, Hi)
    pub w: Vec<f32>,
    /// (N, di)
    pub k: Vec<f32>,
}

/// Apply RoPE to the first `rope_dim` dims of x (B, T, N, di) at positions offset...
fn rope_prefix(rope: &Rope, x: &Tensor, rope_dim: usize, offset: usize) -> Result<Tensor> {
    if rope_dim == 0 {
        return Ok(x.clone());
    }
    let di = x.dim(3)?;
    let rot = x.narrow(3, 0, rope_dim)?.transpose(1, 2)?.contiguous()?; // (B, N, T, r)
    let rot = rope.apply(&rot, offset)?.transpose(1, 2)?; // (B, T, N, r)
    if rope_dim == di {
        return Ok(rot.contiguous()?);
    }
    Ok(Tensor::cat(
        &[&rot, &x.narrow(3, rope_dim, di - rope_dim)?],
        3,
    )?)
}

impl Indexer {
    pub fn new(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let di = cfg.index_head_dim;
        let std = cfg.initializer_range;
        Ok(match cfg.indexer_kind {
            IndexerKind::Lightning => {
                let h = cfg.index_n_heads;
                let wq = match (cfg.kv_lora_rank, cfg.q_lora_rank) {
                    (Some(_), Some(rq)) => Linear::new(&vb.pp("wq_b"), rq, h * di, std)?,
                    (Some(_), None) => {
                        return Err(crate::error::Error::config(
                            "q_lora_rank",
                            "a DSA indexer on MLA reads the query latent: set q_lora_rank",
                        ))
                    }
                    _ => Linear::new(&vb.pp("wq"), c, h * di, std)?,
                };
                Indexer::Lightning(Lightning {
                    wq,
                    wk: Linear::new(&vb.pp("wk"), c, di, std)?,
                    k_norm: LayerNorm::new(&vb.pp("k_norm"), di, 1e-6)?,
                    weights_proj: Linear::new(&vb.pp("weights_proj"), c, h, std)?,
                    rope: Rope::new(
                        cfg.index_rope_head_dim.max(2),
                        cfg.max_position_embeddings,
                        cfg.rope_theta,
                        vb.dtype(),
                        vb.device(),
                    )?,
                    heads: h,
                    dim: di,
                    rope_dim: cfg.index_rope_head_dim,
                })
            }
            IndexerKind::MlpGate => {
                let w = cfg.index_gate_intermediate_size;
                Indexer::MlpGate(MlpGate {
                    fc1: Linear::new(&vb.pp("fc1"), c, w, std)?,
                    wq: Linear::new(&vb.pp("wq"), w, di, std)?,
                    wk: Linear::new(&vb.pp("wk"), w, di, std)?,
                    dim: di,
                })
            }
        })
    }

    /// Heads, dimension and activation, as the top-k kernel takes them.
    pub fn shape(&self) -> IndexShape {
        match self {
            Indexer::Lightning(l) => IndexShape {
                heads: l.heads,
                dim: l.dim,
                act: ScoreAct::Relu,
            },
            Indexer::MlpGate(g) => IndexShape {
                heads: 1,
                dim: g.dim,
                act: ScoreAct::Identity,
            },
        }
    }

    /// The indexer over packed rows x (N, C), on the host, before RoPE (the engine's
    /// step; `selector::TopkSelector::step_rows` rotates them): the lightning queries
    /// projected from `q_in` (N, *), x itself or the query latent on MLA layers.
    pub fn infer_packed_with_query_input(&self, x: &Tensor, q_in: &Tensor) -> Result<HostIndex> {
        Ok(match self {
            Indexer::Lightning(l) => {
                let scale = 1.0 / ((l.heads as f64).sqrt() * (l.dim as f64).sqrt());
                HostIndex {
                    q: host_f32(&l.wq.infer(q_in)?)?,
                    w: host_f32(&(l.weights_proj.infer(x)? * scale)?)?,
                    k: host_f32(&l.k_norm.forward(&l.wk.infer(x)?)?)?,
                }
            }
            Indexer::MlpGate(g) => {
                let hid = candle_nn::ops::silu(&g.fc1.infer(x)?)?;
                let n = x.dim(0)?;
                let w =
                    (Tensor::ones((n, 1), x.dtype(), x.device())? * (1.0 / (g.dim as f64).sqrt()))?;
                HostIndex {
                    q: host_f32(&g.wq.infer(&hid)?)?,
                    w: host_f32(&w)?,
                    k: host_f32(&g.wk.infer(&hid)?)?,
                }
            }
        })
    }

    /// RoPE of one token's index query (Hi * di) and key (di) as position `pos`.
    pub fn rope_token_host(&self, q: &mut [f32], k: &mut [f32], pos: usize) -> Result<()> {
        if let Indexer::Lightning(l) = self {
            if l.rope_dim > 0 {
                l.rope.rotate_prefix_host(q, l.dim, pos)?;
                l.rope.rotate_prefix_host(k, l.dim, pos)?;
            }
        }
        Ok(())
    }

    /// x (B, T, C) at positions offset.. -> index queries, weights and keys.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<IndexerOut> {
        self.forward_with_query_input(x, x, offset)
    }

    /// `forward` with the lightning queries projected from `q_in` (B, T, *) instead of
    /// x: the query latent on MLA layers (DeepSeek-V3.2's `wq_b(q_resid)`).
    pub fn forward_with_query_input(
        &self,
        x: &Tensor,
        q_in: &Tensor,
        offset: usize,
    ) -> Result<IndexerOut> {
        let (b, t, _c) = x.dims3()?;
        match self {
            Indexer::Lightning(l) => {
                let (h, di) = (l.heads, l.dim);
                let q = l.wq.forward(q_in)?.reshape((b, t, h, di))?;
                let q = rope_prefix(&l.rope, &q, l.rope_dim, offset)?;
                let k = l
                    .k_norm
                    .forward(&l.wk.forward(x)?)?
                    .reshape((b, t, 1, di))?;
                let k = rope_prefix(&l.rope, &k, l.rope_dim, offset)?.reshape((b, t, di))?;
                let scale = 1.0 / ((h as f64).sqrt() * (di as f64).sqrt());
                let w = (l.weights_proj.forward(x)? * scale)?;
                Ok(IndexerOut { q, w, k })
            }
            Indexer::MlpGate(g) => {
                let hid = candle_nn::ops::silu(&g.fc1.forward(x)?)?;
                let q = g.wq.forward(&hid)?.reshape((b, t, 1, g.dim))?;
                let k = g.wk.forward(&hid)?;
                let w = (Tensor::ones((b, t, 1), x.dtype(), x.device())?
                    * (1.0 / (g.dim as f64).sqrt()))?;
                Ok(IndexerOut { q, w, k })
            }
        }
    }

    fn activate(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Indexer::Lightning(_) => x.relu()?,
            Indexer::MlpGate(_) => x.clone(),
        })
    }

    /// Differentiable scores of the selected positions: (B, T, K), with `keys` (B, S, di)
    /// every visible index key and `idx` (B, T, K) the selection
    /// ([`NONE`](crate::kernels::topk::NONE) slots score 0; callers mask them). One fused
    /// op (`kernels::selected_scores`): the gathered keys never enter the autograd graph.
    pub fn score_selected(
        &self,
        out: &IndexerOut,
        keys: &Tensor,
        idx: &[u32],
        k: usize,
    ) -> Result<Tensor> {
        let op = SelectedScores {
            act: self.shape().act,
            idx: std::sync::Arc::new(idx.to_vec()),
            k,
        };
        Ok(op.apply(&out.q, &out.w, keys)?)
    }

    /// Differentiable scores of every key: (B, T, S) (training lengths only; the top-k
    /// kernel never builds this matrix).
    pub fn score_all(&self, out: &IndexerOut, keys: &Tensor) -> Result<Tensor> {
        let (b, t, h, di) = out.q.dims4()?;
        let s = keys.dim(1)?;
        let q = out.q.reshape((b, t * h, di))?;
        let dots = self.activate(&q.matmul(&keys.t()?)?)?; // (B, T*Hi, S)
        let dots = dots.reshape((b * t, h, s))?;
        let w = out.w.reshape((b * t, 1, h))?;
        Ok(w.matmul(&dots)?.reshape((b, t, s))?)
    }
}
