//! Mixture-of-experts FFN: a router picks k of E SwiGLU experts per token; optional
//! shared experts run on every token (DeepSeek).
//!
//! Execution (DESIGN.md §4): bucket (token, slot) pairs by expert, run one GEMM chain
//! per expert over its gathered rows, scale by the routing weight and scatter-add back.
//! Expert weights are never copied per token.

use super::mlp::Mlp;
use super::params::Vb;
use super::router::{Router, Routing};
use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Moe {
    pub gate: Router,
    pub experts: Vec<Mlp>,
    pub shared_experts: Option<Mlp>,
    top_k: usize,
}

/// What an MoE layer reports besides its output.
#[derive(Debug, Clone)]
pub struct MoeStats {
    pub aux_loss: Tensor,
    pub load: Vec<usize>,
}

impl Moe {
    pub fn new(vb: &Vb, cfg: &ModelConfig, out_std: f64) -> Result<Self> {
        let (c, w, std) = (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.initializer_range,
        );
        let experts = (0..cfg.n_routed_experts)
            .map(|e| Mlp::new(&vb.pp("experts").pp(e), c, w, std, out_std))
            .collect::<Result<Vec<_>>>()?;
        let shared_experts = if cfg.n_shared_experts > 0 {
            Some(Mlp::new(
                &vb.pp("shared_experts"),
                c,
                w * cfg.n_shared_experts,
                std,
                out_std,
            )?)
        } else {
            None
        };
        Ok(Self {
            gate: Router::new(&vb.pp("gate"), cfg)?,
            experts,
            shared_experts,
            top_k: cfg.num_experts_per_tok,
        })
    }

    /// x (B, T, C) -> (B, T, C)
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, MoeStats)> {
        let (b, t, c) = x.dims3()?;
        let xs = x.reshape((b * t, c))?; // (N, C)
        let routing = self.gate.route(&xs)?;
        let mut y = self.routed(&xs, &routing)?;
        if let Some(shared) = &self.shared_experts {
            y = (y + shared.forward(&xs)?)?;
        }
        let stats = MoeStats {
            aux_loss: routing.aux_loss,
            load: routing.load,
        };
        Ok((y.reshape((b, t, c))?, stats))
    }

    /// Weighted sum of the chosen experts' outputs, (N, C).
    fn routed(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let k = self.top_k;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        for (flat, &e) in routing.expert_ids.iter().enumerate() {
            tokens[e as usize].push((flat / k) as u32);
            slots[e as usize].push(flat as u32);
        }
        let flat_weights = routing.weights.flatten_all()?; // (N*k)
        let mut outs = Vec::new();
        let mut rows = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens[e].is_empty() {
                continue;
            }
            let n_e = tokens[e].len();
            let tok = Tensor::from_slice(&tokens[e], n_e, xs.device())?;
            let slot = Tensor::from_slice(&slots[e], n_e, xs.device())?;
            let xe = xs.index_select(&tok, 0)?; // (n_e, C)
            let we = flat_weights.index_select(&slot, 0)?.unsqueeze(1)?; // (n_e, 1)
            outs.push(expert.forward(&xe)?.broadcast_mul(&we)?);
            rows.extend_from_slice(&tokens[e]);
        }
        let zeros = xs.zeros_like()?;
        if outs.is_empty() {
            return Ok(zeros);
        }
        let ys = Tensor::cat(&outs, 0)?; // (N*k, C) in expert order
        let rows = Tensor::from_vec(rows, ys.dim(0)?, xs.device())?;
        Ok(zeros.index_add(&rows, &ys, 0)?)
    }
}
