//! Mixture-of-experts FFN: a router picks k of E SwiGLU experts per token; optional
//! shared experts run on every token (DeepSeek).
//!
//! Execution (DESIGN.md §4): bucket (token, slot) pairs by expert, run one GEMM chain
//! per expert over its gathered rows, scale by the routing weight and add back per token
//! (`kernels::experts`: one gather into expert order, one weighted combine).
//! Expert weights are never copied per token. `forward_reference` is the plain
//! per-token loop the bucketed path is tested against.

use super::mlp::Mlp;
use super::params::Vb;
use super::router::{Router, Routing, DROPPED};
use super::utilization::RoutingStats;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::experts::{CombineSlots, Dispatch, GatherRows};
use candle_core::Tensor;
use std::sync::Arc;

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
    /// The router's load-balancing loss (unscaled), if it has one.
    pub aux_loss: Option<Tensor>,
    /// The router z-loss (unscaled), when configured.
    pub z_loss: Option<Tensor>,
    /// The sequence-wise balance loss (unscaled), when configured.
    pub seq_loss: Option<Tensor>,
    pub routing: RoutingStats,
}

impl Moe {
    pub fn new(vb: &Vb, cfg: &ModelConfig, layer: usize, out_std: f64) -> Result<Self> {
        let (c, w, std) = (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.initializer_range,
        );
        let experts =
            (0..cfg.n_routed_experts)
                .map(|e| {
                    Ok(Mlp::new(&vb.pp("experts").pp(e), c, w, std, out_std)?
                        .clamped(cfg.swiglu_limit))
                })
                .collect::<Result<Vec<_>>>()?;
        let shared_experts = if cfg.n_shared_experts > 0 {
            Some(
                Mlp::new(
                    &vb.pp("shared_experts"),
                    c,
                    w * cfg.n_shared_experts,
                    std,
                    out_std,
                )?
                .clamped(cfg.swiglu_limit),
            )
        } else {
            None
        };
        Ok(Self {
            gate: Router::new(&vb.pp("gate"), cfg, layer)?,
            experts,
            shared_experts,
            top_k: cfg.num_experts_per_tok,
        })
    }

    /// Experts each token runs.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// x (B, T, C) -> (B, T, C). `token_ids` (B*T) feed the `hash` router; `capacity`
    /// applies the router's capacity limit (training and validation).
    pub fn forward(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        capacity: bool,
    ) -> Result<(Tensor, MoeStats)> {
        self.forward_impl(x, token_ids, capacity, Self::routed)
    }

    /// Inference over packed rows x (N, C): routing without capacity or losses, then
    /// the same bucketed experts. -> ((N, C), the router's counts over the N tokens).
    pub fn infer(&self, xs: &Tensor, token_ids: &[u32]) -> Result<(Tensor, RoutingStats)> {
        let routing = self.gate.route_with(xs, token_ids, false, false)?;
        let mut y = self.routed_with(xs, &routing, Mlp::infer)?;
        if let Some(shared) = &self.shared_experts {
            y = (y + shared.infer(xs)?)?;
        }
        // No capacity here: every slot chosen is processed (demand = load).
        let mut stats = RoutingStats::new(self.gate.n_experts);
        stats.tokens = token_ids.len() as u64;
        for &id in routing.expert_ids.iter().filter(|&&id| id != DROPPED) {
            stats.demand[id as usize] += 1;
        }
        stats.load.clone_from(&stats.demand);
        Ok((y, stats))
    }

    /// The plain reference of `forward`: the same routing, then a loop over tokens and
    /// their slots, each expert applied to one row at a time.
    pub fn forward_reference(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        capacity: bool,
    ) -> Result<(Tensor, MoeStats)> {
        self.forward_impl(x, token_ids, capacity, Self::routed_reference)
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        capacity: bool,
        routed: fn(&Self, &Tensor, &Routing) -> Result<Tensor>,
    ) -> Result<(Tensor, MoeStats)> {
        let (b, t, c) = x.dims3()?;
        let xs = x.reshape((b * t, c))?; // (N, C)
        let routing = self.gate.route_sequences(&xs, token_ids, capacity, b)?;
        let mut y = routed(self, &xs, &routing)?;
        if let Some(shared) = &self.shared_experts {
            y = (y + shared.forward(&xs)?)?;
        }
        let stats = MoeStats {
            aux_loss: routing.aux_loss,
            z_loss: routing.z_loss,
            seq_loss: routing.seq_loss,
            routing: routing.stats,
        };
        Ok((y.reshape((b, t, c))?, stats))
    }

    /// Reference: for each token, sum over its kept slots of weight * expert(row).
    fn routed_reference(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (n, _c) = xs.dims2()?;
        let k = self.top_k;
        let mut rows = Vec::with_capacity(n);
        for t in 0..n {
            let xt = xs.narrow(0, t, 1)?; // (1, C)
            let mut yt = xt.zeros_like()?;
            for j in 0..k {
                let e = routing.expert_ids[t * k + j];
                if e == DROPPED {
                    continue;
                }
                let w = routing.weights.narrow(0, t, 1)?.narrow(1, j, 1)?; // (1, 1)
                let out = self.experts[e as usize].forward(&xt)?.broadcast_mul(&w)?;
                yt = (yt + out)?;
            }
            rows.push(yt);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Weighted sum of the chosen experts' outputs, (N, C): bucket the kept (token, slot)
    /// pairs by expert, one SwiGLU chain per expert over its gathered rows, weighted
    /// scatter-add back.
    fn routed(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        self.routed_with(xs, routing, Mlp::forward)
    }

    /// `routed` with each expert applied by `apply` (training or inference kernels).
    fn routed_with(
        &self,
        xs: &Tensor,
        routing: &Routing,
        apply: fn(&Mlp, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let plan = Arc::new(Dispatch::new(
            &routing.expert_ids,
            self.top_k,
            self.experts.len(),
        )?);
        if plan.rows() == 0 {
            return Ok(xs.zeros_like()?);
        }
        let xg = GatherRows(plan.clone()).apply(xs)?; // (M, C), grouped by expert
        let mut outs = Vec::with_capacity(self.experts.len());
        for (e, expert) in self.experts.iter().enumerate() {
            let (lo, hi) = (plan.offsets[e], plan.offsets[e + 1]);
            if hi > lo {
                outs.push(apply(expert, &xg.narrow(0, lo, hi - lo)?)?); // (n_e, C)
            }
        }
        let ys = Tensor::cat(&outs, 0)?; // (M, C)
        Ok(CombineSlots(plan).apply(&ys, &routing.weights)?)
    }
}
