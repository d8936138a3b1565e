//! Per-call switches of the tensor forward (training, evaluation, parity): how the
//! indexer trains and which diagnostics a call returns.

use crate::config::IndexerTrainMode;

/// Per-call switches of a forward pass (training modes, diagnostics).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Training: how the indexer learns this step. None = inference (sparse, no loss).
    pub indexer_mode: Option<IndexerTrainMode>,
    /// Compute the indexer KL loss (always in `dense_warmup` and `sparse`).
    pub indexer_kl: bool,
    /// Measure the indexer recall of the queries at t >= `recall_from` (`eval recall`).
    pub collect_recall: bool,
    pub recall_from: usize,
    /// Return each DSA layer's top-k selection (B*T*index_topk) in `ForwardOutput`.
    pub collect_selection: bool,
    /// Apply the routers' capacity limits (`switch_capacity`, `capacity_aware`): on in
    /// training and validation forwards, off in inference (a decode step never drops).
    pub moe_capacity: bool,
    /// Every selector set to all causal positions (DSA layers attend densely): the
    /// dense twin of the same weights.
    pub dense: bool,
}
