//! Indexer recall (DESIGN.md §4): for a query, the share of the dense attention
//! probability mass (averaged over heads) that falls on the positions its indexer
//! selected. Measured per DSA layer over windows of held-out text of `context` tokens,
//! on the queries of the window's last quarter (so each sees between 3/4 and all of the
//! context); reported as the mean and the 5th percentile over those queries, beside
//! the best recall any selection of as many positions could reach (the dense
//! attention's own top-k).

use crate::data::corpus;
use crate::data::shards::{eval_windows, TokenData};
use crate::error::{Error, Result};
use crate::model::options::{Collect, ForwardOptions};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use candle_core::Tensor;
use serde::Serialize;
use std::path::Path;

/// Recall of one DSA layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRecall {
    pub layer: usize,
    pub context: usize,
    pub topk: usize,
    /// Queries measured.
    pub queries: usize,
    pub mean: f64,
    pub p5: f64,
    pub min: f64,
    /// The mean of the best recall any `topk` positions could reach (the oracle top-k
    /// of the dense attention itself): the bound the indexer's `mean` is measured
    /// against.
    pub best_mean: f64,
}

/// The held-out tail of every document of a corpus (the training runs' validation
/// split for the same `val_fraction`).
pub fn held_out_tokens(
    corpus_dir: &Path,
    tokenizer: &Tokenizer,
    val_fraction: f64,
    progress: bool,
) -> Result<Vec<u32>> {
    let files = corpus::list_text_files(corpus_dir)?;
    Ok(TokenData::build(&files, tokenizer, val_fraction, progress)?.val)
}

/// Recall per DSA layer over `windows` evenly spaced windows of `context` tokens.
pub fn measure(
    model: &Model,
    tokens: &[u32],
    context: usize,
    windows: usize,
    progress: bool,
) -> Result<Vec<LayerRecall>> {
    if !model.cfg.has_dsa() {
        return Err(Error::Invalid(
            "the model has no `dsa` layer: nothing to measure".into(),
        ));
    }
    if context < 4 {
        return Err(Error::Invalid(format!(
            "context {context} is too short: recall is measured on the last quarter of each window (use >= 4)"
        )));
    }
    if windows == 0 {
        return Err(Error::Invalid("`windows` must be >= 1".into()));
    }
    if context > model.cfg.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "context {context} exceeds the model's max_position_embeddings {}",
            model.cfg.max_position_embeddings
        )));
    }
    let wins = eval_windows(tokens, windows, context)?;
    let from = context - context / 4;
    let opts = ForwardOptions {
        collect: Collect {
            recall_from: Some(from),
            ..Collect::default()
        },
        ..Default::default()
    };
    let n_layers = model.cfg.num_hidden_layers;
    let mut per_layer: Vec<Vec<f32>> = vec![Vec::new(); n_layers];
    let mut best: Vec<Vec<f32>> = vec![Vec::new(); n_layers];
    let bar = crate::progress::bar(wins.len() as u64, "recall", progress);
    for (inp, _) in &wins {
        let ids = Tensor::from_slice(inp, (1, context), model.store.device())?;
        let out = model.net.forward_with(&ids, &opts)?;
        for (l, diag) in out.diagnostics.layers.iter().enumerate() {
            if let Some(r) = &diag.recall {
                per_layer[l].extend(r.iter().copied().filter(|x| !x.is_nan()));
            }
            if let Some(r) = &diag.best_recall {
                best[l].extend(r.iter().copied().filter(|x| !x.is_nan()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    Ok(per_layer
        .into_iter()
        .zip(best)
        .enumerate()
        .filter(|(_, (v, _))| !v.is_empty())
        .map(|(layer, (mut v, b))| {
            v.sort_by(|a, b| a.total_cmp(b));
            let n = v.len();
            LayerRecall {
                layer,
                context,
                topk: model.cfg.index_topk,
                queries: n,
                mean: mean(&v),
                p5: v[(n as f64 * 0.05) as usize] as f64,
                min: v[0] as f64,
                best_mean: mean(&b),
            }
        })
        .collect())
}
