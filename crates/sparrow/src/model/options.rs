//! Per-call switches of the tensor forward (training, evaluation, parity): how the
//! indexer trains, which selectors run, and what the diagnostics collector gathers.

pub use super::diagnostics::Collect;
use crate::config::IndexerTrainMode;

/// Per-call switches of a forward pass (training modes, diagnostics).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Training: how the indexer learns this step. None = inference (sparse, no loss).
    pub indexer_mode: Option<IndexerTrainMode>,
    /// Apply the routers' capacity limits (`switch_capacity`, `capacity_aware`): on in
    /// training and validation forwards, off in inference (a decode step never drops).
    pub moe_capacity: bool,
    /// Every selector set to all causal positions (DSA layers attend densely): the
    /// dense twin of the same weights.
    pub dense: bool,
    /// What the forward's diagnostics collector gathers (`ForwardOutput::diagnostics`).
    pub collect: Collect,
    /// `dense_warmup`: compute the indexer KL on this many query positions of the
    /// window, drawn without replacement from this seed (the same in every layer), not
    /// on all of them: the dense attention then runs without keeping its (T, S)
    /// probabilities, and the target rows are computed for the drawn queries only.
    /// None = every query.
    pub kl_query_sample: Option<(usize, u64)>,
}
