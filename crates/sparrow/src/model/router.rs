//! MoE routers: map each token's hidden state to k experts and their mixing weights.
//! `RouterKind` (config) selects the variant; every variant returns the same `Routing`
//! so the expert execution in `moe.rs` does not care which one chose.
//!
//! Notation: x (N, C) tokens, logits `l = x Wg^T` (N, E), k experts per token.
//! - `topk_softmax` (Mixtral): `p = softmax(l)`, experts = top-k of p, weights =
//!   `p[experts]` (renormalised to sum 1 when `norm_topk_prob`). Aux loss (Switch):
//!   `E * sum_e f_e * P_e`, `f_e` = share of the N*k slots chosen for e, `P_e = mean_t p(t,e)`.
//! - `switch_capacity`: as `topk_softmax`, then each expert keeps at most
//!   `C = ceil(capacity_factor * N * k / E)` slots; slots are placed by choice rank
//!   (every token's first choice, in token order, before any second choice); overflow is
//!   dropped (the token keeps its other slots and the residual stream).
//! - `capacity_aware`: as `topk_softmax`, with per-expert capacities from this batch's
//!   soft demand `D_e = sum_t p(t,e)`: `C_e = max(ceil(capacity_factor * k * D_e),
//!   ceil(capacity_floor * capacity_factor * N * k / E))`, so the batch budget
//!   `capacity_factor * N * k` follows where the router sends tokens. Aux loss: CV^2 of
//!   the utilization `u_e = f_e + P_e - stopgrad(P_e)` (the hard load's value, the soft
//!   demand's gradient): `CV^2 = var(u) / mean(u)^2`.
//! - `noaux_bias` (DeepSeek-V3): `s = sigmoid(l)`; selection on `s + b` (b: fp32
//!   `e_score_correction_bias`, no gradient); with `n_group` > 1 each group scores the sum
//!   of its top-2 biased scores, only the best `topk_group` groups stay eligible; weights
//!   = `s[experts]` (normalised when `norm_topk_prob`) times `routed_scaling_factor`. No
//!   aux loss: after each training step `b_e += gamma * sign(mean_load - load_e)`
//!   (`router_bias_update_rule = proportional`: `gamma * (mean_load - load_e) / mean_load`).
//! - `hash` (DeepSeek-V4's first layers): the k experts of token id `v` in layer `l` are a
//!   fixed pseudo-random table `table(v, l)` (k distinct experts, splitmix64 of v and l);
//!   weights = `softmax(l)[experts]`, renormalised when `norm_topk_prob`. No aux loss.
//!
//! - `hash_moe` layers (`mlp_layer_types`, DeepSeek-V4): the k experts of token id `v`
//!   are row `v` of the layer's fixed table `tid2eid` (a buffer, loaded with the
//!   checkpoint); weights = the scores of those experts, normalised when
//!   `norm_topk_prob`, times `routed_scaling_factor`. No aux loss, no bias.
//!
//! The score function is `scoring_func` (default: sigmoid for `noaux_bias`, softmax for
//! the others); DeepSeek-V4 scores with `sqrtsoftplus(l) = sqrt(log(1 + e^l))`.
//!
//! Every router may add the z-loss `mean_t logsumexp(l_t)^2` (`router_z_loss_coef`) and
//! DeepSeek-V3's complementary sequence-wise balance loss (`router_seq_aux_loss_coef`):
//! per sequence of T tokens `sum_e f_e P_e`, `f_e = E / (k T) * (slots chosen for e)`,
//! `P_e = mean_t s'(t,e)` with `s' = s / sum_e s` (the scores normalised per token),
//! averaged over the sequences of the batch (1 when every sequence is balanced).
//! Ties in a selection go to the lower expert index; NaN sorts last.

use super::linear::Linear;
use super::params::{Init, Vb};
use super::utilization::RoutingStats;
use crate::config::{BiasUpdateRule, MlpKind, ModelConfig, RouterKind, ScoringFunc};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor, Var, D};

/// `Routing::expert_ids` entry of a slot dropped by the capacity limit.
pub use crate::kernels::experts::{hash_experts, DROPPED};

