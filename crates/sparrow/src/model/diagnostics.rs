//! The one collector of a tensor forward's diagnostics: what each layer measured
//! besides its output (router statistics and losses, the indexer's KL loss, recall and
//! selection). The forward options say what to collect (`Collect`); layers write into
//! their `LayerDiagnostics` instead of returning it, and nothing is computed unless
//! asked for or trained. The engine's step (inference) collects nothing.

use super::utilization::RoutingStats;
use crate::error::Result;
use candle_core::Tensor;

/// What a forward collects besides what its training mode needs (the router losses
/// and statistics of MoE layers, the indexer KL of the KL-trained indexer modes, which
/// are always collected when training).
#[derive(Debug, Clone, Copy, Default)]
pub struct Collect {
    /// Measure the indexer KL in the straight-through mode too (where it is a
    /// diagnostic: the gate learns from the LM loss).
    pub indexer_kl: bool,
    /// Measure each DSA layer's recall of the dense attention mass for the queries at
    /// positions >= this one (`eval recall`).
    pub recall_from: Option<usize>,
    /// Keep each sparse DSA layer's top-k selection.
    pub selection: bool,
}

/// What one layer recorded during a forward.
#[derive(Debug, Clone, Default)]
pub struct LayerDiagnostics {
    /// The router's counts (MoE layers).
    pub routing: Option<RoutingStats>,
    /// The router's load-balancing loss (unscaled), for the routers that have one.
    pub aux_loss: Option<Tensor>,
    /// The router z-loss (unscaled), when configured.
    pub z_loss: Option<Tensor>,
    /// The router's sequence-wise balance loss (unscaled), when configured.
    pub seq_loss: Option<Tensor>,
    /// The indexer's KL loss, mean over queries (DSA layers in training).
    pub indexer_kl: Option<Tensor>,
    /// Recall per query (B*T), when asked for (DSA layers).
    pub recall: Option<Vec<f32>>,
    /// With `recall`: the best recall any `index_topk` positions could reach per query
    /// (the oracle top-k of the dense attention itself).
    pub best_recall: Option<Vec<f32>>,
    /// The top-k selection (B*T*index_topk, `kernels::topk::NONE` = empty slot), when
    /// asked for and the layer ran sparse.
    pub selection: Option<Vec<u32>>,
}

/// Every layer's record of one forward, in layer order.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    pub layers: Vec<LayerDiagnostics>,
}

impl Diagnostics {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![LayerDiagnostics::default(); n_layers],
        }
    }

    /// Sum over MoE layers of the router auxiliary losses, if any.
    pub fn aux_loss(&self) -> Result<Option<Tensor>> {
        sum(self.layers.iter().filter_map(|l| l.aux_loss.as_ref()))
    }

    /// Sum over MoE layers of the router z-losses, if configured.
    pub fn z_loss(&self) -> Result<Option<Tensor>> {
        sum(self.layers.iter().filter_map(|l| l.z_loss.as_ref()))
    }

    /// Sum over MoE layers of the sequence-wise balance losses, if configured.
    pub fn seq_loss(&self) -> Result<Option<Tensor>> {
        sum(self.layers.iter().filter_map(|l| l.seq_loss.as_ref()))
    }

    /// Mean over DSA layers of the indexer KL loss, if computed.
    pub fn indexer_kl(&self) -> Result<Option<Tensor>> {
        let kls: Vec<&Tensor> = self
            .layers
            .iter()
            .filter_map(|l| l.indexer_kl.as_ref())
            .collect();
        let n = kls.len() as f64;
        Ok(match sum(kls.into_iter())? {
            Some(total) => Some((total / n)?),
            None => None,
        })
    }

    /// Per layer: what the router did (None for dense layers).
    pub fn routing(&self) -> Vec<Option<RoutingStats>> {
        self.layers.iter().map(|l| l.routing.clone()).collect()
    }
}

fn sum<'a>(mut terms: impl Iterator<Item = &'a Tensor>) -> Result<Option<Tensor>> {
    let Some(first) = terms.next() else {
        return Ok(None);
    };
    let mut total = first.clone();
    for t in terms {
        total = (total + t)?;
    }
    Ok(Some(total))
}
