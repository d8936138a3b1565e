//! `sparrow train`: a model from a config on a corpus, or a run resumed exactly.

use crate::common::{require_corpus, stop_on_ctrl_c};
use anyhow::{bail, Context, Result};
use sparrow::config::{IndexerKlTarget, ModelConfig};
use sparrow::model::params::ParamSet;
use sparrow::train::{self, ResumeRequest, TrainOptions, TrainRequest};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model config (HF-style config.json); with --init-from, defaults to that model's.
    #[arg(long, required_unless_present_any = ["resume", "init_from"])]
    pub config: Option<PathBuf>,
    /// Start a new stage from this model's weights and tokenizer (a model directory,
    /// an adapter, a GGUF file or a known model's name; fresh
    /// optimizer and schedule; e.g. a longer --seq-len).
    #[arg(long, conflicts_with_all = ["resume", "tokenizer"])]
    pub init_from: Option<PathBuf>,
    /// Share of batch rows replaced by generated passkey / needle retrieval documents.
    #[arg(long)]
    pub retrieval_mix: Option<f64>,
    /// Share of those documents that are passkey prompts (the rest: needles in corpus
    /// text); default 0.5.
    #[arg(long)]
    pub retrieval_passkey_share: Option<f64>,
    /// Set the config's `indexer_dense_warmup_steps` for this run (e.g. per training
    /// stage); the run's config.json records the value used.
    #[arg(long)]
    pub indexer_dense_warmup_steps: Option<u64>,
    /// Set the config's `indexer_kl_target`: what the indexer's KL pulls it towards,
    /// the main attention's heads averaged (`head-mean`, DeepSeek-V3.2) or each key's
    /// largest probability over the heads (`head-max`).
    #[arg(long, value_enum)]
    pub indexer_kl_target: Option<KlTargetArg>,
    /// The parameters that train: `all`; `indexer` (the DSA indexers alone, the rest
    /// frozen as loaded; an adapter made by `sparrow dsa attach` trains its indexers);
    /// `indexer-norms` (and every norm's weights) or `indexer-attention` (and every
    /// attention projection and norm), which adapt the base to its sparse attention by
    /// the LM loss. From an adapter, the run's checkpoints hold the set trained.
    #[arg(long, value_enum)]
    pub trainable: Option<TrainableArg>,
    /// Dense warm-up: compute the indexer KL on this many query positions per window
    /// (drawn each step) instead of all of them.
    #[arg(long)]
    pub indexer_kl_queries: Option<usize>,
    /// Folder of .txt files.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Run directory (model dir + training state + metrics.jsonl).
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory exactly where it stopped.
    #[arg(long, conflicts_with_all = ["config", "out"])]
    pub resume: Option<PathBuf>,
    /// Use an existing tokenizer.json instead of training one on the corpus.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Total optimizer steps (on resume: the new total).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub grad_clip: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub val_every: Option<u64>,
    #[arg(long)]
    pub val_batches: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Checkpoint and stop after this step; `--resume` continues (the schedule spans --steps).
    #[arg(long)]
    pub pause_at: Option<u64>,
    /// Stop (with a checkpoint) after this many minutes.
    #[arg(long)]
    pub time_limit_min: Option<f64>,
}

/// `--trainable`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TrainableArg {
    All,
    Indexer,
    IndexerNorms,
    IndexerAttention,
}

/// `--indexer-kl-target`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KlTargetArg {
    HeadMean,
    HeadMax,
}

impl From<KlTargetArg> for IndexerKlTarget {
    fn from(t: KlTargetArg) -> Self {
        match t {
            KlTargetArg::HeadMean => IndexerKlTarget::HeadMean,
            KlTargetArg::HeadMax => IndexerKlTarget::HeadMax,
        }
    }
}

/// An indexer flag on a model without one is an error naming the flag.
fn require_indexer(config: &ModelConfig, flag: &str) -> Result<()> {
    if !config.has_indexer() {
        bail!("{flag}: the model has no indexer (`dsa` or `compressed_sparse_attention` layer)");
    }
    Ok(())
}

impl From<TrainableArg> for ParamSet {
    fn from(t: TrainableArg) -> Self {
        match t {
            TrainableArg::All => ParamSet::All,
            TrainableArg::Indexer => ParamSet::Indexer,
            TrainableArg::IndexerNorms => ParamSet::IndexerNorms,
            TrainableArg::IndexerAttention => ParamSet::IndexerAttention,
        }
    }
}

pub fn run(a: TrainArgs, progress: bool) -> Result<()> {
    let stop = stop_on_ctrl_c("checkpointing after this step (Ctrl-C again to abort)")?;
    let summary = if let Some(dir) = a.resume {
        train::resume(ResumeRequest {
            dir,
            steps: a.steps,
            corpus: a.corpus,
            show_progress: progress,
            stop,
            pause_at: a.pause_at,
        })?
    } else {
        let mut config = match (&a.config, &a.init_from) {
            (Some(p), _) => ModelConfig::from_file(p)?,
            (None, Some(spec)) => sparrow::model_source::read_config(
                &sparrow::model_source::resolve(spec, progress)?,
            )?,
            (None, None) => bail!("--config is required"),
        };
        if let Some(n) = a.indexer_dense_warmup_steps {
            require_indexer(&config, "--indexer-dense-warmup-steps")?;
            config.indexer_dense_warmup_steps = n;
        }
        if let Some(target) = a.indexer_kl_target {
            require_indexer(&config, "--indexer-kl-target")?;
            config.indexer_kl_target = target.into();
        }
        let mut o = TrainOptions::default();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = a.$f { o.$f = v; } )* };
        }
        set!(
            steps,
            batch_size,
            seq_len,
            lr,
            warmup_steps,
            grad_clip,
            seed,
            val_every,
            val_batches,
            checkpoint_every,
            val_fraction,
            retrieval_mix,
            retrieval_passkey_share,
            indexer_kl_queries
        );
        if let Some(t) = a.trainable {
            o.trainable = t.into();
        } else if let Some(spec) = &a.init_from {
            // An adapter trains what it holds.
            if let Some(adapter) = sparrow::model_dir::AdapterSpec::read(spec)? {
                o.trainable = adapter.params;
            }
        }
        if let Some(wd) = a.weight_decay {
            o.adamw.weight_decay = wd;
        }
        if let Some(m) = a.time_limit_min {
            o.time_limit_secs = (m * 60.0).round() as u64;
        }
        let corpus = a.corpus.unwrap_or_else(|| PathBuf::from("data/corpus"));
        require_corpus(&corpus)?;
        train::train(TrainRequest {
            config,
            corpus,
            out: a.out.context("--out is required")?,
            tokenizer: a.tokenizer,
            options: o,
            show_progress: progress,
            stop,
            pause_at: a.pause_at,
            init_from: a.init_from,
        })?
    };
    println!(
        "{} at step {}: loss {:.4}, val loss {}, {:.0} tokens/s, {:.2}M parameters",
        if summary.interrupted {
            "stopped"
        } else {
            "finished"
        },
        summary.step,
        summary.last_loss,
        summary
            .last_val_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "-".into()),
        summary.tokens_per_s,
        summary.parameters as f64 / 1e6
    );
    Ok(())
}