/// The router's decision for N tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Chosen expert per (token, slot), row-major (N * k); `DROPPED` when the capacity
    /// limit dropped the slot.
    pub expert_ids: Vec<u32>,
    /// (N, k) mixing weights, differentiable w.r.t. the router and the input.
    pub weights: Tensor,
    /// Scalar load-balancing loss (unscaled), for the routers that have one.
    pub aux_loss: Option<Tensor>,
    /// Scalar router z-loss (unscaled), when `router_z_loss_coef` > 0.
    pub z_loss: Option<Tensor>,
    /// Scalar sequence-wise balance loss (unscaled), when `router_seq_aux_loss_coef` > 0.
    pub seq_loss: Option<Tensor>,
    /// Counts of this call (demand before, load after the capacity limit).
    pub stats: RoutingStats,
}

/// `mlp.gate` in checkpoints: a linear map from the hidden state to one logit per expert,
/// plus `e_score_correction_bias` (E, fp32 buffer) for `noaux_bias`.
#[derive(Debug, Clone)]
pub struct Router {
    pub gate: Linear,
    pub e_score_correction_bias: Option<Tensor>,
    /// `hash_moe` layers: `tid2eid` (V, k) as stored, and its rows on the host.
    pub tid2eid: Option<(Tensor, Vec<u32>)>,
    kind: RouterKind,
    scoring: ScoringFunc,
    layer: usize,
    pub(crate) n_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    z_loss: bool,
    seq_loss: bool,
    capacity_factor: f64,
    capacity_floor: f64,
    n_group: usize,
    topk_group: usize,
    routed_scaling_factor: f64,
    bias_update_speed: f64,
    bias_update_rule: BiasUpdateRule,
}

impl Router {
    pub fn new(vb: &Vb, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let e = cfg.n_routed_experts;
        let k = cfg.num_experts_per_tok;
        let table = cfg.mlp_kind(layer) == MlpKind::HashMoe;
        let e_score_correction_bias = match cfg.router_kind {
            RouterKind::NoauxBias if !table => {
                Some(vb.buffer(&[e], "e_score_correction_bias", Init::Zeros)?)
            }
            _ => None,
        };
        let tid2eid = if table {
            let t = vb.buffer(
                &[cfg.vocab_size, k],
                "tid2eid",
                Init::ExpertTable {
                    layer,
                    n_experts: e,
                },
            )?;
            let rows = expert_table_rows(&t, e)
                .map_err(|m| Error::Invalid(format!("layer {layer} `mlp.gate.tid2eid`: {m}")))?;
            Some((t, rows))
        } else {
            None
        };
        Ok(Self {
            gate: Linear::new(vb, cfg.hidden_size, e, cfg.initializer_range)?,
            e_score_correction_bias,
            tid2eid,
            kind: cfg.router_kind,
            scoring: cfg.router_scoring(),
            layer,
            n_experts: e,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            z_loss: cfg.router_z_loss_coef > 0.0,
            seq_loss: cfg.router_seq_aux_loss_coef > 0.0,
            capacity_factor: cfg.capacity_factor,
            capacity_floor: cfg.capacity_floor,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            routed_scaling_factor: cfg.routed_scaling_factor,
            bias_update_speed: cfg.router_bias_update_speed,
            bias_update_rule: cfg.router_bias_update_rule,
        })
    }

    /// Route x (N, C), one sequence. `token_ids` (N) feed the `hash` router; `capacity`
    /// applies the capacity limit of `switch_capacity` / `capacity_aware` (training and
    /// validation).
    pub fn route(&self, x: &Tensor, token_ids: &[u32], capacity: bool) -> Result<Routing> {
        self.route_impl(x, token_ids, capacity, true, 1)
    }

    /// `route` of x (N, C) holding `sequences` sequences of N / `sequences` tokens each
    /// (row-major), which the sequence-wise balance loss treats one by one.
    pub fn route_sequences(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        capacity: bool,
        sequences: usize,
    ) -> Result<Routing> {
        self.route_impl(x, token_ids, capacity, true, sequences)
    }

    /// `route` for inference when `telemetry` is false: no auxiliary or z-loss and no
    /// routing statistics (all zero), only the experts and their weights.
    pub fn route_with(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        capacity: bool,
        telemetry: bool,
    ) -> Result<Routing> {
        self.route_impl(x, token_ids, capacity, telemetry, 1)
    }

