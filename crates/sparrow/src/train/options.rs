//! The hyper-parameters of a training run (`TrainOptions`): saved in
//! `train_state.json` and reused on resume; validation errors name the option.

use super::optimizer::AdamWConfig;
use crate::data::retrieval;
use crate::error::{Error, Result};
use crate::model::params::ParamSet;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of a run (saved in `train_state.json`, reused on resume).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    /// Total optimizer steps.
    pub steps: u64,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Seeds the initialisation and the batch stream.
    pub seed: u64,
    /// Validate every this many steps (0 = only at the end).
    pub val_every: u64,
    /// Validation batches (of `batch_size` windows each).
    pub val_batches: usize,
    /// Checkpoint every this many steps (0 = only at the end / on interrupt).
    pub checkpoint_every: u64,
    /// Share of each document held out for validation.
    pub val_fraction: f64,
    /// Stop after this many seconds of training (checkpointing first); 0 = no limit.
    #[serde(default)]
    pub time_limit_secs: u64,
    /// Share of the batch rows replaced by generated retrieval documents (passkey and
    /// needle, `data::retrieval`), 0 = plain corpus windows.
    #[serde(default)]
    pub retrieval_mix: f64,
    /// Share of the retrieval documents that are passkey prompts (the rest: needles in
    /// corpus text).
    #[serde(default = "half")]
    pub retrieval_passkey_share: f64,
    /// The parameters that train; the others stay as loaded (e.g. `indexer`: the DSA
    /// indexers on a frozen pretrained model, DeepSeek-V3.2's warm-up). With `indexer`
    /// and the KL-trained indexer modes (`dense_warmup`, `sparse`) nothing trainable
    /// depends on the LM loss, so training steps skip the LM head and the logged `loss`
    /// is the indexer KL; validation still reports the model's LM loss (`val_loss`).
    #[serde(default)]
    pub trainable: ParamSet,
    /// `dense_warmup` steps: the indexer KL on this many query positions per window
    /// (drawn afresh each step), 0 = every query. The target rows are the costly part
    /// of the warm-up at long windows; a sample of them keeps the signal at a fraction
    /// of the cost (the dense attention itself still runs for every query).
    #[serde(default)]
    pub indexer_kl_queries: usize,
}

fn half() -> f64 {
    0.5
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            seq_len: 256,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            seed: 1337,
            val_every: 100,
            val_batches: 8,
            checkpoint_every: 200,
            val_fraction: 0.02,
            time_limit_secs: 0,
            retrieval_mix: 0.0,
            retrieval_passkey_share: 0.5,
            trainable: ParamSet::All,
            indexer_kl_queries: 0,
        }
    }
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Invalid(m.to_string()));
        if self.steps == 0 {
            return bad("train option `steps` must be > 0");
        }
        if self.batch_size == 0 {
            return bad("train option `batch_size` must be > 0");
        }
        if self.seq_len < 2 {
            return bad("train option `seq_len` must be >= 2");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("train option `lr` must be > 0");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("train option `min_lr_ratio` must be in [0, 1]");
        }
        if self.val_batches == 0 {
            return bad("train option `val_batches` must be > 0");
        }
        if !(0.0..=1.0).contains(&self.retrieval_mix) {
            return bad("train option `retrieval_mix` must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.retrieval_passkey_share) {
            return bad("train option `retrieval_passkey_share` must be in [0, 1]");
        }
        if self.retrieval_mix > 0.0 && self.seq_len < retrieval::MIN_MIX_DOC {
            return Err(Error::Invalid(format!(
                "train option `retrieval_mix` needs `seq_len` >= {}",
                retrieval::MIN_MIX_DOC
            )));
        }
        Ok(())
    }
}
