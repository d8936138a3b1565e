//! The mixture-of-experts part of the config: the router kinds and the checks and
//! derived values of the MoE fields (`n_routed_experts`, `num_experts_per_tok`,
//! `router_*`, `moe_layer_freq`, ...).

use super::ModelConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How an MoE layer's router picks experts for each token (DESIGN.md §4; the formulas
/// are in `model::router`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// Mixtral: softmax over experts, top-k, optionally renormalised
    /// (`norm_topk_prob`); Switch load-balancing auxiliary loss.
    TopkSoftmax,
    /// Switch Transformer: `topk_softmax` plus a per-expert capacity
    /// `ceil(capacity_factor * T * k / E)` per batch of T tokens; overflow slots are
    /// dropped (the residual passes through), first choices placed before second ones.
    SwitchCapacity,
    /// Capacity-aware routing: the batch's slot budget `capacity_factor * T * k` is
    /// shared among experts in proportion to their soft demand (never below
    /// `capacity_floor` of the uniform share), plus the CV^2 utilization loss.
    CapacityAware,
    /// DeepSeek-V3 auxiliary-loss-free routing: sigmoid scores, selection on score plus
    /// a per-expert bias (`e_score_correction_bias`, updated after each training step by
    /// `router_bias_update_speed`), optional group-limited routing (`n_group`,
    /// `topk_group`), weights from the unbiased scores times `routed_scaling_factor`.
    NoauxBias,
    /// Hash routing (DeepSeek-V4's first layers): the experts of a token come from a
    /// fixed token-id table; the learned gate only weighs them.
    Hash,
}

impl RouterKind {
    /// Every kind, in the order experiments report them.
    pub const ALL: [RouterKind; 5] = [
        RouterKind::TopkSoftmax,
        RouterKind::SwitchCapacity,
        RouterKind::CapacityAware,
        RouterKind::NoauxBias,
        RouterKind::Hash,
    ];

    /// The config spelling (`topk_softmax`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RouterKind::TopkSoftmax => "topk_softmax",
            RouterKind::SwitchCapacity => "switch_capacity",
            RouterKind::CapacityAware => "capacity_aware",
            RouterKind::NoauxBias => "noaux_bias",
            RouterKind::Hash => "hash",
        }
    }

    /// Whether this router drops slots beyond a per-expert capacity in training.
    pub fn has_capacity(self) -> bool {
        matches!(self, RouterKind::SwitchCapacity | RouterKind::CapacityAware)
    }
}

/// How a `noaux_bias` update moves each expert's selection bias
/// (`router_bias_update_rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasUpdateRule {
    /// DeepSeek-V3: `b_e += gamma * sign(mean_load - load_e)`.
    Sign,
    /// `b_e += gamma * (mean_load - load_e) / mean_load`.
    Proportional,
}

impl std::str::FromStr for RouterKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        RouterKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = RouterKind::ALL.iter().map(|k| k.name()).collect();
                Error::Invalid(format!(
                    "unknown router `{s}` (expected one of {})",
                    names.join(", ")
                ))
            })
    }
}

impl ModelConfig {
    pub(super) fn validate_router(&self) -> Result<()> {
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !non_negative(self.router_cv2_loss_coef) {
            return Err(Error::config("router_cv2_loss_coef", "must be >= 0"));
        }
        if !non_negative(self.router_seq_aux_loss_coef) {
            return Err(Error::config("router_seq_aux_loss_coef", "must be >= 0"));
        }
        if !non_negative(self.router_z_loss_coef) {
            return Err(Error::config("router_z_loss_coef", "must be >= 0"));
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return Err(Error::config("capacity_factor", "must be > 0"));
        }
        if !(self.capacity_floor.is_finite() && (0.0..=1.0).contains(&self.capacity_floor)) {
            return Err(Error::config("capacity_floor", "must be in [0, 1]"));
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(Error::config("routed_scaling_factor", "must be > 0"));
        }
        if !non_negative(self.router_bias_update_speed) {
            return Err(Error::config("router_bias_update_speed", "must be >= 0"));
        }
        if self.router_bias_update_every == 0 {
            return Err(Error::config("router_bias_update_every", "must be >= 1"));
        }
        if self.n_group == 0 {
            return Err(Error::config("n_group", "must be >= 1"));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(Error::config(
                "topk_group",
                format!("must be in 1..={} (n_group)", self.n_group),
            ));
        }
        let e = self.n_routed_experts;
        if e > 0 && self.n_group > 1 {
            if !e.is_multiple_of(self.n_group) {
                return Err(Error::config(
                    "n_group",
                    format!("{} does not divide n_routed_experts {e}", self.n_group),
                ));
            }
            let reachable = self.topk_group * (e / self.n_group);
            if self.num_experts_per_tok > reachable {
                return Err(Error::config(
                    "topk_group",
                    format!(
                        "{} groups of {} experts hold fewer than num_experts_per_tok {}",
                        self.topk_group,
                        e / self.n_group,
                        self.num_experts_per_tok
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The weight of this model's router balance loss: `router_cv2_loss_coef` for
    /// `capacity_aware`, `router_aux_loss_coef` otherwise (routers without one ignore it).
    pub fn balance_loss_coef(&self) -> f64 {
        match self.router_kind {
            RouterKind::CapacityAware => self.router_cv2_loss_coef,
            _ => self.router_aux_loss_coef,
        }
    }

    /// Whether layer `i` has an MoE FFN (otherwise dense SwiGLU).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0 && i >= self.first_k_dense_replace
    }
}