    fn route_impl(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        capacity: bool,
        telemetry: bool,
        sequences: usize,
    ) -> Result<Routing> {
        let (n, _c) = x.dims2()?;
        if sequences == 0 || !n.is_multiple_of(sequences) {
            return Err(Error::Invalid(format!(
                "router got {n} tokens as {sequences} equal sequences"
            )));
        }
        let (e, k) = (self.n_experts, self.top_k);
        let logits = if telemetry {
            self.gate.forward(x)?
        } else {
            self.gate.infer(x)? // inference: batch-invariant rows
        }; // (N, E)
        let z_loss = if self.z_loss && telemetry {
            Some(z_loss(&logits)?)
        } else {
            None
        };
        let scores = score(&logits, self.scoring)?; // (N, E)
        let s_host: Vec<f32> = scores.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let chosen: Vec<u32> = match (&self.tid2eid, self.kind) {
            (Some((_, table)), _) => {
                if token_ids.len() != n {
                    return Err(Error::Invalid(format!(
                        "hash_moe router got {} token ids for {n} tokens",
                        token_ids.len()
                    )));
                }
                let mut out = Vec::with_capacity(n * k);
                for &v in token_ids {
                    let row = table
                        .get(v as usize * k..(v as usize + 1) * k)
                        .ok_or_else(|| {
                            Error::Invalid(format!("token id {v} is outside the tid2eid table"))
                        })?;
                    out.extend_from_slice(row);
                }
                out
            }
            (None, kind) => match kind {
                RouterKind::TopkSoftmax
                | RouterKind::SwitchCapacity
                | RouterKind::CapacityAware => s_host
                    .chunks_exact(e)
                    .flat_map(|row| top_k_indices(row, k))
                    .collect(),
                RouterKind::NoauxBias => {
                    let bias = self.bias_host()?;
                    s_host
                        .chunks_exact(e)
                        .flat_map(|row| {
                            let biased: Vec<f32> =
                                row.iter().zip(&bias).map(|(s, b)| s + b).collect();
                            group_limited_top_k(&biased, self.n_group, self.topk_group, k)
                        })
                        .collect()
                }
                RouterKind::Hash => {
                    if token_ids.len() != n {
                        return Err(Error::Invalid(format!(
                            "hash router got {} token ids for {n} tokens",
                            token_ids.len()
                        )));
                    }
                    token_ids
                        .iter()
                        .flat_map(|&v| hash_experts(v, self.layer, e, k))
                        .collect()
                }
            },
        };
        let mut stats = RoutingStats::new(e);
        if telemetry {
            stats.tokens = n as u64;
            for &id in &chosen {
                stats.demand[id as usize] += 1;
            }
        }
        let expert_ids = match self.kind {
            RouterKind::SwitchCapacity if capacity => {
                let c = (self.capacity_factor * (n * k) as f64 / e as f64).ceil() as usize;
                apply_capacity(&chosen, k, &vec![c; e])
            }
            RouterKind::CapacityAware if capacity => {
                let caps =
                    demand_capacities(&s_host, e, k, self.capacity_factor, self.capacity_floor);
                apply_capacity(&chosen, k, &caps)
            }
            _ => chosen.clone(),
        };
        if telemetry {
            for &id in expert_ids.iter().filter(|&&id| id != DROPPED) {
                stats.load[id as usize] += 1;
            }
        }

        let idx = Tensor::from_slice(&chosen, (n, k), x.device())?;
        let mut weights = scores.gather(&idx, 1)?; // (N, k)
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let scaled = self.kind == RouterKind::NoauxBias || self.tid2eid.is_some();
        if scaled && self.routed_scaling_factor != 1.0 {
            weights = (weights * self.routed_scaling_factor)?;
        }
        let seq_loss = if self.seq_loss && telemetry {
            Some(self.sequence_loss(&scores, &chosen, sequences)?)
        } else {
            None
        };
        let aux_loss = match self.kind {
            _ if !telemetry || self.tid2eid.is_some() => None,
            RouterKind::TopkSoftmax | RouterKind::SwitchCapacity => {
                Some(self.switch_loss(&scores, &stats.demand)?)
            }
            RouterKind::CapacityAware => Some(self.cv2_loss(&scores, &stats.demand)?),
            RouterKind::NoauxBias | RouterKind::Hash => None,
        };
        Ok(Routing {
            expert_ids,
            weights,
            aux_loss,
            z_loss,
            seq_loss,
            stats,
        })
    }

