//! Expert-utilization telemetry (DESIGN.md §4): what a router did over a window of
//! tokens (`RoutingStats`, mergeable across batches) and the summary numbers the claims
//! are stated in (`Utilization`: MaxVio, CV, normalised entropy, drop rate, dead experts).

use serde::Serialize;

/// Counts of one MoE layer over a window of tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RoutingStats {
    /// Tokens routed.
    pub tokens: u64,
    /// Slots each expert was chosen for, before any capacity limit (E).
    pub demand: Vec<u64>,
    /// Slots each expert processed, after the capacity limit (E); equal to `demand`
    /// for routers without capacity.
    pub load: Vec<u64>,
}

impl RoutingStats {
    pub fn new(n_experts: usize) -> Self {
        Self {
            tokens: 0,
            demand: vec![0; n_experts],
            load: vec![0; n_experts],
        }
    }

    /// Add another window's counts (same number of experts).
    pub fn merge(&mut self, other: &RoutingStats) {
        if self.demand.is_empty() {
            *self = other.clone();
            return;
        }
        self.tokens += other.tokens;
        for (a, b) in self.demand.iter_mut().zip(&other.demand) {
            *a += b;
        }
        for (a, b) in self.load.iter_mut().zip(&other.load) {
            *a += b;
        }
    }

    /// Add one forward's per-layer counts (`ForwardOutput::routing`) to per-layer totals
    /// (None = a dense layer, or nothing seen yet).
    pub fn merge_layers(totals: &mut [Option<RoutingStats>], new: &[Option<RoutingStats>]) {
        for (acc, r) in totals.iter_mut().zip(new) {
            if let Some(r) = r {
                match acc {
                    Some(a) => a.merge(r),
                    None => *acc = Some(r.clone()),
                }
            }
        }
    }

    /// Slots dropped by the capacity limit.
    pub fn dropped(&self) -> u64 {
        self.demand.iter().sum::<u64>() - self.load.iter().sum::<u64>()
    }

    pub fn utilization(&self) -> Utilization {
        let e = self.load.len().max(1) as f64;
        let routed: u64 = self.demand.iter().sum();
        let (max_vio, cv, entropy) = spread(&self.load);
        let (demand_max_vio, _, _) = spread(&self.demand);
        Utilization {
            tokens: self.tokens,
            max_vio,
            cv,
            entropy: entropy / e.ln().max(f64::MIN_POSITIVE),
            drop_rate: if routed == 0 {
                0.0
            } else {
                self.dropped() as f64 / routed as f64
            },
            dead: self.load.iter().filter(|&&l| l == 0).count(),
            demand_max_vio,
            load: self.load.clone(),
        }
    }
}

/// (MaxVio, CV, entropy in nats) of a load vector; zeros when nothing was routed.
fn spread(load: &[u64]) -> (f64, f64, f64) {
    let total: u64 = load.iter().sum();
    if total == 0 || load.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let e = load.len() as f64;
    let mean = total as f64 / e;
    let max = *load.iter().max().unwrap_or(&0) as f64;
    let var = load.iter().map(|&l| (l as f64 - mean).powi(2)).sum::<f64>() / e;
    let entropy = load
        .iter()
        .filter(|&&l| l > 0)
        .map(|&l| {
            let p = l as f64 / total as f64;
            -p * p.ln()
        })
        .sum::<f64>();
    (max / mean - 1.0, var.sqrt() / mean, entropy)
}

/// How evenly one layer's experts were used over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Utilization {
    pub tokens: u64,
    /// `max_i load_i / mean_load - 1` over processed slots (0 = perfectly even).
    pub max_vio: f64,
    /// Coefficient of variation of the processed load, `std / mean`.
    pub cv: f64,
    /// Entropy of the load distribution over `ln E` (1 = perfectly even).
    pub entropy: f64,
    /// Share of routed slots dropped by the capacity limit.
    pub drop_rate: f64,
    /// Experts that processed no token.
    pub dead: usize,
    /// MaxVio of the router's choices before the capacity limit.
    pub demand_max_vio: f64,
    /// Processed slots per expert.
    pub load: Vec<u64>,
}
