//! Training objectives named in the config: how the DSA indexer learns, stage by
//! stage (`indexer_train_mode`, `indexer_dense_warmup_steps`, `indexer_kl_coef`,
//! `indexer_kl_target`).

use super::ModelConfig;
use crate::kernels::sparse_attention::HeadCombine;
use serde::{Deserialize, Serialize};

/// How the indexer learns (after `indexer_dense_warmup_steps` of `dense_warmup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexerTrainMode {
    /// Main attention stays dense; the indexer learns only from KL(p || softmax(I))
    /// over all visible keys, where p is the main attention summed over heads and
    /// L1-normalised (DeepSeek-V3.2's warm-up). Its input and p are detached, so the KL
    /// moves nothing but the indexer; the rest of the model trains on the LM loss.
    DenseWarmup,
    /// Main attention over the selected top-k; the indexer learns from the KL over the
    /// selected set with its input detached; the main model from the LM loss.
    Sparse,
    /// Main attention over the selected top-k with each weight multiplied by
    /// `1 + sigma(I) - stopgrad(sigma(I))`: the LM loss reaches the indexer (and, through
    /// its input, the model below). The KL over the selected set is added when
    /// `indexer_kl_coef` > 0.
    Ste,
}

/// What distribution over keys the indexer's KL pulls it towards: how the main
/// attention's query heads are combined into one target per query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexerKlTarget {
    /// The heads' probabilities summed and L1-normalised (their mean): DeepSeek-V3.2's
    /// target. Keys most heads attend to dominate it.
    #[default]
    HeadMean,
    /// Each key's largest probability over the heads, L1-normalised: a key one head
    /// attends to strongly (a line a retrieval head copies) weighs as much as one every
    /// head attends to as strongly.
    HeadMax,
}

impl IndexerKlTarget {
    /// The kernels' name for the same combination.
    pub fn head_combine(self) -> HeadCombine {
        match self {
            IndexerKlTarget::HeadMean => HeadCombine::Mean,
            IndexerKlTarget::HeadMax => HeadCombine::Max,
        }
    }
}

impl ModelConfig {
    /// The indexer training mode at optimizer step `step`.
    pub fn indexer_mode_at(&self, step: u64) -> IndexerTrainMode {
        if step < self.indexer_dense_warmup_steps {
            IndexerTrainMode::DenseWarmup
        } else {
            self.indexer_train_mode
        }
    }
}