    /// DeepSeek-V3's sequence-wise balance loss of scores (N, E) and the chosen experts
    /// (N * k) of `sequences` equal sequences: mean over sequences of `sum_e f_e P_e`.
    fn sequence_loss(&self, scores: &Tensor, chosen: &[u32], sequences: usize) -> Result<Tensor> {
        let (e, k) = (self.n_experts, self.top_k);
        let (n, _) = scores.dims2()?;
        let t = n / sequences;
        let mut f = vec![0f64; sequences * e]; // (B, E)
        let unit = e as f64 / (k * t) as f64;
        for (slot, &id) in chosen.iter().enumerate() {
            f[(slot / k) / t * e + id as usize] += unit;
        }
        let f = Tensor::from_vec(f, (sequences, e), scores.device())?.to_dtype(scores.dtype())?;
        let normalised = scores.broadcast_div(&scores.sum_keepdim(D::Minus1)?)?; // (N, E)
        let p = normalised.reshape((sequences, t, e))?.mean(1)?; // (B, E)
        Ok(((p * f)?.sum_all()? / sequences as f64)?)
    }

    /// Share of the N*k slots chosen for each expert, as a constant (E) tensor.
    fn slot_shares(&self, probs: &Tensor, demand: &[u64]) -> Result<Tensor> {
        let total = demand.iter().sum::<u64>().max(1) as f64;
        let f: Vec<f64> = demand.iter().map(|&d| d as f64 / total).collect();
        Ok(Tensor::from_vec(f, self.n_experts, probs.device())?.to_dtype(probs.dtype())?)
    }

    /// Switch: `E * sum_e f_e * P_e`.
    fn switch_loss(&self, probs: &Tensor, demand: &[u64]) -> Result<Tensor> {
        let f = self.slot_shares(probs, demand)?;
        let mean_p = probs.mean(0)?; // (E)
        Ok(((mean_p * f)?.sum_all()? * self.n_experts as f64)?)
    }

    /// CV^2 of `u = f + P - stopgrad(P)`.
    fn cv2_loss(&self, probs: &Tensor, demand: &[u64]) -> Result<Tensor> {
        let f = self.slot_shares(probs, demand)?;
        let mean_p = probs.mean(0)?; // (E)
        let u = (f + (&mean_p - mean_p.detach())?)?;
        let mu = u.mean_all()?;
        let var = u.broadcast_sub(&mu)?.sqr()?.mean_all()?;
        Ok((var / mu.sqr()?)?)
    }

    fn bias_host(&self) -> Result<Vec<f32>> {
        match &self.e_score_correction_bias {
            Some(b) => Ok(b.to_dtype(DType::F32)?.to_vec1()?),
            None => Ok(vec![0.0; self.n_experts]),
        }
    }

    /// `noaux_bias`: after a training step whose routed slots per expert were `demand`,
    /// move each bias by `scale * gamma * sign(mean - demand_e)` (`proportional`:
    /// `scale * gamma * (mean - demand_e) / mean`). Other routers: nothing.
    pub fn update_bias(&self, demand: &[u64], scale: f64) -> Result<()> {
        let Some(b) = &self.e_score_correction_bias else {
            return Ok(());
        };
        if demand.len() != self.n_experts {
            return Err(Error::Invalid(format!(
                "bias update got {} loads for {} experts",
                demand.len(),
                self.n_experts
            )));
        }
        let mean = demand.iter().sum::<u64>() as f64 / self.n_experts as f64;
        let gamma = (self.bias_update_speed * scale) as f32;
        let new: Vec<f32> = self
            .bias_host()?
            .iter()
            .zip(demand)
            .map(|(&bi, &d)| {
                let diff = mean - d as f64;
                let step = match self.bias_update_rule {
                    BiasUpdateRule::Sign if diff > 0.0 => 1.0,
                    BiasUpdateRule::Sign if diff < 0.0 => -1.0,
                    BiasUpdateRule::Sign => 0.0,
                    BiasUpdateRule::Proportional if mean > 0.0 => (diff / mean) as f32,
                    BiasUpdateRule::Proportional => 0.0,
                };
                bi + gamma * step
            })
            .collect();
        let new = Tensor::from_vec(new, self.n_experts, b.device())?.to_dtype(b.dtype())?;
        Var::from_tensor(b)?.set(&new)?;
        Ok(())
    }
}

