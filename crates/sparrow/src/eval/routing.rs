//! Expert utilization of a trained model on any text (DESIGN.md §4): the router is
//! frozen and run over batches of evenly spaced windows, with the capacity limits of
//! training applied (so drop rates are those a training batch of that size would see),
//! and each MoE layer's counts are summarised as MaxVio, CV, normalised entropy, drop
//! rate and dead experts. Comparing in-distribution text with out-of-distribution text
//! (e.g. source code) shows how routing degrades under shift.

use crate::data::shards::eval_windows;
use crate::error::{Error, Result};
use crate::model::transformer::ForwardOptions;
use crate::model::utilization::{RoutingStats, Utilization};
use crate::model::Model;
use candle_core::Tensor;
use serde::Serialize;

/// Utilization of one MoE layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRouting {
    pub layer: usize,
    #[serde(flatten)]
    pub utilization: Utilization,
}

/// Route `windows` evenly spaced windows of `seq_len` tokens of `tokens`, `batch` windows
/// per forward, and summarise each MoE layer.
pub fn measure(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    windows: usize,
    batch: usize,
    progress: bool,
) -> Result<Vec<LayerRouting>> {
    if model.cfg.n_routed_experts == 0
        || model.cfg.first_k_dense_replace >= model.cfg.num_hidden_layers
    {
        return Err(Error::Invalid(
            "the model has no MoE layer: nothing to measure".into(),
        ));
    }
    if seq_len == 0 || windows == 0 || batch == 0 {
        return Err(Error::Invalid(
            "`seq_len`, `windows` and `batch_size` must be >= 1".into(),
        ));
    }
    if seq_len > model.cfg.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "`seq_len` {seq_len} exceeds the model's max_position_embeddings {}",
            model.cfg.max_position_embeddings
        )));
    }
    let wins = eval_windows(tokens, windows, seq_len)?;
    let opts = ForwardOptions {
        moe_capacity: true,
        ..Default::default()
    };
    let mut per_layer: Vec<Option<RoutingStats>> = vec![None; model.cfg.num_hidden_layers];
    let bar = crate::progress::bar(wins.len() as u64, "routing", progress);
    for chunk in wins.chunks(batch) {
        let ids: Vec<u32> = chunk.iter().flat_map(|(i, _)| i.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (chunk.len(), seq_len), model.store.device())?;
        let out = model.net.forward_with(&ids, &opts)?;
        RoutingStats::merge_layers(&mut per_layer, &out.diagnostics.routing());
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(per_layer
        .into_iter()
        .enumerate()
        .filter_map(|(layer, s)| {
            s.map(|s| LayerRouting {
                layer,
                utilization: s.utilization(),
            })
        })
        .collect())
}
