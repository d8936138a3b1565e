//! MoE routers: map each token's hidden state to k experts and their mixing weights.
//! `RouterKind` (config) selects the variant; every variant returns the same `Routing`
//! so the expert execution in `moe.rs` does not care which one chose.

use super::linear::Linear;
use super::params::Vb;
use crate::config::{ModelConfig, RouterKind};
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// The router's decision for N tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Chosen expert per (token, slot), row-major (N * k).
    pub expert_ids: Vec<u32>,
    /// (N, k) mixing weights, differentiable w.r.t. the router and the input.
    pub weights: Tensor,
    /// Scalar load-balancing loss (unscaled by the config coefficient).
    pub aux_loss: Tensor,
    /// Routed slots per expert (E).
    pub load: Vec<usize>,
}

/// `mlp.gate` in checkpoints: a linear map from the hidden state to one logit per expert.
#[derive(Debug, Clone)]
pub struct Router {
    pub gate: Linear,
    kind: RouterKind,
    n_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
}

impl Router {
    pub fn new(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            gate: Linear::new(
                vb,
                cfg.hidden_size,
                cfg.n_routed_experts,
                cfg.initializer_range,
            )?,
            kind: cfg.router_kind,
            n_experts: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// Route x (N, C).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        match self.kind {
            RouterKind::TopkSoftmax => self.route_topk_softmax(x),
        }
    }

    /// Mixtral: p = softmax(x Wg^T); experts = top-k of p (ties to the lower index);
    /// weights = p[experts], renormalised to sum 1 when `norm_topk_prob`.
    /// Switch aux loss: E * sum_e f_e * P_e, f_e = share of routed slots on e,
    /// P_e = mean router probability of e.
    fn route_topk_softmax(&self, x: &Tensor) -> Result<Routing> {
        let (n, _c) = x.dims2()?;
        let (e, k) = (self.n_experts, self.top_k);
        let logits = self.gate.forward(x)?; // (N, E)
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?; // (N, E)
        let p_host: Vec<f32> = probs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut expert_ids = Vec::with_capacity(n * k);
        let mut load = vec![0usize; e];
        for row in p_host.chunks_exact(e) {
            for id in top_k_indices(row, k) {
                load[id as usize] += 1;
                expert_ids.push(id);
            }
        }
        let idx = Tensor::from_slice(&expert_ids, (n, k), x.device())?;
        let mut weights = probs.gather(&idx, 1)?; // (N, k)
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let frac: Vec<f64> = load.iter().map(|&l| l as f64 / (n * k) as f64).collect();
        let frac = Tensor::from_vec(frac, e, x.device())?.to_dtype(probs.dtype())?;
        let mean_p = probs.mean(0)?; // (E)
        let aux_loss = ((mean_p * frac)?.sum_all()? * e as f64)?;
        Ok(Routing {
            expert_ids,
            weights,
            aux_loss,
            load,
        })
    }
}

/// Indices of the k largest values, largest first; equal values go to the lower index,
/// so routing is deterministic. NaN sorts last.
pub fn top_k_indices(row: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let key = |i: &u32| row[*i as usize];
    idx.sort_by(|a, b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or_else(|| key(a).is_nan().cmp(&key(b).is_nan()))
            .then(a.cmp(b))
    });
    idx.truncate(k);
    idx
}