/// Router scores of logits l (N, E) under `f`, from differentiable ops.
fn score(logits: &Tensor, f: ScoringFunc) -> Result<Tensor> {
    Ok(match f {
        ScoringFunc::Softmax => candle_nn::ops::softmax(logits, D::Minus1)?,
        ScoringFunc::Sigmoid => candle_nn::ops::sigmoid(logits)?,
        // softplus(l) = max(l, 0) + log(1 + e^-|l|), stable for large |l|.
        ScoringFunc::Sqrtsoftplus => {
            let tail = ((logits.abs()?.neg()?.exp()? + 1.0)?).log()?;
            (logits.relu()? + tail)?.sqrt()?
        }
    })
}

/// The rows of an expert table t (V, k) as ids; each must be an integer in 0..E.
fn expert_table_rows(t: &Tensor, n_experts: usize) -> std::result::Result<Vec<u32>, String> {
    let values: Vec<f32> = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .map_err(|e| e.to_string())?;
    values
        .iter()
        .map(|&x| {
            if x.fract() == 0.0 && x >= 0.0 && (x as usize) < n_experts {
                Ok(x as u32)
            } else {
                Err(format!("{x} is not an expert id in 0..{n_experts}"))
            }
        })
        .collect()
}

/// `mean_t logsumexp(l_t)^2`, l (N, E).
fn z_loss(logits: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let lse = (logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + m)?;
    Ok(lse.sqr()?.mean_all()?)
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

/// DeepSeek-V3 group-limited top-k: experts form `n_group` equal groups; a group's score
/// is the sum of its best two scores (its best one when groups have one expert); only
/// the best `topk_group` groups stay eligible, then the top k of those experts.
pub fn group_limited_top_k(row: &[f32], n_group: usize, topk_group: usize, k: usize) -> Vec<u32> {
    if n_group <= 1 {
        return top_k_indices(row, k);
    }
    let per = row.len() / n_group;
    let group_scores: Vec<f32> = row
        .chunks_exact(per)
        .map(|g| {
            top_k_indices(g, 2.min(per))
                .iter()
                .map(|&i| g[i as usize])
                .sum()
        })
        .collect();
    let keep = top_k_indices(&group_scores, topk_group);
    let masked: Vec<f32> = row
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if keep.contains(&((i / per) as u32)) {
                s
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    top_k_indices(&masked, k)
}

/// Keep at most `caps[e]` slots per expert from `chosen` (N * k, row-major), placing
/// slots by choice rank (every token's first choice in token order, then the second
/// choices, ...). Returns the ids with overflow slots set to `DROPPED`.
pub fn apply_capacity(chosen: &[u32], k: usize, caps: &[usize]) -> Vec<u32> {
    let mut used = vec![0usize; caps.len()];
    let mut out = chosen.to_vec();
    let n = chosen.len() / k.max(1);
    for rank in 0..k {
        for t in 0..n {
            let slot = t * k + rank;
            let e = chosen[slot] as usize;
            if used[e] < caps[e] {
                used[e] += 1;
            } else {
                out[slot] = DROPPED;
            }
        }
    }
    out
}

/// `capacity_aware` capacities from the batch's router probabilities p (N * E,
/// row-major): `max(ceil(factor * k * D_e), ceil(floor * factor * N * k / E))`,
/// `D_e = sum_t p(t,e)`.
pub fn demand_capacities(probs: &[f32], e: usize, k: usize, factor: f64, floor: f64) -> Vec<usize> {
    let n = probs.len() / e;
    let mut demand = vec![0f64; e];
    for row in probs.chunks_exact(e) {
        for (d, &p) in demand.iter_mut().zip(row) {
            *d += p as f64;
        }
    }
    let min_cap = (floor * factor * (n * k) as f64 / e as f64).ceil() as usize;
    demand
        .iter()
        .map(|&d| ((factor * k as f64 * d).ceil() as usize).max(min_cap))
        .collect()
}
